"""Data-parallel ranks (npdraw.distributed): the communicators in-process on a stand-in
MPI group of threads, the NCCL path on stand-in CuPy/NCCL objects, and real MPI runs
under `mpiexec -n 2` and `-n 3` (more ranks than CI's two cores).

The MPI runs need mpi4py and the mpiexec that the mpich wheel installs next to this
Python (`pip install -e ".[mpi]"`); they are skipped only where mpi4py is absent.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from npdraw import backend, distributed, guards, launcher, model
from npdraw import checkpoint as ckpt_lib
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw import evaluate as evaluate_lib
from npdraw.config import DrawConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
ATT = DrawConfig(height=6, width=7, T=3, read_n=2, write_n=3, enc_dim=8, dec_dim=9, z_dim=4)
NOATT = DrawConfig(height=5, width=4, T=3, enc_dim=6, dec_dim=7, z_dim=3, attention=False)


def _batch(cfg, B, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((B, cfg.D)) < 0.4).astype(dtype)
    eps = rng.standard_normal((cfg.T, B, cfg.z_dim)).astype(dtype)
    return x, eps


# ---------------------------------------------------------------- a stand-in MPI group

class _FakeMPI:
    """The constants MPIRanks takes from mpi4py's MPI module."""
    IN_PLACE, SUM, MAX = "IN_PLACE", "SUM", "MAX"


class _Group:
    """`size` ranks as threads: collectives meet at a barrier; sums run in rank order."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots = [None] * size
        self.aborted = []

    def comm(self, rank):
        return _FakeComm(self, rank)


class _FakeComm:
    def __init__(self, group, rank):
        self.group, self.rank = group, rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.group.size

    def _exchange(self, buffer):
        self.group.slots[self.rank] = np.array(buffer)
        self.group.barrier.wait()
        parts = list(self.group.slots)
        self.group.barrier.wait()            # nobody overwrites a slot still being read
        return parts

    def Allreduce(self, sendbuf, recvbuf, op):
        assert sendbuf is _FakeMPI.IN_PLACE
        parts = self._exchange(recvbuf)
        result = parts[0].copy()
        for part in parts[1:]:
            result = result + part if op == _FakeMPI.SUM else np.maximum(result, part)
        recvbuf[...] = result

    def Bcast(self, buffer, root=0):
        buffer[...] = self._exchange(buffer)[root]

    def Abort(self, code):
        self.group.aborted.append((self.rank, code))


def _run_ranks(size, work, make=None):
    """work(comm, rank) on `size` threads, each with its communicator -> results by rank."""
    group = _Group(size)
    make = make or (lambda comm, rank: distributed.MPIRanks(comm, _FakeMPI))
    results, errors = [None] * size, []

    def run(rank):
        try:
            results[rank] = work(make(group.comm(rank), rank), rank)
        except BaseException as error:       # noqa: BLE001 - reported below
            errors.append((rank, error))
            group.barrier.abort()
    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0][1]
    return results


def _sharded_step(comm, params, cfg, x, eps):
    """What train does with one batch on one rank."""
    lo, hi = comm.shard(x.shape[0])
    mine = (model.loss_and_grads(params, cfg, x[lo:hi], np.ascontiguousarray(eps[:, lo:hi]))
            if hi > lo else None)
    loss, grads, stats = comm.reduce_step(params, cfg.T, mine, (hi - lo) / x.shape[0])
    return loss, {k: np.array(v) for k, v in grads.items()}, stats


def _assert_same_step(got, want, rtol):
    loss, grads, stats = want
    loss_r, grads_r, stats_r = got
    assert loss_r == pytest.approx(loss, rel=rtol)
    assert stats_r["recon"] == pytest.approx(stats["recon"], rel=rtol)
    # a glimpse's KL nearly cancels at initialisation: its rounding is absolute (Z eps)
    np.testing.assert_allclose(stats_r["kl"], stats["kl"], rtol=rtol, atol=1e-14)
    assert set(grads_r) == set(grads)
    for name in grads:
        assert grads_r[name].shape == grads[name].shape
        scale = max(1e-8, float(np.abs(grads[name]).max()))
        assert float(np.abs(grads_r[name] - grads[name]).max()) / scale < rtol, name


# The tolerance: a gradient entry is a sum over the B examples (and T glimpses); split
# over ranks, the per-rank sums are scaled by Bk/B and added in another order. Each
# regrouping costs a few float64 eps (1.1e-16) relative to the sum of magnitudes,
# which stays within a few times max|g| here: 1e-12 is a bound with room, not a fit.
RTOL64 = 1e-12


@pytest.mark.parametrize("cfg", [ATT, NOATT], ids=["attention", "no-attention"])
@pytest.mark.parametrize("B,ranks", [(7, 3), (2, 3), (5, 2)],
                         ids=["uneven", "a-rank-without-examples", "two-ranks"])
def test_ranks_sum_to_the_one_process_step_in_float64(B, ranks, cfg):
    params = model.init_params(cfg, seed=1, dtype="float64")
    x, eps = _batch(cfg, B, np.float64)
    want = model.loss_and_grads(params, cfg, x, eps)
    for got in _run_ranks(ranks, lambda comm, rank: _sharded_step(comm, params, cfg, x, eps)):
        _assert_same_step(got, want, RTOL64)


def test_one_buffer_serves_batches_of_any_size_and_new_parameters():
    """The step buffer is made once per run: growing, shrinking and smaller-than-ranks
    batches with new parameters each step still sum to the one-process step. A model of
    other shapes or dtype on the same communicator (the benchmark times two models in
    one run) gets a buffer of its own."""
    cases = [(ATT, 2, 0, "float64"), (ATT, 9, 1, "float64"), (ATT, 1, 2, "float64"),
             (NOATT, 4, 3, "float64"), (NOATT, 5, 4, "float32"), (ATT, 4, 5, "float64")]

    def work(comm, rank):
        results = []
        for cfg, B, seed, dtype in cases:
            params = model.init_params(cfg, seed=seed, dtype=dtype)
            x, eps = _batch(cfg, B, np.dtype(dtype), seed)
            results.append(_sharded_step(comm, params, cfg, x, eps))
        return results
    for per_rank in _run_ranks(3, work):
        for got, (cfg, B, seed, dtype) in zip(per_rank, cases):
            params = model.init_params(cfg, seed=seed, dtype=dtype)
            x, eps = _batch(cfg, B, np.dtype(dtype), seed)
            assert all(g.dtype == np.dtype(dtype) for g in got[1].values())
            _assert_same_step(got, model.loss_and_grads(params, cfg, x, eps),
                              RTOL64 if dtype == "float64" else 1e-3)


def test_float32_ranks_agree_to_float32_precision():
    """The buffer keeps the parameters' dtype: gradients summed in float32 (a few eps of
    6e-8 per regrouped sum), statistics too (a loss of ~30 nats to ~1e-5 relative)."""
    params = model.init_params(ATT, seed=2, dtype="float32")
    x, eps = _batch(ATT, 6, np.float32)
    loss, grads, stats = model.loss_and_grads(params, ATT, x, eps)
    for loss_r, grads_r, stats_r in _run_ranks(
            2, lambda comm, rank: _sharded_step(comm, params, ATT, x, eps)):
        assert loss_r == pytest.approx(loss, rel=1e-5)
        assert stats_r["recon"] == pytest.approx(stats["recon"], rel=1e-5)
        for name in grads:
            assert grads_r[name].dtype == np.float32
            np.testing.assert_allclose(grads_r[name], grads[name], rtol=1e-3,
                                       atol=1e-5 * float(np.abs(grads[name]).max()))


def test_the_single_process_communicator_changes_nothing():
    params = model.init_params(ATT, seed=1, dtype="float32")
    x, eps = _batch(ATT, 4, np.float32)
    result = model.loss_and_grads(params, ATT, x, eps)
    comm = distributed.SingleProcess()
    assert comm.reduce_step(params, ATT.T, result, 1.0) is result
    assert comm.shard(4) == (0, 4) and comm.is_root
    assert comm.sum([1.5, 2.0]).tolist() == [1.5, 2.0]


def test_evaluation_is_sharded_to_the_same_figures():
    params = model.init_params(ATT, seed=1, dtype="float64")
    x = (np.random.default_rng(7).random((11, ATT.D)) < 0.4).astype(np.float64)
    plain_bound = evaluate_lib.evaluate_bound(params, ATT, x, 4, np.random.default_rng(3))
    plain_iwae = evaluate_lib.evaluate_iwae_and_bound(params, ATT, x, 3, 4,
                                                   np.random.default_rng(2))

    def work(comm, rank):
        return (evaluate_lib.evaluate_bound(params, ATT, x, 4, np.random.default_rng(3),
                                         comm=comm),
                evaluate_lib.evaluate_iwae_and_bound(params, ATT, x, 3, 4,
                                                  np.random.default_rng(2), comm=comm))
    for bound, iwae in _run_ranks(3, work):            # batches of 4 over 3 ranks: 1, 2, 1
        assert bound == pytest.approx(plain_bound, rel=RTOL64)
        assert iwae == pytest.approx(plain_iwae, rel=RTOL64)


@pytest.mark.parametrize("signals,want", [({1: signal.SIGINT}, signal.SIGINT),
                                          ({2: signal.SIGTERM}, signal.SIGTERM),
                                          ({0: signal.SIGINT, 1: signal.SIGINT,
                                            2: signal.SIGINT}, signal.SIGINT),
                                          ({0: signal.SIGINT, 2: signal.SIGTERM},
                                           signal.SIGTERM)],
                         ids=["sigint-on-one", "sigterm-on-one", "sigint-on-all", "mixed"])
def test_a_stop_request_of_one_rank_stops_every_rank_at_the_same_reduction(signals, want):
    """Every rank raises Interrupted with the signal one process would report (SIGTERM,
    a scheduler's, wins over SIGINT): the exit status is 130 or 143 as in one process."""
    params = model.init_params(ATT, seed=0, dtype="float64")
    x, eps = _batch(ATT, 4, np.float64)

    def work(comm, rank):
        _sharded_step(comm, params, ATT, x, eps)       # a normal step first
        comm._stop_signum = signals.get(rank, 0)        # what its signal handler sets
        with pytest.raises(distributed.Interrupted) as step:
            _sharded_step(comm, params, ATT, x, eps)
        with pytest.raises(distributed.Interrupted) as evaluation:
            comm.sum([1.0])
        return step.value.signum, evaluation.value.signum
    assert _run_ranks(3, work) == [(want, want)] * 3


def test_a_nan_on_one_rank_reaches_every_rank():
    """Every rank then stops at the same step, as one process does on a NaN loss."""
    params = model.init_params(ATT, seed=0, dtype="float32")
    x, eps = _batch(ATT, 4, np.float32)

    def work(comm, rank):
        lo, hi = comm.shard(4)
        loss, grads, stats = model.loss_and_grads(params, ATT, x[lo:hi],
                                                  np.ascontiguousarray(eps[:, lo:hi]))
        if rank == 1:
            grads = {**grads, "c0": grads["c0"] * np.float32("nan")}
            loss = float("nan")
        loss, grads, _ = comm.reduce_step(params, ATT.T, (loss, grads, stats), 0.5)
        return np.isnan(loss), bool(np.isnan(grads["c0"]).all())
    assert _run_ranks(2, work) == [(True, True), (True, True)]


def test_the_environment_decides_between_one_process_and_mpi(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    assert type(distributed.from_environment()) is distributed.SingleProcess
    monkeypatch.setenv("PMI_SIZE", "1")                    # mpiexec -n 1: no MPI needed
    assert type(distributed.from_environment()) is distributed.SingleProcess
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)       # as if it were not installed
    with pytest.raises(ValueError, match=r"started as 2 MPI ranks, but mpi4py cannot be "
                                         r"imported.*pip install -e \"\.\[mpi\]\""):
        distributed.from_environment()


def test_ctrl_c_under_mpi_only_requests_a_stop_and_a_second_one_interrupts(monkeypatch):
    comm = distributed.MPIRanks(_Group(1).comm(0), _FakeMPI)
    previous = signal.getsignal(signal.SIGINT)
    now = [100.0]
    monkeypatch.setattr(distributed.time, "monotonic", lambda: now[0])
    with comm.deferred_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        assert comm._stop_signum == signal.SIGTERM       # no KeyboardInterrupt yet
        now[0] += distributed.SAME_REQUEST_S / 2
        os.kill(os.getpid(), signal.SIGTERM)             # the same request, delivered twice
        assert comm._stop_signum == signal.SIGTERM
        now[0] += distributed.SAME_REQUEST_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_signal_noted_before_the_loop_is_carried_into_the_first_reduction():
    """While the run folder is prepared the run's StopSignals note a signal; under MPI
    it must reach every rank through a reduction, not stop this rank alone."""
    comm = distributed.MPIRanks(_Group(1).comm(0), _FakeMPI)
    with guards.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with comm.deferred_interrupts(stop):
            stop.check()                                  # taken over: nothing raised here
            with pytest.raises(distributed.Interrupted) as info:
                comm.sum([0.0])
    assert info.value.signum == signal.SIGTERM


@pytest.fixture
def early_noting():
    """note_signals_until_handled in this process; the handlers as they were afterwards."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    guards.note_signals_until_handled()
    yield
    guards.take_early_signal()
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_a_signal_while_a_rank_starts_is_noted_and_the_run_takes_it_over(early_noting):
    """A rank's Ctrl-C or SIGTERM while it still imports (issue 25: 8 of 9 such runs hung)
    is only noted; the run's StopSignals take it, and the default handlers are back."""
    os.kill(os.getpid(), signal.SIGTERM)                  # would end this process unnoted
    os.kill(os.getpid(), signal.SIGINT)                   # a forwarded copy: no interrupt
    with guards.StopSignals() as stop:
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert guards.take_early_signal() is None


def test_a_signal_while_a_rank_starts_reaches_every_rank_at_the_first_reduction(early_noting):
    """Without a run's StopSignals (evaluate), the ranks' deferred stop takes it over."""
    os.kill(os.getpid(), signal.SIGINT)
    comm = distributed.MPIRanks(_Group(1).comm(0), _FakeMPI)
    with comm.deferred_interrupts():
        with pytest.raises(distributed.Interrupted) as info:
            comm.sum([0.0])
    assert info.value.signum == signal.SIGINT


def test_a_second_ctrl_c_while_a_rank_starts_interrupts(early_noting, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(guards.time, "monotonic", lambda: now[0])
    os.kill(os.getpid(), signal.SIGINT)
    now[0] += guards.SAME_REQUEST_S + 0.1
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_ending_every_rank_is_nothing_in_one_process():
    distributed.end_every_rank(130)                       # returns: no MPI here


def test_small_collectives():
    def work(comm, rank):
        text = comm.broadcast_text("runs/draw-2" if rank == 0 else "")
        comm.check_same(2.5, "a figure")
        with pytest.raises(RuntimeError, match="the ranks disagree on the norm"):
            comm.check_same(float(rank), "the norm")
        return text, comm.sum([rank, 1.0]).tolist()
    assert _run_ranks(3, work) == [("runs/draw-2", [3.0, 3.0])] * 3


def test_abort_prints_one_line_and_calls_mpi_abort(capsys, monkeypatch):
    group = _Group(2)
    comm = distributed.MPIRanks(group.comm(1), _FakeMPI)
    monkeypatch.setattr(distributed.os, "_exit", lambda code: None)
    comm.abort("RuntimeError: boom")
    assert capsys.readouterr().err == "Error: rank 1 of 2: RuntimeError: boom\n"
    assert group.aborted == [(1, 1)]


def test_shards_and_the_launchers_rank_count():
    assert distributed.shard_bounds(7, 3) == [0, 2, 5, 7]
    assert distributed.shard_bounds(2, 3) == [0, 1, 1, 2]
    assert distributed.launched_ranks({}) == 1
    assert distributed.launched_ranks({"PMI_SIZE": "4"}) == 4
    assert distributed.launched_ranks({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert distributed.launched_ranks({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8"}) == 8
    assert distributed.launched_ranks({"SLURM_NTASKS": "8"}) == 1      # an sbatch script


def test_the_rank_count_must_be_the_launchers(tmp_path):
    comm = distributed.MPIRanks(_Group(2).comm(0), _FakeMPI)
    tcfg = TrainConfig(epochs=1, device="cpu", ranks=3, out=str(tmp_path))
    with pytest.raises(ValueError, match=r"ranks = 3, but the launcher started 2: give 0 "):
        train_lib.train(ATT, tcfg, log=lambda *a: None, comm=comm,
                        data=types.SimpleNamespace(shape=(1, 6, 7)))
    with pytest.raises(ValueError, match=r"ranks = 2 needs 2 MPI ranks, and this is one "
                                         r"process.*mpiexec -n 2"):
        distributed.check_rank_count(2, distributed.SingleProcess())
    for ranks, comm_ in ((0, comm), (2, comm), (0, distributed.SingleProcess()),
                         (1, distributed.SingleProcess())):
        distributed.check_rank_count(ranks, comm_)       # these fit
    with pytest.raises(ValueError, match="ranks must be 0"):
        TrainConfig(ranks=-1)


# ---------------------------------------------------------------- starting ranks on one machine

def test_the_automatic_rank_count():
    assert distributed.auto_ranks(100, cores=2) == 2
    assert distributed.auto_ranks(100, cores=8) == 3            # at least 32 examples each
    assert distributed.auto_ranks(40, cores=8) == 1
    assert distributed.auto_ranks(10 ** 6, cores=8) == 8
    assert distributed.auto_ranks(1, cores=4) == 1
    assert distributed.auto_ranks(10 ** 6) == distributed.usable_cores()
    assert distributed.resolve_ranks(0, "gpu", 10 ** 6) == 1     # one rank per GPU
    assert distributed.resolve_ranks(3, "cpu", 10) == 3          # an explicit count stands
    with pytest.raises(ValueError, match="ranks must be 0"):
        distributed.resolve_ranks(-1, "cpu", 100)


def test_the_launch_plan(monkeypatch):
    monkeypatch.setattr(distributed, "usable_cores", lambda: 4)
    monkeypatch.setattr(distributed, "mpi_available", lambda: True)
    monkeypatch.setattr(distributed, "find_mpiexec", lambda: "/opt/mpich/bin/mpiexec")
    assert distributed.launch_plan(0, "cpu", 128, {}) == (4, "/opt/mpich/bin/mpiexec", None)
    assert distributed.launch_plan(0, "cpu", 50, {}) == (1, None, None)
    assert distributed.launch_plan(1, "cpu", 128, {}) == (1, None, None)
    assert distributed.launch_plan(0, "gpu", 128, {}) == (1, None, None)
    assert distributed.launch_plan(2, "gpu", 128, {}) == (2, "/opt/mpich/bin/mpiexec", None)
    assert distributed.launch_plan(16, "cpu", 128, {})[0] == 16      # 4 a core: shared
    with pytest.raises(ValueError, match=r"^ranks = 1000000000000 would start 1000000000000 "
                                         r"processes on this machine's 4 cores; ask for at "
                                         r"most 16, or start"):
        distributed.launch_plan(10 ** 12, "cpu", 128, {})
    assert distributed.launch_plan(10 ** 12, "cpu", 128, {"PMI_SIZE": "2"}) == (1, None, None)
    for launched in ({"PMI_SIZE": "1"}, {"OMPI_COMM_WORLD_SIZE": "2"}, {"SLURM_STEP_ID": "0"},
                     {distributed.LAUNCHED_VARIABLE: "4"}):
        assert distributed.launch_plan(0, "cpu", 128, launched) == (1, None, None), launched

    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    argv, environ = distributed.launch_command(3, "/opt/mpich/bin/mpiexec", "cli.py",
                                               ["train", "--bs", "96"])
    assert argv == ["/opt/mpich/bin/mpiexec", "-launcher", "fork", "-n", "3", sys.executable,
                    os.path.abspath("cli.py"), "train", "--bs", "96"]
    assert environ[distributed.LAUNCHED_VARIABLE] == "3"
    assert environ["OMP_NUM_THREADS"] == "1"                    # 4 cores over 3 ranks
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert distributed.launch_command(2, "mpiexec", "cli.py", [])[1]["OPENBLAS_NUM_THREADS"] \
        == "2"                                                  # the user's choice stands
    assert distributed.launch_command(2, "mpiexec", ["-m", "npdraw"], ["train"])[0][4:] == \
        ["2", sys.executable, "-m", "npdraw", "train"]          # python -m npdraw starts again
    assert distributed.under_launcher(environ)                  # the ranks never launch again

    monkeypatch.setattr(distributed, "mpi_available", lambda: False)
    count, mpiexec, note = distributed.launch_plan(0, "cpu", 128, {})
    assert (count, mpiexec) == (1, None)
    assert note == ("note: one process on 4 cores; for one MPI rank per core install mpi4py "
                    "and MPICH's mpiexec: pip install -e \".[mpi]\"")
    with pytest.raises(ValueError, match=r"ranks = 2 needs mpi4py and MPICH's mpiexec; "
                                         r"install them with: pip install -e \"\.\[mpi\]\""):
        distributed.launch_plan(2, "cpu", 128, {})


# ---------------------------------------------------------------- the NCCL path, on stand-ins

class _FakeNccl:
    """cupy.cuda.nccl as CuPy 14 has it (the id as 128 bytes), or as older CuPy (a tuple of
    signed chars); each refuses the other's form with a TypeError, as CuPy does."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    ID = bytes(range(64, 192))                          # crosses 127: signed and unsigned differ

    def __init__(self, takes_bytes=True):
        self.takes_bytes = takes_bytes
        self.made = []

    def get_unique_id(self):
        return self.ID if self.takes_bytes else tuple(b - 256 if b > 127 else b for b in self.ID)

    def NcclCommunicator(self, size, unique_id, rank):
        if not isinstance(unique_id, bytes if self.takes_bytes else tuple):
            raise TypeError("Argument 'commId' has incorrect type")
        self.made.append((size, bytes(v % 256 for v in unique_id), rank))
        return ("nccl", rank)


@pytest.mark.parametrize("takes_bytes", [True, False])
def test_nccl_id_travels_as_signed_chars_and_reaches_either_cupy_form(monkeypatch, takes_bytes):
    """The id crosses MPI as int8 (any value of either form fits) and reaches NCCL intact."""
    fake = _FakeNccl(takes_bytes)
    monkeypatch.setattr(backend, "_nccl", lambda: fake)
    sent = np.zeros(backend.NCCL_UNIQUE_ID_BYTES, dtype=np.int8)
    sent[:] = backend.nccl_unique_id()
    backend.nccl_communicator(2, sent, 1)
    assert fake.made == [(2, _FakeNccl.ID, 1)]


def test_nccl_ranks_bootstrap_over_mpi_and_sum_on_the_device_buffer(monkeypatch):
    """One GPU per rank by local rank, NCCL's id from rank 0, the flat buffer summed by
    NCCL (here a stand-in that sums the ranks' buffers) and equal to one process."""
    fake = _FakeNccl()
    used, group = [], {}
    monkeypatch.setattr(backend, "gpu_count", lambda: 2)
    monkeypatch.setattr(backend, "use_gpu", used.append)
    monkeypatch.setattr(backend, "_nccl", lambda: fake)

    def nccl_sum(communicator, flat):                   # the device all-reduce, on threads
        group["comms"][communicator[1]].Allreduce(_FakeMPI.IN_PLACE, flat, op=_FakeMPI.SUM)
        group["reduced"] = flat.size
    monkeypatch.setattr(backend, "nccl_allreduce_sum", nccl_sum)

    def make(comm, rank):
        group.setdefault("comms", {})[rank] = _FakeComm(comm.group, rank)
        return distributed.MPIRanks(comm, _FakeMPI, local_rank=rank).for_device("gpu")

    params = model.init_params(ATT, seed=1, dtype="float64")
    x, eps = _batch(ATT, 5, np.float64)
    want = model.loss_and_grads(params, ATT, x, eps)
    results = _run_ranks(2, lambda comm, rank: (type(comm).__name__,
                                                _sharded_step(comm, params, ATT, x, eps)),
                         make)
    for name, got in results:
        assert name == "NCCLRanks"
        _assert_same_step(got, want, RTOL64)
    assert sorted(used) == [0, 1]
    assert sorted(fake.made) == [(2, _FakeNccl.ID, 0), (2, _FakeNccl.ID, 1)]
    P = sum(v.size for v in params.values())
    assert group["reduced"] == P + 3 + ATT.T           # one buffer: gradients and statistics


def test_a_rank_without_its_own_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(backend, "gpu_count", lambda: 1)
    with pytest.raises(ValueError, match="start one rank per GPU"):
        distributed.NCCLRanks(_Group(2).comm(1), _FakeMPI, local_rank=1)


def test_nccl_allreduce_sum_calls_nccl_in_place_on_the_current_stream(monkeypatch):
    calls = []
    fake = _FakeNccl()
    stream = types.SimpleNamespace(ptr=1234)
    monkeypatch.setattr(backend, "_nccl", lambda: fake)
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(
        cuda=types.SimpleNamespace(get_current_stream=lambda: stream)))

    class DeviceArray:          # what the call reads of a CuPy array
        def __init__(self, dtype, contiguous=True):
            self.dtype, self.size = np.dtype(dtype), 10
            self.flags = types.SimpleNamespace(c_contiguous=contiguous)
            self.data = types.SimpleNamespace(ptr=99)
    communicator = types.SimpleNamespace(allReduce=lambda *args: calls.append(args))
    backend.nccl_allreduce_sum(communicator, DeviceArray("float32"))
    backend.nccl_allreduce_sum(communicator, DeviceArray("float64"))
    assert calls == [(99, 99, 10, 7, 0, 1234), (99, 99, 10, 8, 0, 1234)]
    with pytest.raises(ValueError, match="contiguous float32/float64"):
        backend.nccl_allreduce_sum(communicator, DeviceArray("float16"))
    with pytest.raises(ValueError, match="contiguous float32/float64"):
        backend.nccl_allreduce_sum(communicator, DeviceArray("float32", contiguous=False))


# ---------------------------------------------------------------- real MPI: mpiexec -n N

def _mpiexec():
    """The mpiexec of the mpich wheel, next to this Python (not whatever PATH finds)."""
    if not distributed.mpi_available():     # the README's install has it: never a skip
        pytest.fail("the MPI tests need mpi4py and the mpich wheel: pip install -e \".[mpi]\"")
    path = Path(sys.executable).parent / "mpiexec"
    if not path.is_file():
        pytest.fail(f"mpi4py is installed but there is no mpiexec next to {sys.executable}; "
                    "install the mpich wheel: pip install -e \".[mpi]\"")
    return str(path)


def _run_mpi(ranks, args, timeout=180):
    """`mpiexec -n ranks python args...` from the repository root, one BLAS thread per
    rank. The timeout only keeps a hang from stalling the suite; a hang fails."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    before, started = launcher._segments_now(), time.time()
    try:
        return subprocess.run([_mpiexec(), "-n", str(ranks), sys.executable, *map(str, args)],
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    finally:    # a rank that aborts leaves MPICH's segment (2 MB) in /dev/shm: remove it
        launcher.Launcher([], {}).remove_leftover_segments(before, started)


_STEP_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from npdraw import distributed, evaluate as evaluate_lib, model
from npdraw.config import DrawConfig
cfg, inputs, out = DrawConfig.from_dict(json.loads(sys.argv[2])), np.load(sys.argv[3]), sys.argv[4]
params = {k[2:]: inputs[k] for k in inputs.files if k.startswith("p:")}
x, eps = inputs["x"], inputs["eps"]
comm = distributed.from_environment()
lo, hi = comm.shard(x.shape[0])
mine = model.loss_and_grads(params, cfg, x[lo:hi], np.ascontiguousarray(eps[:, lo:hi]))
loss, grads, stats = comm.reduce_step(params, cfg.T, mine, (hi - lo) / x.shape[0])
bound = evaluate_lib.evaluate_bound(params, cfg, x, 4, np.random.default_rng(3), comm=comm)
iwae = evaluate_lib.evaluate_iwae_and_bound(params, cfg, x, 3, 4, np.random.default_rng(2), comm=comm)
if comm.rank == 0:
    np.savez(out, loss=loss, recon=stats["recon"], kl=stats["kl"], bound=bound, iwae=iwae,
             size=comm.size, **{"g:" + k: v for k, v in grads.items()})
"""


def test_mpiexec_ranks_give_the_one_process_loss_gradients_and_bounds(tmp_path):
    """Three ranks (more than CI's two cores) over a batch of 7, in float64."""
    params = model.init_params(ATT, seed=1, dtype="float64")
    x, eps = _batch(ATT, 7, np.float64)
    np.savez(tmp_path / "inputs.npz", x=x, eps=eps, **{"p:" + k: v for k, v in params.items()})
    result = _run_mpi(3, ["-c", _STEP_SCRIPT, REPO, json.dumps(ATT.to_dict()),
                          tmp_path / "inputs.npz", tmp_path / "out.npz"])
    assert result.returncode == 0, result.stderr
    got = np.load(tmp_path / "out.npz")
    assert int(got["size"]) == 3
    grads = {k[2:]: got[k] for k in got.files if k.startswith("g:")}
    _assert_same_step((float(got["loss"]), grads, {"recon": float(got["recon"]), "kl": got["kl"]}),
                      model.loss_and_grads(params, ATT, x, eps), RTOL64)
    assert float(got["bound"]) == pytest.approx(
        evaluate_lib.evaluate_bound(params, ATT, x, 4, np.random.default_rng(3)), rel=RTOL64)
    np.testing.assert_allclose(got["iwae"], evaluate_lib.evaluate_iwae_and_bound(
        params, ATT, x, 3, 4, np.random.default_rng(2)), rtol=RTOL64)


# The paper's attention layout (read 2x2, write 5x5) at toy sizes; 200 images in batches
# of 45 (the last one 20), so shards are uneven: 22 and 23 examples.
TINY = DrawConfig(T=3, read_n=2, write_n=5, enc_dim=16, dec_dim=16, z_dim=4)
TRAIN_ARGS = ["--niter", 3, "--attention", "2,5", "--enc-dim", 16, "--dec-dim", 16,
              "--z-dim", 4, "--bs", 45, "--subset", 200, "--eval-subset", 200, "--seed", 3,
              "--device", "cpu", "--no-progress"]

# A CLI run whose rank 1 misbehaves at its n-th model call (1-based), as a failing rank
# would: "raise" an exception, "kill" itself, or receive Ctrl-C ("interrupt").
_FAULTY_RANK = """
import os, runpy, signal, sys
sys.path.insert(0, sys.argv[1])
from npdraw import model
how, at = sys.argv[2], int(sys.argv[3])
if os.environ.get("PMI_RANK") == "1":
    real, calls = model.loss_and_grads, [0]
    def faulty(*args):
        calls[0] += 1
        if calls[0] == at:
            if how == "raise":
                raise RuntimeError("injected failure")
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGINT)
        return real(*args)
    model.loss_and_grads = faulty
sys.argv = [os.path.join(sys.argv[1], "cli.py")] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
STEPS_PER_EPOCH = 5                       # 200 images in batches of 45


def _train_args(data_args, out, name, epochs):
    return ["train", *TRAIN_ARGS, *data_args, "--out", out, "--name", name, "--epochs", epochs]


@pytest.fixture
def data_args(bmnist_data_dir, bmnist_mirror):
    return ["--data-dir", bmnist_data_dir, "--mirror", bmnist_mirror]


@pytest.fixture(scope="module")
def mpi_run(bmnist_data_dir, bmnist_mirror, tmp_path_factory):
    """Two epochs through `mpiexec -n 2 python cli.py train --attention 2,5 ...`."""
    out = tmp_path_factory.mktemp("mpi")
    args = _train_args(["--data-dir", bmnist_data_dir, "--mirror", bmnist_mirror], out,
                       "straight", 2)
    result = _run_mpi(2, [REPO / "cli.py", *args])
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "straight", result.stdout


def test_two_ranks_train_the_one_process_model(mpi_run, bmnist, tmp_path):
    run, stdout = mpi_run
    assert "(2 MPI ranks)" in stdout
    assert stdout.count("run dir:") == 1 and stdout.count("done:") == 1   # rank 0 alone
    one = train_lib.train(TINY, TrainConfig(epochs=2, batch_size=45, subset=200,
                                            eval_subset=200, seed=3, device="cpu",
                                            out=str(tmp_path), name="one"),
                          log=lambda *a: None, data=bmnist, progress=False)
    rows, rows_one = runs_lib.read_log(run), runs_lib.read_log(one)
    assert [r["epoch"] for r in rows] == [1, 2]
    # float32 sums regrouped (a few eps, 6e-8, per step), then carried through 10 Adam
    # steps of a recurrent model
    for row, row_one in zip(rows, rows_one):
        assert row["step"] == row_one["step"] == row["epoch"] * STEPS_PER_EPOCH
        for key in ("train_bound", "train_recon", "valid_bound", "test_bound", "grad_norm",
                    "step_norm"):
            assert row[key] == pytest.approx(row_one[key], rel=1e-4), key
        np.testing.assert_allclose(row["kl"], row_one["kl"], rtol=1e-3, atol=1e-4)
    a = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    b = ckpt_lib.load_checkpoint(one / "checkpoint.h5")
    assert a.rng_state == b.rng_state          # the same draws: order and noise
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-3, atol=1e-4,
                                   err_msg=name)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in one.iterdir())


def test_ctrl_c_on_one_rank_stops_all_and_the_resume_under_mpi_is_exact(mpi_run, data_args,
                                                                         tmp_path):
    straight, _ = mpi_run
    at = STEPS_PER_EPOCH + 2                                # epoch 2, step 2
    stopped = _run_mpi(2, ["-c", _FAULTY_RANK, REPO, "interrupt", at,
                           *_train_args(data_args, tmp_path, "stopped", 2)])
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "interrupted in epoch 2" in stopped.stdout and "--resume" in stopped.stdout
    run = tmp_path / "stopped"
    assert ckpt_lib.load_checkpoint(run / "checkpoint.h5").epoch == 1
    resumed = _run_mpi(2, [REPO / "cli.py", "train", "--resume", run, "--epochs", 2,
                           "--no-progress", *data_args])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = ckpt_lib.load_checkpoint(straight / "checkpoint.h5")
    b = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    assert a.epoch == b.epoch == 2 and a.rng_state == b.rng_state
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
        assert np.array_equal(a.opt_state["m"][name], b.opt_state["m"][name]), name
        assert np.array_equal(a.opt_state["v"][name], b.opt_state["v"][name]), name
    for ra, rb in zip(runs_lib.read_log(straight), runs_lib.read_log(run)):
        for key in ("train_bound", "valid_bound", "test_bound", "kl", "grad_norm", "step_norm"):
            assert ra[key] == rb[key], key


# A CLI run whose rank 0 alone fails before the epoch loop: the save of epoch 0 (a full
# disk, as on a small tmpfs) or the write of config.json (a folder in its place).
_ROOT_FAILS_EARLY = """
import os, runpy, sys
sys.path.insert(0, sys.argv[1])
from npdraw import runs
if os.environ.get("PMI_RANK") == "0":
    def full(path, *args, **kwargs):
        raise runs.WriteFailed(f"no space left on the disk while saving {path}")
    runs.save_state = full
sys.argv = [os.path.join(sys.argv[1], "cli.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_rank_0_failing_alone_before_the_loop_ends_every_rank(data_args, bmnist, tmp_path):
    """Issue 25, item 1: rank 0 stopped before the loop while rank 1 waited in its first
    all-reduce, and the job hung until killed (seen past 300 s)."""
    result = _run_mpi(2, ["-c", _ROOT_FAILS_EARLY, REPO,
                          *_train_args(data_args, tmp_path, "early", 2)], timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(l for l in result.stderr.splitlines() if l.startswith("Error: rank 0 of 2"))
    assert "no space left on the disk while saving" in line
    assert "epoch 1/2" not in result.stdout
    # A resume whose config.json is a folder fails on rank 0 alone too.
    run = train_lib.train(TINY, TrainConfig(epochs=1, batch_size=45, subset=200,
                                            eval_subset=200, seed=3, device="cpu",
                                            out=str(tmp_path), name="one"),
                          log=lambda *a: None, data=bmnist, progress=False)
    (run / "config.json").unlink()
    (run / "config.json").mkdir()
    resumed = _run_mpi(2, [REPO / "cli.py", "train", "--resume", run, "--epochs", 2,
                           "--no-progress", *data_args], timeout=60)
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    assert any(l.startswith("Error: rank 0 of 2") and "config.json" in l
               for l in resumed.stderr.splitlines()), resumed.stderr


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_every_rank_and_keeps_the_last_checkpoint(how, data_args,
                                                                       tmp_path):
    result = _run_mpi(2, ["-c", _FAULTY_RANK, REPO, how, STEPS_PER_EPOCH + 2,
                          *_train_args(data_args, tmp_path, "run", 3)], timeout=120)
    assert result.returncode != 0
    if how == "raise":
        line = next(l for l in result.stderr.splitlines() if l.startswith("Error: rank 1 of 2"))
        assert "RuntimeError: injected failure (in epoch 2); stopping every rank." in line
        assert "holds the last completed epoch (epoch 1)" in line and "--resume" in line
    assert "epoch 2/3" not in result.stdout and "done:" not in result.stdout
    assert ckpt_lib.load_checkpoint(tmp_path / "run" / "checkpoint.h5").epoch == 1
    assert len(runs_lib.read_log(tmp_path / "run")) == 1


def test_a_rank_count_that_is_not_the_launchers_is_one_error_line(tmp_path):
    result = _run_mpi(2, [REPO / "cli.py", "train", "--ranks", 3, "--out", tmp_path])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: ranks = 3, but the launcher started 2: give 0 (take the launcher's count) or 2"]
    assert list(tmp_path.iterdir()) == []                  # before anything was written


def _cli(args, timeout=180, program=("cli.py",), **kw):
    """`python cli.py args...` (or `python -m npdraw args...`: program ("-m", "npdraw")) as
    a user runs it: on a multi-core CPU (or with --ranks N) it starts itself as MPI ranks,
    the way it was started."""
    _mpiexec()                                    # the MPI extra must be there
    program = [REPO / "cli.py"] if program == ("cli.py",) else list(program)
    return subprocess.run([sys.executable, *program, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **kw)


def test_evaluate_starts_its_ranks_and_gives_the_one_process_figures(mpi_run, data_args):
    run, _ = mpi_run
    args = ["evaluate", run / "checkpoint.h5", "--k", 3, "--subset", 90, "--bs", 40,
            "--json", *data_args]
    shared = _cli([*args, "--ranks", 2])                  # starts mpiexec -n 2 itself
    assert shared.returncode == 0, shared.stdout + shared.stderr
    lines = shared.stdout.strip().splitlines()
    assert len(lines) == 1                                 # rank 0 alone prints
    one = _cli([*args, "--ranks", 1])
    assert one.returncode == 0, one.stderr
    got, want = json.loads(lines[0]), json.loads(one.stdout.strip().splitlines()[-1])
    assert (got["ranks"], want["ranks"]) == (2, 1)
    # float32 forwards of sub-batches (GEMMs of other widths round otherwise, a few eps of
    # 6e-8 per glimpse), float64 sums
    for key in ("nll_bound", "nll_iwae"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["n"] == want["n"] == 90
    module = _cli([*args, "--ranks", 2], program=("-m", "npdraw"))   # python -m npdraw: alike
    assert module.returncode == 0, module.stdout + module.stderr
    assert json.loads(module.stdout.strip().splitlines()[-1]) == got


# ---------------------------------------------------------------- stopping a self-started run

def _start_training(args, **kw):
    """`python cli.py train args...` in the background; -> (process, lines read up to
    the end of epoch 2)."""
    _mpiexec()
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 2/"):
            break
    return proc, lines


def _stopped(proc, lines, send):
    """send(proc) a signal, -> (exit status, the whole output)."""
    try:
        send(proc)
        lines += proc.stdout.readlines()
        return proc.wait(timeout=120), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("how", ["sigint-to-the-pid", "sigterm-to-the-group"])
def test_a_signal_to_the_self_started_training_stops_it_as_one_process(how, data_args, bmnist,
                                                                       tmp_path):
    """`python cli.py train` started `mpiexec -n 2 ...` under npdraw.launcher, which stays
    the pid the user sees; Ctrl-C (SIGINT to that pid, as a campaign sends it) and SIGTERM
    (to the whole group, as schedulers send it) reach every rank: the run stops at one
    step, exits 130 or 143, keeps the checkpoint and log of its last completed epoch, and
    resumes."""
    sigint = how.startswith("sigint")
    proc, lines = _start_training([*_train_args(data_args, tmp_path, "run", 1000),
                                   "--ranks", 2], start_new_session=True)
    if Path("/proc/self/stat").exists():             # Linux: the pid is mpiexec's parent
        assert any(b"mpiexec" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
                   for child in launcher._children(proc.pid))
    code, output = _stopped(proc, lines, (lambda p: os.kill(p.pid, signal.SIGINT)) if sigint
                            else (lambda p: os.killpg(p.pid, signal.SIGTERM)))
    assert code == (130 if sigint else 143), output
    assert "(2 MPI ranks)" in output and output.count("run dir:") == 1
    assert ("interrupted in epoch" if sigint else "interrupted by SIGTERM in epoch") in output
    assert "Traceback" not in output and "--resume" in output
    run = tmp_path / "run"
    epoch = ckpt_lib.load_checkpoint(run / "checkpoint.h5").epoch
    assert epoch >= 2 and [r["epoch"] for r in runs_lib.read_log(run)] == list(range(1, epoch + 1))
    train_lib.train(None, TrainConfig(epochs=epoch + 1, device="cpu", resume=str(run)),
                    log=lambda *a: None, data=bmnist, progress=False)
    assert [r["epoch"] for r in runs_lib.read_log(run)] == list(range(1, epoch + 2))


def _rank_pids(root: int) -> list:
    """The processes below ``root`` (mpiexec and its proxies) that run cli.py: the ranks."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if b"cli.py" not in entry.joinpath("cmdline").read_bytes() or \
                    b"mpiexec" in entry.joinpath("cmdline").read_bytes().split(b"\0")[0]:
                continue
            pid = parent = int(entry.name)
            for _ in range(4):
                parent = int((Path("/proc") / str(parent) / "stat").read_text()
                             .rsplit(")", 1)[1].split()[1])
                if parent == root:
                    found.append(pid)
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_ctrl_c_while_the_ranks_still_import_stops_them_as_one_process(data_args, tmp_path):
    """SIGINT to the run's pid a moment after its ranks have started, while they import
    NumPy (issue 25: it hung, or ended in MPICH's "BAD TERMINATION" banner): every rank
    noted it and stops at its first reduction, exit 130, one sentence."""
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"),
                             *map(str, _train_args(data_args, tmp_path, "early", 3)),
                             "--ranks", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _mpiexec()
    try:
        deadline = time.monotonic() + 60
        while len(_rank_pids(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(_rank_pids(proc.pid)) == 2, "the two ranks did not start"
        time.sleep(0.2)                  # past the interpreter's own start, in the imports
        os.kill(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output, output
    assert "BAD TERMINATION" not in output and "Aborted!" not in output, output


# ---------------------------------------------------------------- a rank that dies (npdraw.launcher)

def _wait_for(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def signal_once_ranks_run(proc, signum, ranks_up, settle):
    """Once ranks_up() (or proc ended), ``settle`` seconds more, then signum to proc ->
    (its output, the seconds it took to end after the signal). Its process group is
    killed if it outlives the wait."""
    try:
        _wait_for(lambda: ranks_up() or proc.poll() is not None, "the ranks did not start",
                  timeout=120)
        time.sleep(settle)
        os.kill(proc.pid, signum)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        return output, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("rank", [1, 0])
def test_a_killed_rank_ends_the_job_in_one_sentence_and_leaves_no_shared_memory(
        rank, data_args, tmp_path):
    """Issue 25, item 3: kill -9 of a rank printed MPICH's 9-line "BAD TERMINATION"
    banner, exited 9 and left its 2 MB /dev/shm/mpich_shm_* segment behind each time."""
    proc, lines = _start_training([*_train_args(data_args, tmp_path, "run", 1000),
                                   "--ranks", 2], start_new_session=True)
    try:
        ranks = {launcher._rank_of(pid): pid for pid in _rank_pids(proc.pid)}
        assert sorted(ranks) == [0, 1], ranks
        segments = set().union(*(launcher._mapped_segments(pid) for pid in ranks.values()))
        assert segments, "MPICH's shared memory was not found"
        os.kill(ranks[rank], signal.SIGKILL)
        killed = time.monotonic()
        lines += proc.stdout.readlines()
        code = proc.wait(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    assert code == 1, output
    assert took < 15, took
    epoch = ckpt_lib.load_checkpoint(tmp_path / "run" / "checkpoint.h5").epoch
    assert epoch >= 1
    # mpiexec's banner says how the rank ended; when the other rank's MPI failure comes
    # first there is none, and the signal is known only if the launcher saw the zombie
    errors = [l for l in output.splitlines() if l.startswith("Error")]
    assert len(errors) == 1, output
    assert re.fullmatch(
        rf"Error: rank {rank} was (killed \(SIGKILL, signal 9\)|killed or crashed); the run "
        rf"stops; the last checkpoint \(epoch {epoch}\) is intact: resume with --resume "
        + re.escape(str(tmp_path / "run")), errors[0]), errors[0]
    for banner in ("BAD TERMINATION", "=====", "YOUR APPLICATION", "FAQ", "Traceback",
                   "Abort(", "error stack"):
        assert banner not in output, output
    assert not [name for name in segments if (launcher.SHM_DIR / name).exists()]
    assert not _rank_pids(proc.pid) and not launcher._children(proc.pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_ranks_exist_still_stops_them(signum, data_args, tmp_path):
    """SIGINT or SIGTERM to the run's pid just after it started mpiexec, before the ranks
    are spawned: mpiexec passes a signal only to the ranks it has, so the run went on
    training; the launcher holds it for each rank until the rank notes signals."""
    _mpiexec()
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"),
                             *map(str, _train_args(data_args, tmp_path, "early", 1000)),
                             "--ranks", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        def cmdline(pid):
            try:
                return Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return b""

        def started():                       # mpiexec -launcher fork ... (not --version)
            return proc.poll() is not None or any(
                b"-launcher" in cmdline(child) for child in launcher._children(proc.pid))
        _wait_for(started, "mpiexec did not start")
        os.kill(proc.pid, signum)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, output
    assert "interrupted" in output and "Traceback" not in output, output
    assert "epoch 2/" not in output and "BAD TERMINATION" not in output, output


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_two_rank_evaluate_at_once(signum, mpi_run, data_args):
    """Issue 25, item 2: `evaluate --ranks 2` noted a Ctrl-C in its ranks and never acted
    on it (its ranks reduce only at the end): it ran on to the end and exited 0."""
    run, _ = mpi_run
    _mpiexec()
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "evaluate",
                             str(run / "checkpoint.h5"), "--k", "500", "--ranks", "2",
                             *map(str, data_args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, took = signal_once_ranks_run(proc, signum, lambda: len(_rank_pids(proc.pid)) == 2,
                                         settle=1.0)
    assert proc.returncode == 128 + signum, output
    assert took < 15, took
    assert output.splitlines().count("interrupted") == 1, output
    for noise in ("Traceback", "NLL bound", "BAD TERMINATION", "Abort("):
        assert noise not in output, output


def test_the_launcher_drops_mpichs_banner_and_keeps_everything_else():
    report = launcher.Launcher([], {})
    filt = launcher.OutputFilter(report)
    banner = (b"epoch 3/9 done\n\n" + b"=" * 83 + b"\n"
              b"=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\n"
              b"=   PID 4242 RUNNING AT vm\n=   EXIT CODE: 9\n"
              b"=   CLEANING UP REMAINING PROCESSES\n"
              b"=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES\n" + b"=" * 83 + b"\n"
              b"YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)\n"
              b"This typically refers to a problem with your application.\n"
              b"Please see the FAQ page for debugging suggestions\n")
    out = b"".join(filt.feed(banner[i:i + 7]) for i in range(0, len(banner), 7)) + filt.finish()
    assert out == b"epoch 3/9 done\n"
    assert (report.saw_banner, report.banner_pid, report.banner_code) == (True, 4242, 9)
    assert report.exit_string == "Killed (signal 9)"
    report.ranks = {4242: 1}
    assert report._dead_rank() == (1, 9, 9)
    # a run dir is noted; a progress bar's partial line passes at once; blank lines and
    # an ordinary traceback pass whole
    other = launcher.OutputFilter(report)
    assert other.feed(b"run dir: /r/x\n") == b"run dir: /r/x\n" and report.run_dir == "/r/x"
    assert other.feed(b"\r 40% |####") == b"\r 40% |####"
    assert other.feed(b"## |\n\nnext\n") == b"## |\n\nnext\n"
    trace = b"Traceback (most recent call last):\n  File \"x\", line 1\nValueError: bad\n"
    assert other.feed(trace) == trace
    # a rank's KeyboardInterrupt traceback is dropped once a signal was passed on
    report.signals = [signal.SIGINT]
    assert other.feed(b"Traceback (most recent call last):\n  File \"x\"\nKeyboardInterrupt\n") == b""


def test_a_peer_failing_in_mpi_first_still_names_the_killed_rank(capsys):
    """rank 0 killed: rank 1's all-reduce fails and aborts (status 1013525903, 143 mod
    256) before mpiexec reports the death, so no banner comes; the launcher saw rank 0
    end first (a zombie killed by SIGKILL)."""
    report = launcher.Launcher([], {})
    filt = launcher.OutputFilter(report)
    stack = (b"epoch 2/9\nAbort(1013525903) on node 1 (rank 1 in comm 0): Fatal error in "
             b"internal_Allreduce_c: Other MPI error, error stack:\n"
             b"internal_Allreduce_c(342)......: MPI_Allreduce_c(...) failed\n"
             b"copy_iovs(224)......: process_vm_readv failed (errno 3)\n\n")
    assert filt.feed(stack) + filt.finish() == b"epoch 2/9\n"
    report.ranks = {100: 0, 101: 1}
    report.gone = {100: (1.0, signal.SIGKILL), 101: (1.1, 143 << 8)}
    assert report._outcome(143) == 1
    assert capsys.readouterr().err == ("Error: rank 0 was killed (SIGKILL, signal 9); the run "
                                       "stops; nothing was written\n")
    report.gone = {}                          # both gone between two polls: the silent one
    assert report._outcome(143) == 1
    assert capsys.readouterr().err == ("Error: rank 0 was killed or crashed; the run stops; "
                                       "nothing was written\n")
    report.ranks = {101: 1}                   # rank 0 never seen: the MPI failure is the news
    assert report._outcome(143) == 1
    assert capsys.readouterr().err.startswith("Error: rank 1 failed in MPI (Fatal error in "
                                              "internal_Allreduce_c")
    report.ranks_spoke = True                 # "Error: rank 1 of 2: ..." and MPI_Abort
    assert report._outcome(7) == 7 and capsys.readouterr().err == ""   # their status, as is


def test_a_hang_up_is_passed_on_and_reported_as_sigterm(capsys):
    """SIGHUP reaches the ranks as SIGTERM, so the job's status is SIGTERM's 143."""
    report = launcher.Launcher([], {})
    report._on_signal(signal.SIGHUP, None)
    assert report.signals == [signal.SIGTERM]
    assert report._outcome(1) == 143
    assert capsys.readouterr().err.startswith("interrupted (SIGTERM)")


def test_the_launcher_removes_only_orphaned_segments_of_its_job(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "SHM_DIR", tmp_path)
    old = tmp_path / "mpich_shm_old_0"
    old.write_bytes(b"x")                            # another job's, from before the start
    before, started = launcher._segments_now(), time.time()
    for name in ("mpich_shm_ours_0", "mpich_shm_live_0", "mpich_shm_new_0", "other_0"):
        (tmp_path / name).write_bytes(b"x")
    report = launcher.Launcher([], {})
    report.segments = {"mpich_shm_ours_0", "mpich_shm_live_0"}
    monkeypatch.setattr(launcher, "segments_in_use", lambda: {"mpich_shm_live_0"})
    assert report.remove_leftover_segments(before, started) == ["mpich_shm_new_0",
                                                                "mpich_shm_ours_0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mpich_shm_live_0",
                                                         "mpich_shm_old_0", "other_0"]
