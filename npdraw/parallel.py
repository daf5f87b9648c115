"""Data parallelism over CPU cores: one batch split across worker processes.

Dimension legend
    B  batch          Bk  the examples of worker k (sum over k is B)
    T  glimpses       D  = C*H*W pixels      Z  latent size
    P  the total number of parameter values

Why processes: at the paper's batch of 100 a DRAW step is thousands of small NumPy
calls between GEMMs, and NumPy runs each of those on one core. Threads would
serialise on the interpreter lock between the calls; processes do not. Each worker
runs `engine.loss_and_grads` (what `model.loss_and_grads` runs once its inputs are
checked; the parent checks the whole batch) on its slice of the batch, with its share
of the cores for BLAS threads (one each on two cores), so the elementwise work is
spread over all cores while the GEMMs stay nearly as efficient (bench/README.md has
the measurements). The loss is a batch mean, so the full-batch gradient is the
Bk/B-weighted sum of the workers' gradients (the weighting, the flat layout and the
split are distributed.py's, shared with the MPI ranks).

How data moves (no pickle): parameters, each worker's inputs and each worker's
gradients live in files mapped into memory (/dev/shm where it exists), written by
one side and read by the other. Commands and the small statistics travel as JSON
lines on the workers' stdin and stdout. The files are unlinked as soon as every
process has mapped them, so nothing is left behind, whatever way the run ends.
A worker ignores Ctrl-C (the training loop handles it) and exits when its stdin
closes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np

from .backend import is_gpu_array, retain_freed_memory
from .config import DrawConfig
from . import engine
from .distributed import flat_layout, flat_views, shard_bounds, write_weighted
from .model import check_inputs, param_shapes


class WorkerError(RuntimeError):
    """A worker process failed or exited; the engine is closed."""


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(batch_size: int, min_share: int = 32) -> int:
    """Worker count for `workers=0`: one per usable core, each with >= min_share examples."""
    return max(1, min(usable_cores(), batch_size // min_share))


def resolve_workers(workers: int, device: str, batch_size: int) -> int:
    """TrainConfig.workers -> the process count to use: 0 is one per core on the CPU
    (auto_workers) and 1 on the GPU, where the batch is not split."""
    if device == "gpu":
        if workers > 1:
            raise ValueError(f"workers = {workers} splits batches over CPU processes; "
                             "on the GPU use 0 or 1")
        return 1
    return workers or auto_workers(batch_size)


def _layout(cfg: DrawConfig):
    """name -> (offset, shape) of every parameter in one flat (P,) vector, and P."""
    return flat_layout(param_shapes(cfg))


def _shared_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else tempfile.gettempdir()


def _new_shared_file(nbytes: int) -> str:
    fd, path = tempfile.mkstemp(prefix="npdraw-", suffix=".buf", dir=_shared_dir())
    try:
        os.ftruncate(fd, max(nbytes, 1))
    finally:
        os.close(fd)
    return path


def _map(path: str, dtype, count: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r+", shape=(count,))


class _WorkerBuffers:
    """One worker's mapped file: [grads (P,) | x (cap*D,) | eps (T*cap*Z,) | out (3*cap,)].

    out holds loss_only's per-example results: the loss, L^x and the log-weight.
    """

    def __init__(self, path, cfg, dtype, P, capacity):
        D, TZ = cfg.D, cfg.T * cfg.z_dim
        self.capacity = capacity
        self.flat = _map(path, dtype, self.count(cfg, P, capacity))
        self.grads = self.flat[:P]
        self.x = self.flat[P:P + capacity * D]
        self.eps = self.flat[P + capacity * D:P + capacity * (D + TZ)]
        self.out = self.flat[P + capacity * (D + TZ):].reshape(3, capacity)

    def inputs(self, cfg, n):
        """Contiguous (n, D) and (T, n, Z) views at the front of the x and eps areas."""
        return (self.x[:n * cfg.D].reshape(n, cfg.D),
                self.eps[:cfg.T * n * cfg.z_dim].reshape(cfg.T, n, cfg.z_dim))

    @staticmethod
    def count(cfg, P, capacity):
        """Values in the file: P gradients, then per example x (D), eps (T*Z) and out (3)."""
        return P + capacity * (cfg.D + cfg.T * cfg.z_dim + 3)


class DataParallel:
    """`model.loss_and_grads`, computed by `workers` processes on slices of the batch.

    Use as a context manager, or call close(). Bound to one config and one dtype;
    parameters must be NumPy arrays. With the same inputs the result equals
    loss_and_grads' up to floating-point summation order.
    """

    def __init__(self, cfg: DrawConfig, workers: int, dtype="float32"):
        if not isinstance(cfg, DrawConfig):
            raise ValueError(f"cfg must be a DrawConfig, got {type(cfg).__name__}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.cfg, self.workers = cfg, workers
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.layout, self.P = _layout(cfg)
        self._procs, self._buffers, self._logs = [], [], []
        self._closed = False
        params_path = _new_shared_file(self.P * self.dtype.itemsize)
        try:
            self._params_flat = _map(params_path, self.dtype, self.P)
            self._params = flat_views(self._params_flat, self.layout)
            spec = {"cfg": cfg.to_dict(), "dtype": self.dtype.name, "params": params_path}
            # The cores are shared out: on two cores each worker runs a one-thread BLAS.
            blas_threads = str(max(1, usable_cores() // workers))
            env = dict(os.environ, OPENBLAS_NUM_THREADS=blas_threads,
                       OMP_NUM_THREADS=blas_threads, MKL_NUM_THREADS=blas_threads)
            package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (package_root, env.get("PYTHONPATH")) if p)
            for _ in range(workers):
                log = tempfile.TemporaryFile()
                self._logs.append(log)
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "npdraw.parallel", json.dumps(spec)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env))
                self._buffers.append(None)
            for k in range(workers):
                self._receive(k)                   # "ready": the params file is mapped
        except BaseException:
            self.close()
            raise
        finally:
            os.unlink(params_path)

    # -- plumbing

    def _send(self, k, message):
        try:
            self._procs[k].stdin.write(json.dumps(message).encode() + b"\n")
            self._procs[k].stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail(k)

    def _receive(self, k):
        while True:                    # skip what something else printed at start-up
            line = self._procs[k].stdout.readline()
            if not line:
                self._fail(k)
            if line.startswith(_PREFIX):
                break
        reply = json.loads(line[len(_PREFIX):])
        if "error" in reply:
            self.close()
            raise WorkerError(f"parallel worker {k} failed: {reply['error']}")
        return reply

    def _fail(self, k):
        proc, log = self._procs[k], self._logs[k]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        log.seek(0)
        tail = log.read()[-2000:].decode(errors="replace").strip()
        self.close()
        raise WorkerError(f"parallel worker {k} exited unexpectedly (exit code {code})"
                           + (f":\n{tail}" if tail else ""))

    def _ensure_capacity(self, k, n):
        current = self._buffers[k]
        if current is not None and current.capacity >= n:
            return current
        capacity = max(n, 2 * current.capacity if current is not None else n)
        path = _new_shared_file(self.dtype.itemsize * _WorkerBuffers.count(self.cfg, self.P,
                                                                           capacity))
        try:
            self._buffers[k] = _WorkerBuffers(path, self.cfg, self.dtype, self.P, capacity)
            self._send(k, {"cmd": "attach", "path": path, "capacity": capacity})
            self._receive(k)
        finally:
            os.unlink(path)
        return self._buffers[k]

    # -- the public call

    def _dispatch(self, params, x, eps, message):
        """Check the inputs, share params and slices of the batch, send `message` to each
        worker with a slice; -> ([(worker, lo, hi)], B). A failure once the workers have
        been addressed closes the engine: their replies could no longer be matched."""
        if self._closed:
            raise WorkerError("this DataParallel engine is closed")
        x, eps, _xp, dtype = check_inputs(params, self.cfg, x, eps)
        if any(is_gpu_array(p) for p in params.values()):
            raise ValueError("DataParallel runs on the CPU: pass NumPy arrays")
        if dtype != self.dtype:
            raise ValueError(f"params are {dtype}, this engine was built for {self.dtype}")
        B = x.shape[0]
        count = min(self.workers, B)
        bounds = shard_bounds(B, count)
        slices = []
        try:
            for name, view in self._params.items():
                view[...] = params[name]
            for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                buffers = self._ensure_capacity(k, hi - lo)
                xk, ek = buffers.inputs(self.cfg, hi - lo)
                xk[...] = x[lo:hi]
                ek[...] = eps[:, lo:hi]
                slices.append((k, lo, hi))
            # Every slice is in place before the first worker wakes: a woken worker can
            # share the parent's core for a moment, and would delay the later copies.
            for k, lo, hi in slices:
                self._send(k, {**message, "n": hi - lo, "share": (hi - lo) / B})
        except BaseException:
            self.close()
            raise
        return slices, B

    def _collect(self, slices):
        """The workers' replies, in order; any failure (Ctrl-C included) closes the engine."""
        try:
            return [self._receive(k) for k, _, _ in slices]
        except BaseException:
            self.close()
            raise

    def loss_and_grads(self, params, x, eps):
        """As model.loss_and_grads(params, cfg, x, eps), with the batch split over workers.

        params: NumPy arrays of this engine's dtype   x: (B, D)   eps: (T, B, Z)
        -> (loss, grads, stats); stats["activation_bytes"] sums the workers'.
        """
        slices, B = self._dispatch(params, x, eps, {"cmd": "step"})
        loss, recon, kl, act, shares = 0.0, 0.0, 0.0, 0, []
        for (k, lo, hi), reply in zip(slices, self._collect(slices)):
            share = (hi - lo) / B
            loss += share * reply["loss"]
            recon += share * reply["recon"]
            kl = kl + share * np.asarray(reply["kl"])
            act += reply["activation_bytes"]
            shares.append(flat_views(self._buffers[k].grads, self.layout))
        # Each worker has weighted its gradients by its share of the batch: sum them into
        # new arrays (the shared buffers are overwritten by the next call).
        grads = {}
        for name in self.layout:
            total = (shares[0][name].copy() if len(shares) == 1
                     else np.add(shares[0][name], shares[1][name]))
            for more in shares[2:]:
                total += more[name]
            grads[name] = total
        stats = {"loss": loss, "recon": recon, "kl": kl, "kl_total": float(kl.sum()),
                 "activation_bytes": act}
        return loss, grads, stats

    def loss_only(self, params, x, eps, return_terms=False):
        """As model.loss_only(params, cfg, x, eps, return_terms), split over workers.

        -> (loss_per_example (B,), stats) with stats "recon", "kl", "kl_total", "loss"
           and, with return_terms, "recon_per_example" and "log_weight" (B,).
        """
        slices, B = self._dispatch(params, x, eps, {"cmd": "eval", "terms": bool(return_terms)})
        per_example = np.empty((3, B), self.dtype)
        kl, recon_mean = 0.0, 0.0
        for (k, lo, hi), reply in zip(slices, self._collect(slices)):
            per_example[:, lo:hi] = self._buffers[k].out[:, :hi - lo]
            kl = kl + (hi - lo) / B * np.asarray(reply["kl"])
            recon_mean += (hi - lo) / B * reply["recon"]
        loss, recon, log_weight = per_example
        stats = {"recon": recon_mean, "kl": kl, "kl_total": float(kl.sum()),
                 "loss": float(loss.mean())}
        if return_terms:
            stats["recon_per_example"] = recon
            stats["log_weight"] = log_weight
        return loss, stats

    def close(self):
        """Stop the workers (closing their stdin) and release the mapped files."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        for log in self._logs:
            log.close()
        self._buffers = [None] * len(self._procs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------- the worker side

_PREFIX = b"npdraw-worker "    # marks protocol lines: anything else on the pipe is ignored
_channel = None                 # the worker's protocol stream: its original stdout


def _reply(message):
    _channel.write(_PREFIX + json.dumps(message).encode() + b"\n")
    _channel.flush()


def _worker(spec_json: str) -> None:
    global _channel
    # The parent handles Ctrl-C and SIGTERM (also when sent to the whole process group)
    # and closes us; it stops between steps, so we must outlive the signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    retain_freed_memory()                          # every step reuses the same buffers
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    # Replies go to the original stdout; a stray print goes to stderr, not into the protocol.
    _channel = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr
    spec = json.loads(spec_json)
    cfg = DrawConfig.from_dict(spec["cfg"])
    dtype = np.dtype(spec["dtype"])
    layout, P = _layout(cfg)
    params = flat_views(_map(spec["params"], dtype, P), layout)
    buffers = None
    _reply({"ready": True})
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if message["cmd"] == "attach":
                buffers = _WorkerBuffers(message["path"], cfg, dtype, P, message["capacity"])
                _reply({"attached": True})
            elif message["cmd"] == "step":
                x, eps = buffers.inputs(cfg, message["n"])
                # the parent checked the whole batch; the slice is not checked again
                loss, grads, stats = engine.loss_and_grads(params, cfg, x, eps)
                write_weighted(grads, message["share"], flat_views(buffers.grads, layout))
                _reply({"loss": loss, "recon": stats["recon"], "kl": stats["kl"].tolist(),
                        "activation_bytes": stats["activation_bytes"]})
            elif message["cmd"] == "eval":
                n = message["n"]
                x, eps = buffers.inputs(cfg, n)
                per_example, stats = engine.loss_only(params, cfg, x, eps, message["terms"])
                buffers.out[0, :n] = per_example
                if message["terms"]:
                    buffers.out[1, :n] = stats["recon_per_example"]
                    buffers.out[2, :n] = stats["log_weight"]
                _reply({"kl": stats["kl"].tolist(), "recon": stats["recon"]})
            else:
                _reply({"error": f"unknown command {message['cmd']!r}"})
        except Exception as error:  # reported to the parent, which raises it
            _reply({"error": f"{type(error).__name__}: {error}"})


if __name__ == "__main__":
    _worker(sys.argv[1])
