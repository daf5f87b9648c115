"""Time one DRAW training step in npdraw, side by side with a plain PyTorch peer.

One step = ``loss_and_grads`` + global-norm clipping + one Adam update, on a fixed
batch and fixed noise, after warm-up; the figure is the median over ``--steps``
steps. npdraw and the PyTorch peer (bench/torch_draw.py) take turns step by step
(A B B A A B ...), so that noise from other work on the machine falls on both.

On a CPU with several cores npdraw is timed the way `train` runs it: as MPI ranks, one
per core (``--ranks``, as in train), each taking its slice of the batch, one all-reduce
of the gradients, then clipping and Adam on every rank. ``python bench/run.py`` starts
the ranks itself (``mpiexec -n R``, as ``cli.py train`` does); rank 0 times, runs the
PyTorch peer and prints, while the other ranks follow its npdraw steps and sleep
between them, so that the peer's turns have the machine to themselves.

Before any ratio is printed, the peer is loaded with npdraw's parameters and must
give npdraw's loss on the same batch and noise (float32, relative difference
< 1e-4) and, in float64 on a smaller batch, the same loss and gradients (relative
difference < 1e-6). If it does not, no ratio is printed and the exit status is 1.

The machine's GEMM peak is measured in the same run: a 2048^3 float32 matmul through
NumPy's (or CuPy's) BLAS and through torch, before the models, once in every
repetition of the step timing, and after; the best run is the peak.

Run from the repository root:

    python bench/run.py                    # paper's MNIST config, both models
    python bench/run.py --T 8 --steps 3    # quicker
    python bench/run.py --json             # the same figures as JSON
    python bench/run.py --ranks 1          # npdraw in one process
    python bench/run.py --peers eager,compiled   # torch.compile beside eager
    python bench/run.py --batches 100,500  # and each side at its best batch size

Exit status: 0 done, 1 a peer disagreed with npdraw, 2 bad usage or no such device.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/run.py` puts bench/ first, not the root
    sys.path.insert(0, str(_REPO_ROOT))

import numpy as np  # noqa: E402

from npdraw import distributed, engine_layers  # noqa: E402
from npdraw.distributed import usable_cores  # noqa: E402

LOSS_RTOL_F32 = 1e-4
RTOL_F64 = 1e-6
CLIP = 10.0
LR, BETA1, BETA2, ADAM_EPS = 1e-3, 0.9, 0.999, 1e-8
CHECK_GRADS = ("enc_W", "dec_W", "write_W", "c0")  # checked in float64, with the loss
MODELS = {"attention": True, "no-attention": False}


# ------------------------------------------------------------------ FLOP count

def flop_terms(cfg, B: int) -> dict:
    """Forward FLOPs of one step (all T glimpses) by component; a GEMM m x k @ k x n is 2*m*n*k.

    Counted: the encoder and decoder LSTM GEMMs (inputs and recurrent rows in one
    matrix), the q layer, the write layer and, with attention, the two attention
    parameter layers and the filterbank matmuls: the read applies F_Y (N,H) @ img
    (H,W) then @ F_X^T (W,N) to each of the 2C planes [x, xhat]; the write applies
    F_Y^T (H,N) @ patch (N,N) then @ F_X (N,W) to each of the C planes.
    Not counted: elementwise work (gates, sigmoid, exp, softmax building the
    filters, the loss, Adam), which moves memory rather than doing GEMM work.
    """
    T, C, H, W = cfg.T, cfg.channels, cfg.height, cfg.width
    D = C * H * W
    E, Dd, Z = cfg.enc_dim, cfg.dec_dim, cfg.z_dim
    if cfg.attention:
        read_dim, write_dim = 2 * C * cfg.read_n ** 2, C * cfg.write_n ** 2
    else:
        read_dim, write_dim = 2 * D, D
    terms = {
        "encoder_lstm": 2 * B * (read_dim + Dd + E) * 4 * E,
        "q_layer": 2 * B * E * 2 * Z,
        "decoder_lstm": 2 * B * (Z + Dd) * 4 * Dd,
        "write_layer": 2 * B * Dd * write_dim,
    }
    if cfg.attention:
        Nr, Nw = cfg.read_n, cfg.write_n
        terms["attention_layers"] = 2 * (2 * B * Dd * 5)
        terms["read_filterbank"] = B * 2 * C * (2 * Nr * H * W + 2 * Nr * W * Nr)
        terms["write_filterbank"] = B * C * (2 * H * Nw * Nw + 2 * H * Nw * W)
    return {k: T * v for k, v in terms.items()}


def count_flops(cfg, B: int) -> int:
    """FLOPs of one training step: forward GEMMs (``flop_terms``) times 3.

    The backward of each GEMM is two GEMMs of the same size (gradient of the input
    and of the weight or other operand), so forward + backward = 3 x forward.
    """
    return 3 * sum(flop_terms(cfg, B).values())


# ------------------------------------------------------------------ machine facts

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _openblas_fns():
    """ctypes handles on the OpenBLAS that NumPy loaded (fallback when threadpoolctl is absent)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
    except OSError:
        return []
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("", ""), ("scipy_", "64_"), ("", "64_"), ("scipy_", "")):
            get_core = getattr(lib, f"{prefix}openblas_get_corename{suffix}", None)
            if get_core is None:
                continue
            get_core.restype = ctypes.c_char_p
            found.append({"file": os.path.basename(path), "corename": get_core,
                          "get_threads": getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None),
                          "set_threads": getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)})
            break
    return found


def blas_info() -> list:
    """Which BLAS kernels run NumPy's matmuls: threadpoolctl's view if installed, else OpenBLAS's own."""
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        out = []
        for lib in threadpoolctl.threadpool_info():
            out.append({k: lib.get(k) for k in ("user_api", "internal_api", "version",
                                                "architecture", "num_threads")}
                       | {"file": os.path.basename(lib.get("filepath", ""))})
        return out
    out = []
    for fns in _openblas_fns():
        entry = {"user_api": "blas", "internal_api": "openblas", "file": fns["file"],
                 "architecture": fns["corename"]().decode(errors="replace")}
        if fns["get_threads"] is not None:
            entry["num_threads"] = int(fns["get_threads"]())
        out.append(entry)
    return out


def set_threads(n: int, torch_too: bool = True):
    """Set the thread count of NumPy's BLAS (and of torch, if it is imported and torch_too).

    Returns a function that puts the previous counts back.
    """
    undo = []
    try:
        import threadpoolctl
        limits = threadpoolctl.threadpool_limits(n, user_api=None if torch_too else "blas")
        undo.append(limits.restore_original_limits)
    except ImportError:
        for fns in _openblas_fns():
            if fns["set_threads"] is not None and fns["get_threads"] is not None:
                before = int(fns["get_threads"]())
                fns["set_threads"](ctypes.c_int(n))
                undo.append(lambda f=fns["set_threads"], k=before: f(ctypes.c_int(k)))
    torch = sys.modules.get("torch") if torch_too else None
    if torch is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        undo.append(lambda: torch.set_num_threads(before))

    def restore():
        for fn in reversed(undo):
            fn()
    return restore


def device_description(device: str) -> dict:
    desc = {"platform": platform.platform(), "cpu": _cpu_model(), "cores": usable_cores(),
            "python": platform.python_version(), "numpy": np.__version__}
    if device == "gpu":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        desc["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        desc["cupy"] = cupy.__version__
    return desc


# ------------------------------------------------------------------ timing helpers

def _median_ms(seconds: list) -> float:
    return 1000.0 * statistics.median(seconds)


def gemm_probe(matmul, make, sync, n: int):
    """A function running one n x n x n float32 matmul (2 n^3 FLOPs) to the end."""
    a, b = make(n, 0), make(n, 1)

    def probe():
        matmul(a, b)
        sync()
    return probe


def random_square(xp):
    """make(n, seed) for gemm_probe: an n x n float32 array of normal noise on xp's device."""
    return lambda n, seed: xp.asarray(np.random.default_rng(seed).standard_normal((n, n)),
                                      dtype=xp.float32)


def blas_peak(n: int, reps: int) -> dict:
    """NumPy's GEMM peak on this CPU, measured now as ``_run`` measures it: the best of
    ``reps`` n^3 float32 matmuls on the BLAS threads in force, or one thread's best
    times the usable cores, whichever is higher (see ``_run``)."""
    probe = gemm_probe(lambda a, b: a @ b, random_square(np), lambda: None, n)
    flop = 2.0 * n ** 3 / 1e9
    best = flop / min(gemm_times(probe, reps))
    per_core = flop / min(_single_core_gemm_secs(probe, reps))
    cores = usable_cores()
    return {"n": n, "reps": reps, "best_gflops": best, "single_core_best_gflops": per_core,
            "cores": cores, "peak_gflops": max(best, per_core * cores)}


def gemm_times(probe, reps: int) -> list:
    """Seconds of ``reps`` runs of ``probe``, after one warm-up."""
    probe()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        probe()
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(steppers: dict, steps: int, warmup: int, settle: float = 0.0) -> dict:
    """Seconds per step of each stepper, timed in turns (A B, B A, ...) in one run.

    Each turn runs its stepper twice and times the second step only. Right after a
    step, the other library's worker threads (torch's OpenMP pool, OpenBLAS's) keep
    spinning and its freed memory is still being returned; the untimed step absorbs
    that, so each library is timed in the state it has when it runs alone. settle:
    seconds of pause before each turn.
    """
    names = list(steppers)
    for _ in range(warmup):
        for name in names:
            steppers[name]()
    times = {name: [] for name in names}
    for rep in range(steps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            if settle > 0:
                time.sleep(settle)
            steppers[name]()
            t0 = time.perf_counter()
            steppers[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _rel(a, b) -> float:
    """Norm-wise relative difference ||a - b|| / max(||b||, tiny)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def make_inputs(cfg, B: int, seed: int, dtype: str):
    """A fixed batch (binary pixels, about MNIST's ink density) and fixed noise eps (T, B, Z)."""
    rng = np.random.default_rng(seed)
    x = (rng.random((B, cfg.D)) < 0.13).astype(dtype)
    eps = rng.standard_normal((cfg.T, B, cfg.z_dim)).astype(dtype)
    return x, eps


# ------------------------------------------------------------------ npdraw side

# Commands from rank 0 to the other ranks (one int, broadcast before each call).
STEP, LOSS_AND_GRADS, BARE_ALLREDUCE, DONE = 1, 2, 3, 0
# How often a waiting rank looks for rank 0's next command: it sleeps in between, so that
# rank 0's own turns (the peer, the GEMM probes) have the cores; at most this late.
POLL_S = 0.0005


class NpdrawRunner:
    """Holds npdraw's parameters and Adam state on a device; ``step()`` is one training step.

    comm: the ranks (npdraw.distributed) that share each batch as in `train`; with more
    than one, rank 0 drives (``step``, ``loss_and_grads``, ``allreduce_seconds``, ``close``)
    and every other rank calls ``follow()``, which does the same calls as rank 0 asks for
    them. Every rank holds the same parameters, batch and noise (the same seeds)."""

    def __init__(self, npdraw, cfg, params, x, eps, device: str, comm=None):
        from npdraw import backend, optim
        self.cfg, self.device, self._npdraw = cfg, device, npdraw
        self.comm = distributed.SingleProcess() if comm is None else comm
        self._optim = optim
        self.xp = backend.xp_for(device)
        self._sync = backend.synchronize
        self.params = {k: backend.to_device(v, device) for k, v in params.items()}
        B = x.shape[0]
        lo, hi = self.comm.shard(B)          # this rank's examples, sliced once
        self.share = (hi - lo) / B
        self.x = backend.to_device(np.array(x[lo:hi]), device)         # owned copies
        self.eps = backend.to_device(np.array(eps[:, lo:hi]), device)
        self.state = optim.adam_init(self.params)
        self.last_loss = None
        self._command = np.zeros(1, dtype=np.int64)

    def _tell(self, command: int) -> None:
        """Rank 0: send the other ranks their next call."""
        if self.comm.size > 1:
            self._command[0] = command
            self.comm.comm.Ibcast(self._command, root=0).Wait()

    def _global(self):
        """(loss, grads, stats) of the whole batch: this rank's part, summed over ranks."""
        mine = (self._npdraw.loss_and_grads(self.params, self.cfg, self.x, self.eps)
                if self.x.shape[0] else None)
        return mine, self.comm.reduce_step(self.params, self.cfg.T, mine, self.share)

    def _step(self) -> float:
        _mine, (loss, grads, _stats) = self._global()
        norm = self._optim.global_norm(grads)            # clipping as train does it
        self.params, self.state, _ = self._optim.adam_step(
            self.params, grads, self.state, LR, BETA1, BETA2, ADAM_EPS,
            grad_scale=self._optim.clip_scale(norm, CLIP))
        self._sync(self.xp)
        self.last_loss = float(loss)
        return self.last_loss

    def _loss_and_grads(self):
        mine, (loss, grads, stats) = self._global()
        activation = 0 if mine is None else mine[2]["activation_bytes"]
        stats = dict(stats, activation_bytes=int(self.comm.sum([activation])[0]))
        return loss, grads, stats

    def step(self) -> float:
        self._tell(STEP)
        return self._step()

    def loss_and_grads(self):
        """(loss, grads, stats) of the whole batch; stats["activation_bytes"]: all ranks'."""
        self._tell(LOSS_AND_GRADS)
        return self._loss_and_grads()

    def allreduce_seconds(self, repeats: int) -> list:
        """Rank 0: the seconds of ``repeats`` bare all-reduces (rank 0's timings), with the
        ranks lined up, so that none waits for another's share of a step: every rank
        passes a barrier, then times the communicator's all-reduce (``_allreduce_flat``,
        the step's call) of a zero buffer of the size and dtype of the step's flat buffer;
        one untimed first. The step's own buffer is left alone. Every rank runs them
        (``follow``). One process: [] (there is no all-reduce). Needs a step first: the
        step builds the buffer that fixes the size."""
        if self.comm.size == 1:
            return []
        if getattr(self.comm, "_buffer", None) is None:
            raise RuntimeError("allreduce_seconds: take a step first (it sizes the buffer)")
        self._tell(BARE_ALLREDUCE)
        return self._allreduce_seconds(repeats)

    def _allreduce_seconds(self, repeats: int = 0) -> list:
        count = np.array([repeats], dtype=np.int64)
        self.comm.comm.Bcast(count, root=0)              # rank 0's count, to every rank
        probe = self.xp.zeros_like(self.comm._buffer.flat)
        seconds = []
        for i in range(int(count[0]) + 1):
            self.comm.comm.Barrier()
            start = time.perf_counter()
            self.comm._allreduce_flat(probe)
            self._sync(self.xp)
            if i > 0:                                    # the first touches the new buffer
                seconds.append(time.perf_counter() - start)
        return seconds

    def follow(self) -> None:
        """Ranks other than 0: do what rank 0 asks until it is done with this model,
        sleeping while they wait."""
        calls = {STEP: self._step, LOSS_AND_GRADS: self._loss_and_grads,
                 BARE_ALLREDUCE: self._allreduce_seconds}
        while True:
            request = self.comm.comm.Ibcast(self._command, root=0)
            while not request.Test():
                time.sleep(POLL_S)
            if int(self._command[0]) == DONE:
                return
            calls[int(self._command[0])]()

    def close(self):
        self._tell(DONE)


# ------------------------------------------------------------------ torch side

def _torch_device(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


# The PyTorch peers: the model as written (eager), and the same module under
# torch.compile's defaults, what a PyTorch user tries first for speed (forward and
# backward compiled; clipping and Adam stay as they are).
PEERS = {"eager": "torch", "compiled": "torch_compiled"}   # --peers name -> figures' key


def torch_model(cfg, params, device: str, compiled: bool = False):
    """-> (the TorchDraw module loaded with npdraw's params, the callable to run: the
    module itself, or torch.compile of it)."""
    import torch
    from bench.torch_draw import TorchDraw
    dtype = torch.float64 if params["c0"].dtype == np.float64 else torch.float32
    module = TorchDraw(cfg).to(device=_torch_device(device), dtype=dtype).load_from_npdraw(params)
    return module, (torch.compile(module) if compiled else module)


class TorchRunner:
    """The PyTorch peer loaded with npdraw's parameters; ``step()`` is one training step.
    compiled: run the module under torch.compile (the first step compiles, unless an
    earlier compile of the same model is reused)."""

    def __init__(self, cfg, params, x, eps, device: str, compiled: bool = False):
        import torch
        from bench.torch_draw import make_optimizer
        self.torch = torch
        self.dev = _torch_device(device)
        self.module, self.model = torch_model(cfg, params, device, compiled)
        self.opt = make_optimizer(self.module, lr=LR, betas=(BETA1, BETA2), eps=ADAM_EPS)
        self.x = torch.from_numpy(x).to(self.dev)
        self.eps = torch.from_numpy(eps).to(self.dev)
        self.last_loss = None

    def step(self) -> float:
        from bench.torch_draw import train_step
        loss = train_step(self.model, self.opt, self.x, self.eps, CLIP)
        self.last_loss = float(loss.item())  # waits for the device, as logging the loss does
        return self.last_loss

    def activation_bytes(self) -> int | None:
        """Bytes of the tensors autograd saves for backward in one forward (parameters and inputs excluded)."""
        torch = self.torch
        if self.model is not self.module:
            return None            # a compiled graph saves its tensors out of the hooks' sight
        skip = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        skip |= {self.x.untyped_storage().data_ptr(), self.eps.untyped_storage().data_ptr()}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.model(self.x, self.eps)
        del loss
        return int(sum(seen.values()))


def check_peer(npdraw, cfg, params32, x32, eps32, seed: int, device: str, check_batch: int,
               compiled: bool = False) -> dict:
    """Does the peer compute npdraw's model? float32 loss at the benchmark batch, float64 loss+grads.

    Returns {"ok", "loss_rel_f32", "loss_rel_f64", "grad_rel_f64": {name: rel}, "activation_bytes"},
    and with compiled (the peer under torch.compile) "compile_s": the seconds of its first
    float32 forward and backward, which compile them.
    """
    import torch
    from npdraw import backend

    dev = _torch_device(device)

    def both(params, x, eps):
        p_dev = {k: backend.to_device(v, device) for k, v in params.items()}
        loss_n, grads_n, stats = npdraw.loss_and_grads(
            p_dev, cfg, backend.to_device(x, device), backend.to_device(eps, device))
        module, model = torch_model(cfg, params, device, compiled)
        start = time.perf_counter()
        loss_t = model(torch.from_numpy(x).to(dev), torch.from_numpy(eps).to(dev))
        loss_t.backward()
        loss_t = float(loss_t.item())
        stats = dict(stats, peer_s=time.perf_counter() - start)
        return float(loss_n), grads_n, stats, loss_t, module.grads_as_npdraw()

    out = {}
    loss_n, _g, stats, loss_t, _gt = both(params32, x32, eps32)
    if compiled:
        out["compile_s"] = stats["peer_s"]
    out["loss_npdraw_f32"], out["loss_torch_f32"] = loss_n, loss_t
    out["loss_rel_f32"] = abs(loss_n - loss_t) / max(abs(loss_t), 1e-300)
    out["activation_bytes"] = int(stats["activation_bytes"])

    Bc = min(check_batch, x32.shape[0])
    params64 = {k: np.asarray(v, dtype=np.float64) for k, v in params32.items()}
    x64, eps64 = make_inputs(cfg, Bc, seed + 1, "float64")
    loss_n, grads_n, _s, loss_t, grads_t = both(params64, x64, eps64)
    out["loss_rel_f64"] = abs(loss_n - loss_t) / max(abs(loss_t), 1e-300)
    out["grad_rel_f64"] = {k: _rel(backend.to_numpy(grads_n[k]), grads_t[k]) for k in CHECK_GRADS}
    out["ok"] = bool(out["loss_rel_f32"] < LOSS_RTOL_F32 and out["loss_rel_f64"] < RTOL_F64
                     and all(v < RTOL_F64 for v in out["grad_rel_f64"].values()))
    return out


# ------------------------------------------------------------------ the run

def build_parser() -> argparse.ArgumentParser:
    """The command line of the benchmark, its options in sections as cli.py's."""
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Time one DRAW training step (loss_and_grads + clip + Adam) in npdraw "
                    "and in a plain PyTorch peer, side by side.")
    # --help in the sections of cli.py's commands (npdraw/helpsections.py)
    model = p.add_argument_group("model options")
    run = p.add_argument_group("training and running options")
    data = p.add_argument_group("data options")
    output = p.add_argument_group("output options")
    model.add_argument("--glimpses", "--T", dest="T", type=int, default=64,
                       help="glimpses T (paper's MNIST model: 64; --T is the old name)")
    model.add_argument("--model", choices=["both", "attention", "no-attention"], default="both",
                       help="which models to time: the attentive one, the attention-free one "
                            "or both")
    run.add_argument("--steps", type=int, default=7,
                     help="timed steps per implementation (median taken)")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    run.add_argument("--batch", type=int, default=100, help="batch size (paper: 100)")
    run.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                     help="floating-point precision of the timed steps")
    run.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                     help="gpu: npdraw on CuPy, torch on CUDA")
    run.add_argument("--threads", type=int, default=0,
                     help="set BLAS and torch thread counts (0: leave as they are)")
    run.add_argument("--ranks", type=int, default=0,
                     help="npdraw's MPI ranks sharing each batch, as in train (0: one per core "
                          "on a CPU, 1 on a GPU; 1: one process)")
    run.add_argument("--no-torch", action="store_true", help="time npdraw alone")
    run.add_argument("--peers", default="eager", type=_peer_list, metavar="LIST",
                     help="the PyTorch peers to time, comma-separated: eager (the module as "
                          "written), compiled (under torch.compile; its first compile is "
                          "reported on its own); default eager")
    run.add_argument("--batches", type=_batch_list, metavar="LIST",
                     help="batch sizes, comma-separated (e.g. 100,500): each is timed, and each "
                          "side's best examples/s and the ratio of those are reported "
                          "(replaces --batch)")
    run.add_argument("--gemm-n", type=int, default=2048,
                     help="size of the matmul that measures peak")
    run.add_argument("--gemm-reps", type=int, default=5,
                     help="peak-measuring matmuls before and after the models")
    data.add_argument("--check-batch", type=int, default=8,
                      help="batch of the float64 agreement check")
    run.add_argument("--settle", type=float, default=0.5,
                     help="seconds of pause before each turn of timed steps (0: none)")
    data.add_argument("--seed", type=int, default=0,
                      help="seed of the random batch, parameters and noise")
    output.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile N npdraw steps (cProfile, top functions by "
                             "own time)")
    output.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def _peer_list(text: str) -> list:
    peers = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in peers if name not in PEERS]
    if unknown or not peers:
        raise argparse.ArgumentTypeError(f"peers are {', '.join(PEERS)}, not {text!r}")
    return list(dict.fromkeys(peers))


def _batch_list(text: str) -> list:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are whole numbers, not {text!r}") from None
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be at least 1")
    return list(dict.fromkeys(batches))


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    args.batches = args.batches or [args.batch]
    args.batch = args.batches[0]
    if args.no_torch:
        args.peers = []
    for name in ("steps", "batch", "T", "gemm_n", "gemm_reps", "check_batch"):
        if getattr(args, name) < 1:
            flag = "glimpses" if name == "T" else name.replace("_", "-")
            p.error(f"--{flag} must be at least 1")
    if args.warmup < 0 or args.threads < 0 or args.profile < 0 or args.ranks < 0:
        p.error("--warmup, --threads, --ranks and --profile must not be negative")
    return args


def _import_torch(device: str):
    """torch, or (None, reason) when it cannot serve as the peer on this device."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (pip install '.[bench]')"
    if device == "gpu" and not torch.cuda.is_available():
        return None, "torch has no CUDA device"
    return torch, None


def _single_core_gemm_secs(probe, reps: int) -> list:
    """Seconds of ``reps`` runs of the matmul probe with NumPy's BLAS on one thread."""
    restore = set_threads(1, torch_too=False)
    try:
        return gemm_times(probe, reps)
    finally:
        restore()


def _impl_figures(seconds: list, B: int, flops: int) -> dict:
    """Figures of one implementation from its step times (peak_fraction is filled in later)."""
    ms = _median_ms(seconds)
    return {"ms_per_step": ms, "ms_min": 1000.0 * min(seconds), "ms_all": [1000.0 * s for s in seconds],
            "examples_per_s": B / (ms / 1000.0), "gflops": flops / (ms / 1000.0) / 1e9,
            "peak_fraction": None}


def run(args, comm=None) -> dict:
    """Everything but printing; returns the JSON-able result (``result["ok"]`` False on disagreement).

    comm: npdraw's ranks (npdraw.distributed; one process by default). Rank 0 runs this;
    the other ranks run ``follow``. With ``args.threads`` the thread counts are set for
    the run and put back afterwards.
    """
    comm = distributed.SingleProcess() if comm is None else comm
    restore = None
    if args.threads:
        if not args.no_torch:
            _import_torch(args.device)  # so that torch's count is set (and restored) too
        restore = set_threads(args.threads)
    elif comm.size > 1 and not args.no_torch:
        # The ranks' BLAS have one core's share each (as in train); the peer, which runs
        # while they wait, gets all the cores, as it would alone.
        torch, _ = _import_torch(args.device)
        if torch is not None:
            before = torch.get_num_threads()
            torch.set_num_threads(usable_cores())
            restore = lambda: torch.set_num_threads(before)  # noqa: E731
    try:
        return _run(args, comm)
    finally:
        if restore is not None:
            restore()


def _models(args, npdraw, batch=None):
    """(name, cfg, params on the host, x, eps) of each model to time, at ``batch`` examples
    (args.batch by default), the same on every rank."""
    from npdraw import backend
    for name in (list(MODELS) if args.model == "both" else [args.model]):
        cfg = npdraw.DrawConfig(T=args.T, attention=MODELS[name])
        params = npdraw.init_params(cfg, args.seed, dtype=args.dtype)
        params = {k: backend.to_numpy(v) for k, v in params.items()}
        x, eps = make_inputs(cfg, batch or args.batch, args.seed, args.dtype)
        yield name, cfg, params, x, eps


def follow(args, comm) -> None:
    """The ranks other than 0: rank 0's npdraw calls, model by model."""
    import npdraw
    from npdraw import backend
    device = backend.resolve_device(args.device)
    comm = comm.for_device(device)
    restore = set_threads(args.threads, torch_too=False) if args.threads else None
    try:
        for B in args.batches:
            for _name, cfg, params, x, eps in _models(args, npdraw, B):
                NpdrawRunner(npdraw, cfg, params, x, eps, device, comm).follow()
    finally:
        if restore is not None:
            restore()


def _run(args, comm) -> dict:
    import npdraw
    from npdraw import backend

    device = backend.resolve_device(args.device)  # ValueError when 'gpu' has no GPU (main checks)
    comm = comm.for_device(device)
    xp = backend.xp_for(device)
    torch, torch_missing = (None, "--no-torch") if args.no_torch else _import_torch(device)

    # as train does; in this process it holds for the PyTorch side as well
    retained = backend.retain_freed_memory()
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                          "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_description(device) | {"kind": device},
        "torch": None if torch is None else torch.__version__,
        "torch_skipped": torch_missing,
        "blas": blas_info() if device == "cpu" else [],
        "threads": {"torch": None if torch is None else torch.get_num_threads()},
        "env": {k: v for k, v in env.items() if v is not None},
        "settings": {"batch": args.batch, "batches": args.batches, "peers": args.peers,
                     "T": args.T, "dtype": args.dtype, "steps": args.steps,
                     "warmup": args.warmup, "settle": args.settle, "clip": CLIP, "lr": LR,
                     "seed": args.seed, "ranks": comm.size, "freed_memory_retained": retained,
                     "kernels": engine_layers.kernels()},      # NPDRAW_KERNELS: numpy or numba
    }
    if result["blas"]:
        result["threads"]["blas"] = result["blas"][0].get("num_threads")

    # GEMM peak of this machine, measured in this run, before and after the models: a large
    # float32 matmul through NumPy/CuPy's BLAS (npdraw's) and through torch's.
    n, reps = args.gemm_n, args.gemm_reps
    # One matmul of each also takes its turn in every repetition of the step timing below, so
    # that the peak is measured under the same conditions as the steps.
    probes = {"npdraw_blas": gemm_probe(lambda a, b: a @ b, random_square(xp),
                                        lambda: backend.synchronize(xp), n)}
    if torch is not None:
        tdev = _torch_device(device)
        probes["torch"] = gemm_probe(
            torch.matmul,
            lambda n_, s: torch.from_numpy(
                np.random.default_rng(s).standard_normal((n_, n_)).astype(np.float32)).to(tdev),
            (torch.cuda.synchronize if device == "gpu" else (lambda: None)), n)
    gemm_secs = {k: gemm_times(probe, reps) for k, probe in probes.items()}
    # On a CPU, also one core's rate times the cores: on some BLAS kernels one
    # multi-threaded matmul falls short of what the cores do side by side (npdraw's
    # ranks each run a one-thread BLAS), and a peak must bound both.
    core_secs = _single_core_gemm_secs(probes["npdraw_blas"], reps) if device == "cpu" else []

    ok = True
    # models: the first batch's entries; with several batches, batches: every batch's
    result["models"], sweep = {}, {}
    for B in args.batches:
        for name, cfg, params, x, eps in _models(args, npdraw, B):
            flops = count_flops(cfg, B)
            entry = {"config": cfg.to_dict(), "batch": B, "flops_per_step": flops,
                     "flop_terms_forward": flop_terms(cfg, B)}
            runner = NpdrawRunner(npdraw, cfg, params, x, eps, device, comm)
            try:
                ok = _time_model(args, npdraw, cfg, params, x, eps, device, torch, runner,
                                 probes, gemm_secs, entry, flops, B) and ok
            finally:
                runner.close()
            result["models"].setdefault(name, entry)
            sweep.setdefault(name, []).append(entry)
    if len(args.batches) > 1:
        result["batches"] = sweep
        result["best_batch"] = {name: best_batch(entries) for name, entries in sweep.items()}

    for k, probe in probes.items():
        gemm_secs[k] += gemm_times(probe, reps)
    if core_secs:
        core_secs += _single_core_gemm_secs(probes["npdraw_blas"], reps)
    flop = 2.0 * n ** 3 / 1e9
    median = {k: flop / statistics.median(v) for k, v in gemm_secs.items()}
    best = {k: flop / min(v) for k, v in gemm_secs.items()}
    # The peak is the best matmul seen: on a shared machine a median can fall on a busy moment,
    # and a peak is an upper bound anyway.
    peak = max(best.values())
    result["gemm"] = {"n": n, "reps": len(gemm_secs["npdraw_blas"]), "median_gflops": median,
                      "best_gflops": best}
    if core_secs:
        cores = usable_cores()
        per_core = flop / min(core_secs)
        result["gemm"]["single_core_best_gflops"] = per_core
        result["gemm"]["cores"] = cores
        peak = max(peak, per_core * cores)
    result["gemm"]["peak_gflops"] = peak
    for entry in (e for entries in sweep.values() for e in entries):
        for impl in ("npdraw", *PEERS.values()):
            if impl in entry:
                entry[impl]["peak_fraction"] = entry[impl]["gflops"] / peak
    result["ok"] = ok
    return result


def best_batch(entries: list) -> dict:
    """Each side's best examples/s over one model's batch sizes, and npdraw's over each
    peer's: {impl: {"batch", "examples_per_s"}, "ratio_npdraw_over_<peer>": float}."""
    best = {}
    for impl in ("npdraw", *PEERS.values()):
        timed = [e for e in entries if impl in e]
        if timed:
            top = max(timed, key=lambda e: e[impl]["examples_per_s"])
            best[impl] = {"batch": top["batch"], "examples_per_s": top[impl]["examples_per_s"]}
    for key in PEERS.values():
        if key in best and "npdraw" in best:
            best[f"ratio_npdraw_over_{key}"] = (best["npdraw"]["examples_per_s"]
                                                / best[key]["examples_per_s"])
    return best


def _time_model(args, npdraw, cfg, params, x, eps, device, torch, runner, probes, gemm_secs,
                entry, flops, B) -> bool:
    """Check and time one model at batch B into ``entry``; False when a peer disagrees."""
    ok = True
    steppers = {"npdraw": runner}
    # Over ranks, the timed step must compute what the in-process model computes.
    loss_timed, _g, stats = runner.loss_and_grads()
    for peer in (args.peers if torch is not None else []):
        key, compiled = PEERS[peer], peer == "compiled"
        check = check_peer(npdraw, cfg, params, x, eps, args.seed, device, args.check_batch,
                           compiled)
        check["loss_timed_rel_f32"] = (abs(float(loss_timed) - check["loss_npdraw_f32"])
                                       / max(abs(check["loss_npdraw_f32"]), 1e-300))
        check["ok"] = check["ok"] and check["loss_timed_rel_f32"] < LOSS_RTOL_F32
        entry["check" if key == "torch" else f"check_{key}"] = check
        check.pop("activation_bytes")
        if not check["ok"]:
            ok = False
            continue
        steppers[key] = TorchRunner(cfg, params, x, eps, device, compiled)
        if compiled:    # the check compiled this model; a recompile would show here
            entry["compile_s"] = check["compile_s"]
            start = time.perf_counter()
            steppers[key].step()
            entry["compiled_first_step_s"] = time.perf_counter() - start
    act_bytes = int(stats["activation_bytes"])

    turns = {k: r.step for k, r in steppers.items()}
    turns.update({f"gemm:{k}": probe for k, probe in probes.items()})
    times = time_interleaved(turns, args.steps, args.warmup, args.settle)
    for k in probes:
        gemm_secs[k] += times[f"gemm:{k}"]
    entry["npdraw"] = _impl_figures(times["npdraw"], B, flops)
    entry["npdraw"]["activation_bytes_per_example"] = act_bytes / B
    entry["npdraw"]["final_loss"] = steppers["npdraw"].last_loss
    for key in PEERS.values():
        suffix = "" if key == "torch" else key[len("torch"):]           # "", "_compiled"
        names = (f"ratio_npdraw_over_{key}", f"ratio_best{suffix}", f"ratio_paired_median{suffix}")
        if key not in steppers:
            if key == "torch" or f"check_{key}" in entry:
                entry.update(dict.fromkeys(names, None))
            continue
        entry[key] = _impl_figures(times[key], B, flops)
        act_peer = steppers[key].activation_bytes()
        entry[key]["activation_bytes_per_example"] = None if act_peer is None else act_peer / B
        entry[key]["final_loss"] = steppers[key].last_loss
        # The ratio of the medians, of the best step of each, and the median of the
        # per-repetition ratios (each pair ran back to back, so slow drifts cancel).
        entry[names[0]] = entry["npdraw"]["examples_per_s"] / entry[key]["examples_per_s"]
        entry[names[1]] = entry[key]["ms_min"] / entry["npdraw"]["ms_min"]
        entry[names[2]] = statistics.median(t / n for n, t in zip(times["npdraw"], times[key]))
    if args.profile:
        entry["profile"] = profile_npdraw(steppers["npdraw"], args.profile)
    return ok


def profile_npdraw(runner: NpdrawRunner, steps: int, top: int = 25) -> str:
    """cProfile of ``steps`` npdraw steps, the top functions by own time, as text."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        runner.step()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024.0


# how the report names each side
_IMPL_LABELS = {"npdraw": "npdraw", "torch": "torch", "torch_compiled": "compiled"}


def _format_check(chk: dict, what: str) -> str:
    grads = ", ".join(f"{k} {v:.1e}" for k, v in chk["grad_rel_f64"].items())
    return (f"  check vs {what}: loss f32 {chk['loss_npdraw_f32']:.6f} vs "
            f"{chk['loss_torch_f32']:.6f} (rel {chk['loss_rel_f32']:.1e}); f64 loss rel "
            f"{chk['loss_rel_f64']:.1e}, grads rel {grads} -> "
            + ("OK" if chk["ok"] else "DISAGREE: no ratio"))


def _format_model(name: str, e: dict, several: bool) -> list:
    """The report's lines of one model at one batch size."""
    c = e["config"]
    arch = (f"read {c['read_n']}x{c['read_n']}, write {c['write_n']}x{c['write_n']}"
            if c["attention"] else "no attention")
    lines = ["", f"[{name}" + (f", batch {e['batch']}" if several else "") + "] "
             f"{c['height']}x{c['width']}x{c['channels']}, {arch}, "
             f"enc/dec {c['enc_dim']}/{c['dec_dim']}, z {c['z_dim']}; "
             f"{e['flops_per_step'] / 1e9:.2f} GFLOP/step"]
    for key, what in (("check", "torch"), ("check_torch_compiled", "torch.compile")):
        if e.get(key) is not None:
            lines.append(_format_check(e[key], what))
    if "compile_s" in e:
        lines.append(f"  torch.compile: first compile {e['compile_s']:.1f} s (forward and backward, "
                     f"float32, this batch; not in the step times), then the timed model's "
                     f"first step {e['compiled_first_step_s']:.2f} s")
    lines.append(f"  {'':8s} {'ms/step':>9s} {'(best)':>9s} {'ex/s':>8s} {'GFLOP/s':>8s} "
                 f"{'of peak':>8s} {'act/example':>12s}")
    for impl, label in _IMPL_LABELS.items():
        f = e.get(impl)
        if f is None:
            continue
        act = f["activation_bytes_per_example"]
        lines.append(f"  {label:8s} {f['ms_per_step']:9.1f} {f['ms_min']:9.1f} "
                     f"{f['examples_per_s']:8.1f} {f['gflops']:8.2f} "
                     f"{100 * f['peak_fraction']:7.1f}% "
                     f"{'-' if act is None else _fmt_bytes(act):>12s}")
    for key, suffix in (("torch", ""), ("torch_compiled", "_compiled")):
        if e.get(f"ratio_npdraw_over_{key}") is not None:
            lines.append(f"  npdraw/{_IMPL_LABELS[key]} throughput: "
                         f"{e[f'ratio_npdraw_over_{key}']:.2f}x (medians; best steps "
                         f"{e[f'ratio_best{suffix}']:.2f}x, median of paired steps "
                         f"{e[f'ratio_paired_median{suffix}']:.2f}x)")
    if e.get("profile"):
        lines.append("  profile of npdraw steps (cProfile, by tottime):")
        lines.extend("    " + ln for ln in e["profile"].rstrip().splitlines())
    return lines


def _format_best(best: dict) -> list:
    """The lines of each side's best batch size, and the ratio there."""
    line = "  best batch: " + ", ".join(
        f"{_IMPL_LABELS[impl]} {b['examples_per_s']:.1f} ex/s at {b['batch']}"
        for impl, b in best.items() if impl in _IMPL_LABELS)
    ratios = [f"npdraw/{_IMPL_LABELS[key]} {best[f'ratio_npdraw_over_{key}']:.2f}x"
              for key in ("torch", "torch_compiled") if f"ratio_npdraw_over_{key}" in best]
    return [line] + (["  at each side's best batch: " + ", ".join(ratios)] if ratios else [])


def format_report(r: dict) -> str:
    d = r["device"]
    s = r["settings"]
    lines = [f"npdraw training-step benchmark, {r['date']}",
             f"device: {d['kind']}: {d.get('gpu', d['cpu'])}" + ("" if d["kind"] == "gpu" else
                                                                  f", {d['cores']} usable cores"),
             f"python {d['python']}, numpy {d['numpy']}, torch {r['torch'] or '-'}"
             + (f" ({r['torch_skipped']})" if r["torch_skipped"] else "")]
    for lib in r["blas"]:
        lines.append(f"BLAS: {lib.get('internal_api')} {lib.get('version') or ''} kernel "
                     f"{lib.get('architecture')}, {lib.get('num_threads')} threads".replace("  ", " "))
    lines.append(f"threads: torch {r['threads'].get('torch')}, BLAS {r['threads'].get('blas')}")
    if r["env"]:
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in r["env"].items()))
        if "OPENBLAS_CORETYPE" in r["env"] or "OPENBLAS_L2_SIZE" in r["env"]:
            lines.append("  note: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE pin an older OpenBLAS kernel; for a fair "
                         "measure run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py")
    lines.append(f"npdraw's elementwise kernels: {s.get('kernels', 'numpy')}")
    g = r["gemm"]
    lines.append(f"GEMM ({g['n']}^3 float32 matmul, {g['reps']} runs, median/best GFLOP/s): "
                 + ", ".join(f"{k} {g['median_gflops'][k]:.1f}/{g['best_gflops'][k]:.1f}"
                             for k in g["median_gflops"])
                 + (f"; one core {g['single_core_best_gflops']:.1f} x {g['cores']} cores"
                    if "single_core_best_gflops" in g else "")
                 + f"; peak = {g['peak_gflops']:.1f}")
    lines.append(f"step = loss_and_grads + clip({s['clip']}) + Adam; batch "
                 f"{', '.join(map(str, s.get('batches') or [s['batch']]))}, T {s['T']}, "
                 f"{s['dtype']}, median of {s['steps']} after {s['warmup']} warm-up, A/B interleaved")
    if s.get("ranks", 1) > 1:
        lines.append(f"npdraw splits each batch over {s['ranks']} MPI ranks with their share of "
                     "the cores for BLAS each, as `train` does (--ranks 1: one process)")
    if s.get("freed_memory_retained"):
        lines.append("malloc keeps freed memory for reuse, as `train` sets it, for both sides "
                     "(npdraw.backend.retain_freed_memory)")
    sweep = r.get("batches") or {name: [e] for name, e in r["models"].items()}
    for name, entries in sweep.items():
        for e in entries:
            lines.extend(_format_model(name, e, several=len(entries) > 1))
        if name in r.get("best_batch", {}):
            lines.extend(_format_best(r["best_batch"][name]))
    if any((e.get(i) or {}).get("peak_fraction", 0) > 1.0 for entries in sweep.values()
           for e in entries for i in ("npdraw", *PEERS.values())):
        lines.append("")
        lines.append("note: a fraction of peak above 100% means every peak measurement met a busy "
                     "machine (run again), or, without attention, that the FLOP count includes "
                     "work npdraw skips (see bench/README.md)")
    if "OPENBLAS_CORETYPE" in r["env"]:
        lines.append("")
        lines.append(f"note: NumPy's BLAS ran the kernel pinned by OPENBLAS_CORETYPE="
                     f"{r['env']['OPENBLAS_CORETYPE']} (GEMM peak {g['peak_gflops']:.0f} GFLOP/s); "
                     "the fair measure: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "
                     "python bench/run.py")
    if not r["ok"]:
        lines.append("")
        lines.append("FAILED: the torch peer does not compute npdraw's loss/gradients; ratios withheld.")
    return "\n".join(lines)


def start_ranks(ranks: int, device: str, batch: int, script: str, argv: list, launch: bool):
    """npdraw's ranks for a benchmark script: with launch, this process becomes `mpiexec -n R
    python script argv` when ranks are to be started (as `cli.py train` does); else the
    communicator of this process, checked against ``ranks``. -> the communicator, or None
    (said on stderr) when the device or the ranks cannot be had."""
    from npdraw import backend
    try:
        device = backend.resolve_device(device)
        count, mpiexec, note = distributed.launch_plan(ranks, device, batch)
        comm = distributed.from_environment()
        if not launch or mpiexec is None:
            distributed.check_rank_count(ranks, comm)
    except ValueError as exc:  # --device gpu without a GPU, --ranks that cannot be had
        print(f"error: {exc}", file=sys.stderr)
        return None
    if note:
        print(note.replace("one process", "npdraw in one process", 1), file=sys.stderr)
    if launch and mpiexec is not None:
        distributed.exec_as_ranks(count, mpiexec, script, argv)
    # a rank: Ctrl-C or SIGTERM ends every rank at once (MPI noted it and never acted on it:
    # a benchmark ran on to its end and exited 0); in one process, nothing changes
    distributed.stop_at_once_on_signals()
    return comm


def main(argv: list[str] | None = None, launch: bool = False) -> int:
    """The benchmark; launch: start npdraw's ranks (this process becomes `mpiexec -n R
    python bench/run.py argv`, as `cli.py train` does), else time in this process."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    comm = start_ranks(args.ranks, args.device, min(args.batches), __file__, argv, launch)
    if comm is None:
        return 2
    if not comm.is_root:
        follow(args, comm)
        return 0
    try:
        result = run(args, comm)
    except BaseException as exc:  # the other ranks wait for rank 0: stop them too
        if comm.size == 1:
            raise
        comm.abort(f"{type(exc).__name__}: {exc}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(launch=True))
