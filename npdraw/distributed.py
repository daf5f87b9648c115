"""Data parallelism over ranks: one model trained by N processes, on one machine or many.

Dimension legend
    B  global batch
    Bk  the examples of rank k (sum over k is B)
    T  glimpses
    Z  latent size
    P  the total number of parameter values
    S  = 3 + T statistics that ride with the gradients: loss, L^x, stop flag, KL per glimpse

Launched as ``mpiexec -n N python cli.py train ...`` (or ``srun``), every rank holds the
parameters and the Adam state, takes its slice of every global batch, and sums the
gradients with one all-reduce on one flat, preallocated buffer (P + S values): MPI
(mpi4py) between CPU processes, NCCL between GPUs (bootstrapped over MPI, ChainerMN's
design). The loss is a batch mean, so the global gradient is the sum over ranks of
(Bk / B) times each rank's batch-mean gradient: what one process computes, up to float
rounding.

The communicator objects give train.py five things: `shard(B)` (this rank's slice),
`reduce_step` (the step's all-reduce), `sum` (evaluation sums), `broadcast_text` and
`check_same`. `SingleProcess` is the trivial one: no copies, results bit for bit those of
the code without it. `from_environment()` picks MPI when a launcher started more than
one rank; mpi4py is imported only then.

Stopping: every reduction carries a stop code. Under MPI, Ctrl-C or SIGTERM only sets
this rank's code (`deferred_interrupts`); at the next reduction every rank sees it and
raises `Interrupted` with the signal's number at the same step, so all ranks stop
together and rank 0 reports it as one process would (exit status 130 or 143). A signal
that comes while a rank still imports is noted from the package's first line
(guards.note_signals_until_handled) and carried into that first reduction too. A second
Ctrl-C, more than a second after the first, interrupts at once. Any other failure of one
rank (an exception, a killed process) cannot be agreed on: that rank prints one line and
calls MPI_Abort, which ends every rank within seconds (`abort`); a killed process is
detected by the launcher, which ends the others.

On one machine, `python cli.py train` starts its ranks itself: `launch_command` is the
`mpiexec -n R` command line that runs the same script again as R ranks, one per core
(`resolve_ranks`), and npdraw/launcher.py runs it as a child of the process the user
started, which passes signals on to every rank, reports a killed rank in one sentence
and removes MPICH's shared memory after it (docs/DESIGN.md, item 15, says why).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from . import backend, guards
# Launcher variables that say how many ranks were started: MPICH's Hydra, Intel MPI and
# srun's PMI-2 set PMI_SIZE, Open MPI its own. Inside an srun step (any MPI plugin)
# SLURM_STEP_NUM_TASKS counts the tasks; SLURM_NTASKS alone does not, since an sbatch
# script that starts one process has it too.
from .threads import SIZE_VARIABLES, launched_ranks

# Set in the ranks that `launch_command` starts: they never launch again.
LAUNCHED_VARIABLE = "NPDRAW_LAUNCHED_RANKS"
# The automatic rank count gives every rank at least this many examples of a batch: below
# it a rank's GEMMs are too narrow to pay for the step's all-reduce and its own Adam.
MIN_SHARE = 32
MPI_HINT = 'pip install -e ".[mpi]"'


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (``signum``) reached some rank; every rank raises this at the
    same reduction."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def stop_code(signum, size: int) -> float:
    """The value a rank adds to a reduction's stop slot: 0 (go on), 1 for SIGINT, size + 1
    for SIGTERM, so that the sum over `size` ranks still says whether any rank got SIGTERM
    (the stronger request: a scheduler's)."""
    if not signum:
        return 0.0
    return float(size + 1) if signum == signal.SIGTERM else 1.0


def stop_signal(total: float, size: int):
    """The sum of the ranks' stop codes -> None (go on), SIGTERM or SIGINT."""
    if total <= 0:
        return None
    return signal.SIGTERM if total >= size + 1 else signal.SIGINT


# ---------------------------------------------------------------- the flat buffer and the split

def shard_bounds(B: int, parts: int) -> list:
    """Bounds of `parts` contiguous slices of B examples, as even as can be:
    slice k is [bounds[k], bounds[k+1]); some are empty when parts > B."""
    return [round(k * B / parts) for k in range(parts + 1)]


def flat_layout(shapes: dict):
    """name -> shape (in the dict's order) -> ({name: (offset, shape)}, P), the places of
    every parameter in one flat (P,) vector."""
    layout, offset = {}, 0
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        layout[name] = (offset, shape)
        offset += int(np.prod(shape))
    return layout, offset


def flat_views(flat, layout: dict) -> dict:
    """flat: (>= P,) -> {name: view of its place, shaped like the parameter}."""
    return {name: flat[off:off + int(np.prod(shape))].reshape(shape)
            for name, (off, shape) in layout.items()}


def write_weighted(grads: dict, share: float, views: dict) -> None:
    """views[name] <- share * grads[name] for every name: one part of the global
    gradient, Bk/B times the batch-mean gradient of Bk examples. grads, views: {name: (P,)}."""
    for name, view in views.items():
        xp = backend.get_array_module(view)
        xp.multiply(grads[name], view.dtype.type(share), out=view)


# ---------------------------------------------------------------- one process

class SingleProcess:
    """The communicator of a run in one process: every method is the identity."""

    rank, size, local_rank = 0, 1, 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def shard(self, B: int):
        """-> (lo, hi): this rank's examples of a global batch of B."""
        bounds = shard_bounds(B, self.size)
        return bounds[self.rank], bounds[self.rank + 1]

    def for_device(self, device: str):
        """The communicator to use with parameters on `device` ('cpu' or 'gpu')."""
        return self

    def reduce_step(self, params, T, result, share):
        """The step's all-reduce. result: (loss, grads, stats) of this rank's examples
        from model.loss_and_grads, or None when it has none; share: Bk / B.
        -> (loss, grads, stats) of the global batch. Here: result itself."""
        return result

    def sum(self, values):
        """Evaluation sums: values (K,) float64 -> their sum over ranks (K,)."""
        return np.asarray(values, dtype=np.float64)

    def broadcast_text(self, text: str) -> str:
        """Rank 0's text, on every rank."""
        return text

    def check_same(self, value: float, what: str) -> None:
        """RuntimeError unless every rank holds the same `value`."""

    def deferred_interrupts(self, stop=None):
        """A context in which Ctrl-C stops every rank at the next reduction. stop: the
        guards.StopSignals of the run, whose noted signal it takes over. In one process the
        StopSignals alone stop the run: nothing to do."""
        return contextlib.nullcontext()

    def abort(self, message: str):
        """Print `message` and end every rank (not reached in one process: raises)."""
        raise RuntimeError(message)

    def describe(self) -> str:
        return ""


# ---------------------------------------------------------------- MPI

ABORT_GRACE_S = 0.5
# A second signal this soon after the first is the same request delivered twice (see
# guards). A person's second Ctrl-C goes to mpiexec, which then ends the ranks itself.
SAME_REQUEST_S = guards.SAME_REQUEST_S


class StepBuffer:
    """The one flat buffer of a step's all-reduce, on the parameters' device:
    [gradients (P,) | loss, L^x, stop, KL (T,)], in the parameters' dtype.

    params: {name: array of any shape} (NumPy or CuPy), fixing the layout and device.
    The statistics ride in the same dtype: float32 rounds a loss of ~100 nats to ~1e-5.
    """

    def __init__(self, params: dict, T: int):
        first = next(iter(params.values()))
        xp = backend.get_array_module(first)
        self.layout, self.P = flat_layout({name: p.shape for name, p in params.items()})
        self.T = T
        self.flat = xp.zeros(self.P + 3 + T, dtype=first.dtype)
        self.grads = flat_views(self.flat, self.layout)

    def fits(self, params: dict, T: int) -> bool:
        """Whether these parameters (names, shapes, dtype, device) and T use this buffer."""
        first = next(iter(params.values()))
        return (T == self.T and first.dtype == self.flat.dtype
                and backend.get_array_module(first) is backend.get_array_module(self.flat)
                and list(params) == list(self.layout)
                and all(p.shape == self.grads[name].shape for name, p in params.items()))

    def pack(self, result, share: float, stop: float) -> None:
        """This rank's part: share * (gradients, loss, L^x, KL) and its stop code."""
        tail = np.zeros(3 + self.T, dtype=np.float64)
        if result is None:                       # no examples on this rank
            self.flat[:self.P] = 0
        else:
            loss, grads, stats = result
            write_weighted(grads, share, self.grads)
            tail[0], tail[1] = share * loss, share * stats["recon"]
            tail[3:] = share * np.asarray(stats["kl"], dtype=np.float64)
        tail[2] = stop
        xp = backend.get_array_module(self.flat)
        self.flat[self.P:] = xp.asarray(tail.astype(self.flat.dtype))  # S values to a GPU

    def unpack(self):
        """-> (loss, grads (views into the buffer, valid until the next pack), stats, the
        sum of the stop codes)."""
        tail = backend.to_numpy(self.flat[self.P:]).astype(np.float64)  # one transfer
        loss, recon, stop, kl = float(tail[0]), float(tail[1]), float(tail[2]), tail[3:]
        stats = {"loss": loss, "recon": recon, "kl": kl, "kl_total": float(kl.sum())}
        return loss, self.grads, stats, stop


class MPIRanks(SingleProcess):
    """Ranks of an MPI communicator (mpi4py's COMM_WORLD, or a stand-in with its
    Get_rank, Get_size, Allreduce, Bcast and Abort); `mpi` is the module holding
    IN_PLACE, SUM and MAX."""

    def __init__(self, comm, mpi, local_rank: int = 0):
        self.comm, self._mpi = comm, mpi
        self.rank, self.size = int(comm.Get_rank()), int(comm.Get_size())
        self.local_rank = local_rank
        self._buffer = None
        self._stop_signum = 0                     # the signal this rank got, 0 for none

    def describe(self) -> str:
        return f"{self.size} MPI ranks"

    def for_device(self, device: str):
        if device != "gpu":
            return self
        return NCCLRanks(self.comm, self._mpi, self.local_rank)

    # -- the step

    def _allreduce_flat(self, flat) -> None:
        self.comm.Allreduce(self._mpi.IN_PLACE, flat, op=self._mpi.SUM)

    def reduce_step(self, params, T, result, share):
        if self._buffer is None or not self._buffer.fits(params, T):   # once per model
            self._buffer = StepBuffer(params, T)
        self._buffer.pack(result, share, stop_code(self._stop_signum, self.size))
        self._allreduce_flat(self._buffer.flat)
        loss, grads, stats, stop = self._buffer.unpack()
        self._raise_if_stopped(stop)
        return loss, grads, stats

    def _raise_if_stopped(self, total: float) -> None:
        signum = stop_signal(total, self.size)
        if signum is not None:
            raise Interrupted(signum)

    # -- small host-side collectives

    def sum(self, values):
        values = np.asarray(values, dtype=np.float64)
        buffer = np.append(values, stop_code(self._stop_signum, self.size))
        self.comm.Allreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)
        self._raise_if_stopped(float(buffer[-1]))
        return buffer[:-1]

    def broadcast_text(self, text: str) -> str:
        data = np.frombuffer(text.encode(), dtype=np.uint8) if self.is_root else None
        length = np.array([0 if data is None else data.size], dtype=np.int64)
        self.comm.Bcast(length, root=0)
        if data is None:
            data = np.empty(int(length[0]), dtype=np.uint8)
        else:
            data = data.copy()
        self.comm.Bcast(data, root=0)
        return data.tobytes().decode()

    def check_same(self, value: float, what: str) -> None:
        extremes = np.array([value, -value], dtype=np.float64)
        self.comm.Allreduce(self._mpi.IN_PLACE, extremes, op=self._mpi.MAX)
        if not extremes[0] == -extremes[1]:
            raise RuntimeError(f"the ranks disagree on {what}: from {-extremes[1]!r} to "
                               f"{extremes[0]!r}; their parameters have drifted apart")

    # -- stopping

    @contextlib.contextmanager
    def deferred_interrupts(self, stop=None):
        # A signal that the run's StopSignals noted before (while the run folder and the
        # first checkpoint were prepared) is carried into the first reduction.
        pending = stop.take() if stop is not None else guards.take_early_signal()
        first = time.monotonic()
        if pending:
            self._stop_signum = pending

        def request_stop(signum, frame):
            nonlocal first
            if not self._stop_signum:
                self._stop_signum, first = signum, time.monotonic()
            elif time.monotonic() - first > SAME_REQUEST_S:   # the second Ctrl-C: now
                raise KeyboardInterrupt

        # SIGTERM too: schedulers send it to every rank (see docs/TRAINING.md, Stopping)
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT,
                                                                      signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def abort(self, message: str):
        sys.stderr.write(f"Error: rank {self.rank} of {self.size}: {message}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        # mpiexec relays output through its proxies, which the abort tears down: give the
        # line time to reach the user first (a lost message was seen on a loaded machine).
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(1)
        os._exit(1)                               # not reached with a real MPI


class NCCLRanks(MPIRanks):
    """MPI ranks with one GPU each, chosen by the rank's place on its machine; the
    step's all-reduce runs over NCCL on the device buffer (no host copy of gradients),
    bootstrapped by broadcasting NCCL's unique id over MPI. Evaluation sums and the
    other small collectives stay on MPI."""

    def __init__(self, comm, mpi, local_rank: int):
        super().__init__(comm, mpi, local_rank)
        count = backend.gpu_count()
        if local_rank >= count:
            raise ValueError(f"rank {self.rank} is number {local_rank + 1} on its machine, "
                             f"which has {count} GPU(s): start one rank per GPU")
        backend.use_gpu(local_rank)
        unique_id = np.zeros(backend.NCCL_UNIQUE_ID_BYTES, dtype=np.int8)
        if self.is_root:
            unique_id[:] = backend.nccl_unique_id()
        comm.Bcast(unique_id, root=0)
        self._nccl = backend.nccl_communicator(self.size, unique_id, self.rank)

    def describe(self) -> str:
        return f"{self.size} MPI ranks, one GPU each, NCCL"

    def _allreduce_flat(self, flat) -> None:
        backend.nccl_allreduce_sum(self._nccl, flat)


def from_environment():
    """SingleProcess, or MPIRanks over COMM_WORLD when a launcher started more than one
    rank (mpi4py is imported only then; ValueError when it is missing)."""
    if launched_ranks() <= 1:
        return SingleProcess()
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ValueError(f"started as {launched_ranks()} MPI ranks, but mpi4py cannot be "
                         f"imported ({err}); install it with: pip install -e \".[mpi]\"") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        raise ValueError(f"the launcher started {launched_ranks()} ranks, but MPI sees one: "
                         "mpi4py is built for another MPI than this mpiexec (use the mpiexec "
                         f"that came with mpi4py's MPI, e.g. {MPI_HINT} and the mpiexec next "
                         "to python)")
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank()).Get_rank()
    return MPIRanks(comm, MPI, local_rank)


# ---------------------------------------------------------------- ranks on one machine

def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_ranks(batch_size: int, cores: int | None = None) -> int:
    """The rank count of ranks = 0 on a CPU: one per usable core, each with at least
    MIN_SHARE examples of a batch of `batch_size`."""
    cores = usable_cores() if cores is None else cores
    return max(1, min(cores, batch_size // MIN_SHARE))


def resolve_ranks(ranks: int, device: str, batch_size: int) -> int:
    """TrainConfig.ranks -> the number of ranks to start: 0 is auto_ranks on the CPU and
    1 on a GPU (one rank per GPU: more need that many GPUs and an explicit count)."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 0:
        raise ValueError(f"ranks must be 0 (automatic) or a positive integer, got {ranks!r}")
    if ranks:
        return ranks
    return 1 if device == "gpu" else auto_ranks(batch_size)


def check_rank_count(ranks: int, comm) -> None:
    """ValueError unless `ranks` (0: automatic) fits the `comm.size` ranks that run."""
    if ranks in (0, comm.size):
        return
    if comm.size == 1:
        raise ValueError(f"ranks = {ranks} needs {ranks} MPI ranks, and this is one process: "
                         f"run `python cli.py`, which starts them, or `mpiexec -n {ranks} "
                         "python cli.py ...`")
    raise ValueError(f"ranks = {ranks}, but the launcher started {comm.size}: give 0 "
                     f"(take the launcher's count) or {comm.size}")


def end_every_rank(status: int) -> None:
    """Under MPI, end every rank now with ``status`` (MPI_Abort), for a failure that only
    this rank saw outside any reduction; nothing in one process or before MPI started."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or launched_ranks() <= 1 or not mpi.Is_initialized() or mpi.Is_finalized():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)                 # let mpiexec relay the line first (see abort)
    mpi.COMM_WORLD.Abort(status)
    os._exit(status)                          # not reached with a real MPI


def stop_at_once_on_signals() -> None:
    """For a command under MPI that writes nothing (evaluate): SIGINT or SIGTERM ends every
    rank at once with 130 or 143 (MPI_Abort), rank 0 saying "interrupted"; one noted while
    the rank started acts now. Its reductions come only at the end, so a stop carried by
    them would come when the work is done; nothing is lost by ending at once."""
    if launched_ranks() <= 1:
        return

    def stop(signum, frame):
        if os.environ.get("PMI_RANK", "0") == "0":
            sys.stderr.write("interrupted\n")
        end_every_rank(128 + signum)

    pending = guards.take_early_signal()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    if pending:
        stop(pending, None)


def under_launcher(environ=None) -> bool:
    """True when mpiexec, mpirun, srun or `launch_command` started this process (even as
    one rank): the count is then the launcher's, and nothing launches again."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in (*SIZE_VARIABLES, LAUNCHED_VARIABLE,
                                           "SLURM_STEP_ID"))


def _is_hydra(path: str) -> bool:
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "HYDRA" in result.stdout


def find_mpiexec():
    """MPICH's mpiexec (Hydra): the one next to this Python (where the `mpich` wheel puts
    it), else the first on PATH; None when neither is Hydra. Other launchers are not
    used: Open MPI's turns Ctrl-C into SIGTERM and then SIGKILL (start them by hand)."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    for path in (here, shutil.which("mpiexec")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK) and _is_hydra(path):
            return path
    return None


def mpi_available() -> bool:
    """mpi4py is importable (checked without importing it: importing MPI initialises it)."""
    return importlib.util.find_spec("mpi4py") is not None


def launch_command(ranks: int, mpiexec: str, script: str, args) -> tuple:
    """-> (argv, environ) that run `python script args...` as `ranks` MPI ranks on this
    machine (Hydra's fork launcher: never on other hosts, even inside a SLURM job); script
    may also be a list of python's arguments, such as ['-m', 'npdraw']. Each rank's BLAS
    gets its share of the cores (one thread each with one rank per core), unless the user
    set the thread count: it must be known before NumPy loads."""
    program = [os.path.abspath(script)] if isinstance(script, (str, os.PathLike)) \
        else [str(part) for part in script]
    argv = [mpiexec, "-launcher", "fork", "-n", str(ranks), sys.executable, *program, *args]
    threads = str(max(1, usable_cores() // ranks))
    blas = {name: os.environ.get(name, threads)
            for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return argv, {**os.environ, **blas, LAUNCHED_VARIABLE: str(ranks)}


def exec_as_ranks(ranks: int, mpiexec: str, script: str, args) -> None:
    """Run `launch_command`'s mpiexec under npdraw.launcher, which stays the process the
    user started (signals to it reach every rank; a killed rank is one sentence and
    exit 1), and exit with the job's status; what was printed is flushed first."""
    from . import launcher
    argv, environ = launch_command(ranks, mpiexec, script, args)
    sys.stdout.flush()
    sys.stderr.flush()
    status = launcher.run(argv, environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)            # nothing of this process's own is left to run or save


# Ranks started on this machine, at most this many per core: more only share the cores
# (a count like 10^12 is a typing error, which mpiexec would try to honour).
MAX_RANKS_PER_CORE = 4


def launch_plan(ranks: int, device: str, batch_size: int, environ=None):
    """How a command on this machine runs: -> (count, mpiexec or None, note or None).

    count: the ranks to start (1: this process alone); mpiexec: the launcher to start
    them with, None when the count is 1 or this process already is a rank; note: one line
    for the user when MPI is missing and the ranks cannot be started. ValueError when an
    explicit count above 1 cannot be started."""
    if under_launcher(environ):
        return 1, None, None
    count = resolve_ranks(ranks, device, batch_size)
    if count == 1:
        return 1, None, None
    cores = usable_cores()
    if count > MAX_RANKS_PER_CORE * cores:
        raise ValueError(f"ranks = {count} would start {count} processes on this machine's "
                         f"{cores} cores; ask for at most {MAX_RANKS_PER_CORE * cores}, or start "
                         "the ranks of a cluster with mpiexec or srun")
    mpiexec = find_mpiexec() if mpi_available() else None
    if mpiexec is not None:
        return count, mpiexec, None
    missing = ("mpi4py and MPICH's mpiexec" if not mpi_available()
               else "MPICH's mpiexec (next to python or on PATH)")
    if ranks:
        raise ValueError(f"ranks = {ranks} needs {missing}; install them with: {MPI_HINT} "
                         "(or use --ranks 1)")
    return 1, None, (f"note: one process on {usable_cores()} cores; for one MPI rank per "
                     f"core install {missing}: {MPI_HINT}")
