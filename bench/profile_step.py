"""Where npdraw's training step goes: its time and memory traffic by category.

One step is what bench/run.py times (``NpdrawRunner.step``: loss_and_grads, the
all-reduce under ranks, clipping and Adam). For each batch size and model:

* **Time.** For the profiled steps only, the functions of each category (the
  engine's helpers, npdraw.engine_attention's and npdraw.optim's functions, the
  communicator's ``reduce_step``) are replaced by timing wrappers; each call's own
  time (less that of wrapped calls inside it) goes to its category. The originals
  are put back afterwards. The GEMMs that npdraw/engine.py writes inline (``@``,
  ``xp.matmul``) cannot be wrapped: they are timed by replaying the very GEMMs of
  one step (shapes, strides, aliasing and ``out=`` as recorded in the counted step
  below) on arrays of noise. What no category claims is "unattributed", so the
  lines sum to the profiled step by construction.
* **The all-reduce under ranks.** In the step, rank 0's all-reduce call also waits for
  the other ranks to finish their share of the step. So the call (the communicator's
  ``_allreduce_flat``) is wrapped on its own, and after the profiled steps the bare
  all-reduce is timed with the ranks lined up (``NpdrawRunner.allreduce_seconds``: a
  barrier, then the same call on a zero buffer of the flat buffer's size and dtype;
  max(steps, 5) of them, median taken). "allreduce" is ``reduce_step``'s own time
  (packing the gradients into the flat buffer, unpacking) plus the call's time up to
  that median; "waiting for the other ranks" is the rest of the call's time, 0 if the
  median exceeds it. The two add up to the wrapped ``reduce_step``; in one process
  there is no call and no wait.
* **Memory traffic.** One more step runs on arrays of an ndarray subclass that
  counts, for every NumPy operation (each ufunc call, matmul and reduction included,
  each array function such as concatenate or take, each slice assignment and astype),
  the bytes of its array operands and of its results; a view costs nothing. "passes"
  is a category's bytes divided by the bytes the step's forward keeps for backward
  (``activation_bytes``). The numerics are NumPy's own: the counted step computes
  what a plain step computes, to the bit.

Run from the repository root:

    python bench/profile_step.py --batch 100 --batch 500 --model attention
    python bench/profile_step.py --batch 100 --ranks 2 --json

Exit status: 0 done, 2 bad usage.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import types
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/profile_step.py` puts bench/ first
    sys.path.insert(0, str(_REPO_ROOT))

import numpy as np  # noqa: E402

from bench import run as bench_run  # noqa: E402

# (key, label), in the order printed; "gemm" is the inline GEMMs' replay plus the
# no-attention write layer (a wrapped linear_forward).
CATEGORIES = [
    ("gemm", "GEMMs (inline ones replayed)"),
    ("lstm", "LSTM elementwise"),
    ("filterbank", "filterbank build, read, write"),
    ("error_image", "error image x - sigmoid(c) (eq 3)"),
    ("latent", "latent and KL"),
    ("loss", "loss (BCE, batch means)"),
    ("weight_layout", "weight layout (transposes)"),
    ("input_check", "input checks"),
    ("clip_adam", "clipping and Adam"),
    ("allreduce", "allreduce (packing, bare MPI call)"),
    ("rank_wait", "waiting for the other ranks"),
    ("unattributed", "unattributed"),
]
_ENGINE = "engine body"   # forward/backward's own lines: inline GEMMs and glue
# Under ranks, the communicator's all-reduce call in the step (``_allreduce_flat``): split
# after the steps into the bare all-reduce ("allreduce") and the wait ("rank_wait").
_CALL = "allreduce call"
BARE_REPEATS = 5          # bare all-reduces timed under ranks, at least (median taken)


def _targets(runner):
    """(owner, attribute, category) of every function the profile wraps."""
    from npdraw import engine, engine_attention, model, optim
    found = [(engine, name, "lstm") for name in ("_cell_forward", "_cell_backward")]
    found += [(engine, "linear_forward", "gemm")]
    found += [(engine, name, "latent") for name in ("latent_forward", "latent_backward")]
    found += [(engine, name, "loss") for name in ("bce_forward", "bce_backward", "_batch_means")]
    found += [(engine, name, "error_image")
              for name in ("_glimpse_error_into", "_glimpse_error_backward")]
    found += [(engine, name, "weight_layout")
              for name in ("_transpose", "_encoder_weights", "_decoder_heads")]
    found += [(engine_attention, name, "filterbank")
              for name in ("windows_forward", "windows_backward", "read_forward",
                           "read_backward", "write_forward", "write_backward")]
    found += [(engine, name, _ENGINE) for name in ("forward", "backward")]
    found += [(model, "check_inputs", "input_check")]
    found += [(optim, name, "clip_adam") for name in ("global_norm", "clip_scale", "adam_step")]
    found += [(runner.comm, "reduce_step", "allreduce")]
    if runner.comm.size > 1:     # the MPI (or NCCL) call inside reduce_step, on its own
        found += [(runner.comm, "_allreduce_flat", _CALL)]
    return found


class _Profile:
    """Own time per category of the wrapped calls, and (while counting) the bytes and
    operations of every NumPy call, charged to the innermost wrapped call."""

    def __init__(self):
        self.seconds = dict.fromkeys([key for key, _ in CATEGORIES] + [_ENGINE, _CALL], 0.0)
        self.stack = []           # [category, seconds of wrapped calls inside]
        self.bytes = dict.fromkeys(self.seconds, 0)
        self.ops = dict.fromkeys(self.seconds, 0)
        self.flops = dict.fromkeys(self.seconds, 0)
        self.inline_gemms = []    # specs of the engine's own matmuls, for the replay
        self._depth = 0           # > 0 inside a counted NumPy call: its insides not counted

    def wrap(self, fn, category):
        def timed(*args, **kwargs):
            frame = [category, 0.0]
            self.stack.append(frame)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.stack.pop()
                self.seconds[category] += spent - frame[1]
                if self.stack:
                    self.stack[-1][1] += spent
        timed.__wrapped__ = fn
        return timed

    def charge_arrays(self, read, written, flops=0, gemm_spec=None):
        """Charge the bytes of the arrays read and of those written; an array read twice
        (g * g) is read once."""
        def distinct(arrays):
            unique = {(a.__array_interface__["data"][0], a.shape, a.strides): a for a in arrays}
            return sum(map(_distinct_bytes, unique.values()))
        self.charge(distinct(read) + distinct(written), flops, gemm_spec)

    def charge(self, nbytes, flops=0, gemm_spec=None):
        category = self.stack[-1][0] if self.stack else "unattributed"
        if category == _CALL:    # (the MPI call runs no NumPy operation)
            category = "allreduce"
        if category == _ENGINE:
            category = "gemm" if gemm_spec is not None else "unattributed"
            if gemm_spec is not None:
                self.inline_gemms.append(gemm_spec)
        self.bytes[category] += int(nbytes)
        self.ops[category] += 1
        self.flops[category] += int(flops)


_ACTIVE: _Profile | None = None   # the profile that _Counted arrays report to


def _plain(value):
    """value with _Counted arrays (also inside tuples and lists) as plain ndarrays."""
    if isinstance(value, _Counted):
        return value.view(np.ndarray)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def _arrays(value):
    """The ndarrays in value (an array, or nested tuples, lists and dict values)."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays(v)]
    if isinstance(value, dict):
        return _arrays(list(value.values()))
    return []


def _distinct_bytes(a) -> int:
    """Bytes an array's elements occupy: a broadcast (zero-stride) axis counts once."""
    return a.itemsize * int(np.prod([n for n, s in zip(a.shape, a.strides) if s != 0]))


def _gemm_flops(x, y) -> int:
    """2 m n k (times any batch) for matmul(x, y); a 1-d operand is one row or column."""
    m = x.shape[-2] if x.ndim > 1 else 1
    k = x.shape[-1]
    n = y.shape[-1] if y.ndim > 1 else 1
    batch = np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    return 2 * m * n * k * int(np.prod(batch))


def _root(a):
    owner = a
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    return owner


def _layout(a) -> tuple:
    """(the array owning a's memory, a's byte offset in it, shape, strides). The owner
    itself is kept, so that no later array takes its id while the spec lives."""
    root = _root(a)
    offset = a.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return (root, offset, a.shape, a.strides)


class _Counted(np.ndarray):
    """An ndarray that reports the bytes of every NumPy operation on it to _ACTIVE."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        profile = _ACTIVE if _ACTIVE is not None and _ACTIVE._depth == 0 else None
        if out is not None:
            kwargs["out"] = _plain(out)
        if profile is not None:
            profile._depth += 1
        try:
            result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        finally:
            if profile is not None:
                profile._depth -= 1
        if profile is not None:
            arrays = [a for a in inputs if isinstance(a, np.ndarray)]
            written = _arrays(result)
            spec = None
            flops = 0
            if ufunc is np.matmul and method == "__call__":
                flops = _gemm_flops(*arrays[:2])
                spec = ([_layout(a) for a in arrays[:2]],
                        None if out is None else _layout(_plain(out)[0]))
            profile.charge_arrays(arrays, written, flops, spec)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _recount(result)

    def __array_function__(self, func, types_, args, kwargs):
        profile = _ACTIVE if _ACTIVE is not None and _ACTIVE._depth == 0 else None
        if profile is not None:
            profile._depth += 1
        try:
            result = func(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()})
        finally:
            if profile is not None:
                profile._depth -= 1
        if profile is not None:
            _charge_copy(profile, _arrays((args, kwargs)), result)
        return _recount(result)

    def __setitem__(self, index, value):
        profile = _ACTIVE if _ACTIVE is not None and _ACTIVE._depth == 0 else None
        target = self.view(np.ndarray)
        target[index] = _plain(value)
        if profile is not None:
            written = target[index]
            read = _distinct_bytes(value) if isinstance(value, np.ndarray) else 0
            profile.charge(read + _distinct_bytes(written))

    def astype(self, dtype, *args, **kwargs):
        plain = self.view(np.ndarray)
        result = plain.astype(dtype, *args, **kwargs)
        if _ACTIVE is not None and _ACTIVE._depth == 0 and result is not plain:
            _ACTIVE.charge(_distinct_bytes(plain) + result.nbytes)
        return result.view(_Counted)


def _charge_copy(profile, read, result):
    """Charge read + written bytes unless every result is a view of an input (reshape,
    transpose, broadcast_to move nothing)."""
    roots = {id(_root(a)) for a in read}
    moved = [a for a in _arrays(result) if id(_root(a)) not in roots]
    if moved:
        profile.charge_arrays(read, moved)


def _contiguous(a, *args, **kwargs):
    """np.ascontiguousarray while counting (NumPy does not dispatch it to subclasses)."""
    result = _ORIGINAL_CONTIGUOUS(_plain(a), *args, **kwargs)
    if _ACTIVE is not None and _ACTIVE._depth == 0 and isinstance(a, np.ndarray):
        _charge_copy(_ACTIVE, [a], result)
    return result.view(_Counted)


_ORIGINAL_CONTIGUOUS = np.ascontiguousarray


def _recount(result):
    """Results as _Counted, so that operations on them are counted too."""
    if isinstance(result, np.ndarray) and not isinstance(result, _Counted):
        return result.view(_Counted)
    if isinstance(result, tuple):
        return tuple(_recount(r) for r in result)
    if isinstance(result, list):
        return [_recount(r) for r in result]
    return result


# NumPy's array makers, patched while counting so that new buffers count too
_MAKERS = ("empty", "zeros", "ones", "empty_like", "zeros_like", "ones_like", "full")


class _Wrapped:
    """A context that installs the profile's wrappers (and, counting, _Counted array
    makers), and puts every original back on leaving, even after an error."""

    def __init__(self, profile, targets, counting=False):
        self.profile, self.targets, self.counting = profile, targets, counting
        self._undo = []

    def __enter__(self):
        global _ACTIVE
        for owner, name, category in self.targets:
            own = isinstance(owner, types.ModuleType) or name in vars(owner)
            original = getattr(owner, name)
            self._undo.append((owner, name, original, own))
            setattr(owner, name, self.profile.wrap(original, category))
        if self.counting:
            for name in _MAKERS:
                maker = getattr(np, name)
                self._undo.append((np, name, maker, True))
                setattr(np, name, lambda *a, _maker=maker, **k: _maker(*a, **k).view(_Counted))
            self._undo.append((np, "ascontiguousarray", np.ascontiguousarray, True))
            np.ascontiguousarray = _contiguous
            _ACTIVE = self.profile
        return self.profile

    def __exit__(self, *exc):
        global _ACTIVE
        _ACTIVE = None
        for owner, name, original, own in reversed(self._undo):
            if own:
                setattr(owner, name, original)
            else:            # an instance's method: drop the wrapper, the class's shows again
                delattr(owner, name)
        self._undo.clear()
        return False


def _each_array(tree, convert):
    """tree (an array, or dicts of them and other values) with convert applied to each array."""
    if isinstance(tree, np.ndarray):
        return convert(tree)
    if isinstance(tree, dict):
        return {k: _each_array(v, convert) for k, v in tree.items()}
    return tree


def _as_counted(tree):
    return _each_array(tree, lambda a: a.view(_Counted))


def _as_plain(tree):
    return _each_array(tree, np.asarray)     # asarray drops the subclass, as a view


def count_step(runner) -> _Profile:
    """One training step on counting arrays -> the profile holding bytes, operations and
    FLOPs per category, and the engine's inline GEMMs. The runner steps as usual (over
    ranks, every rank takes the step) and keeps plain arrays."""
    profile = _Profile()
    runner.params, runner.state = _as_counted(runner.params), _as_counted(runner.state)
    x, eps = runner.x, runner.eps
    runner.x, runner.eps = _as_counted(x), _as_counted(eps)
    try:
        with _Wrapped(profile, _targets(runner), counting=True):
            runner.step()
    finally:
        runner.params, runner.state = _as_plain(runner.params), _as_plain(runner.state)
        runner.x, runner.eps = x, eps
    if runner.comm.size > 1:     # the Allreduce itself, in place on the flat buffer
        flat = runner.comm._buffer.flat
        profile.bytes["allreduce"] += 2 * flat.nbytes
        profile.ops["allreduce"] += 1
    return profile


def gemm_replay(specs, rng_seed: int = 0):
    """A function running the recorded GEMMs once, on noise laid out as the originals
    were: one buffer per distinct original owner, each operand a strided view of it
    at its original offset, so that operands shared (a weight every glimpse) or
    overlapping (slots of the stacked buffer) stay so."""
    rng = np.random.default_rng(rng_seed)
    buffers = {}

    def view(layout):
        root, offset, shape, strides = layout
        if id(root) not in buffers:   # noise, not np.empty's leftovers (denormals are slow)
            buffers[id(root)] = rng.standard_normal(root.size).astype(root.dtype).view(np.uint8)
        end = offset + sum((n - 1) * s for n, s in zip(shape, strides)) + root.itemsize
        assert offset >= 0 and min(strides, default=0) >= 0 and end <= root.nbytes, layout[1:]
        flat = buffers[id(root)][offset:].view(root.dtype)
        return np.lib.stride_tricks.as_strided(flat, shape, strides)

    calls = [(view(a), view(b), None if out is None else view(out)) for (a, b), out in specs]

    def replay():
        for a, b, out in calls:
            if out is None:
                np.matmul(a, b)
            else:
                np.matmul(a, b, out=out)
    replay.buffers = len(buffers)
    return replay


def split_allreduce(call_ms: float, bare_ms: float) -> tuple:
    """(into "allreduce", into "rank_wait") of the all-reduce call's ms a step in the
    step: up to the bare all-reduce's median (ranks lined up by a barrier) is the
    all-reduce itself, the rest waiting for the other ranks; both add up to call_ms, and
    neither is negative (a bare median above the call, noise, leaves no wait)."""
    own = min(bare_ms, call_ms)
    return own, call_ms - own


def profile_runner(runner, steps: int, warmup: int) -> dict:
    """Profile one runner (rank 0's, under ranks) -> the figures of one model and batch.
    Runs max(warmup, 1) + 2 * steps + 1 (counted) steps of the runner: the warm-up builds
    the engine's cached constants, and the counted step comes last (the steps right after
    it ran 20-35 ms slower, the plain ones then looking slower than the profiled). Under
    ranks, then max(steps, BARE_REPEATS) bare all-reduces
    (``NpdrawRunner.allreduce_seconds``)."""
    warmup = max(warmup, 1)
    for _ in range(warmup):
        runner.step()
    plain = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step()
        plain.append(time.perf_counter() - start)
    timed = _Profile()
    profiled = []
    with _Wrapped(timed, _targets(runner)):
        for _ in range(steps):
            start = time.perf_counter()
            runner.step()
            profiled.append(time.perf_counter() - start)
    counted = count_step(runner)                      # last: see the docstring
    bare = runner.allreduce_seconds(max(steps, BARE_REPEATS)) if runner.comm.size > 1 else []
    replay = gemm_replay(counted.inline_gemms)
    replay_secs = bench_run.gemm_times(replay, steps)

    step_ms = 1000.0 * statistics.fmean(profiled)      # means add up; medians would not
    ms = {key: 1000.0 * timed.seconds[key] / steps for key, _ in CATEGORIES}
    ms["gemm"] += 1000.0 * statistics.median(replay_secs)
    call_ms = 1000.0 * timed.seconds[_CALL] / steps
    bare_ms = 1000.0 * statistics.median(bare) if bare else 0.0
    into_allreduce, ms["rank_wait"] = split_allreduce(call_ms, bare_ms)
    ms["allreduce"] += into_allreduce     # reduce_step's own time (packing) + the bare call
    ms["unattributed"] = step_ms - sum(v for k, v in ms.items() if k != "unattributed")
    counted.bytes["unattributed"] += counted.bytes[_ENGINE]
    counted.ops["unattributed"] += counted.ops[_ENGINE]
    act = int(runner._npdraw.loss_and_grads(runner.params, runner.cfg, runner.x,
                                            runner.eps)[2]["activation_bytes"])
    categories = {}
    for key, label in CATEGORIES:
        categories[key] = {"label": label, "ms": ms[key], "bytes": counted.bytes[key],
                           "passes": counted.bytes[key] / act, "ops": counted.ops[key],
                           "gemm_flops": counted.flops[key]}
    return {"step_ms_profiled": step_ms, "step_ms_plain": 1000.0 * statistics.fmean(plain),
            "step_ms_plain_median": 1000.0 * statistics.median(plain),
            "engine_body_ms": 1000.0 * timed.seconds[_ENGINE] / steps,
            "gemm_replay_ms": 1000.0 * statistics.median(replay_secs),
            "inline_gemms": len(counted.inline_gemms), "activation_bytes": act,
            "allreduce_call_ms": call_ms, "allreduce_bare_ms": [1000.0 * t for t in bare],
            "allreduce_bare_median_ms": bare_ms if bare else None,
            "categories": categories, "steps_run": warmup + 1 + 2 * steps}


# ------------------------------------------------------------------ the run

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/profile_step.py",
        description="Time and memory traffic of one npdraw training step, by category.")
    p.add_argument("--batch", type=int, action="append",
                   help="batch size; repeat for several (default: 100)")
    p.add_argument("--model", choices=["both", "attention", "no-attention"], default="attention",
                   help="which models to profile (default: attention)")
    p.add_argument("--glimpses", "--T", dest="T", type=int, default=64, help="glimpses T")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (and as many plain ones)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="floating-point precision of the steps")
    p.add_argument("--ranks", type=int, default=1,
                   help="npdraw's MPI ranks sharing each batch, as in train (0: one per core; "
                        "1, the default: one process)")
    p.add_argument("--threads", type=int, default=0,
                   help="set the BLAS thread count (0: leave it as it is)")
    p.add_argument("--gemm-n", type=int, default=2048, help="size of the peak-measuring matmul")
    p.add_argument("--gemm-reps", type=int, default=5, help="peak-measuring matmuls")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random batch, parameters and noise")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--markdown", action="store_true",
                   help="print the figures as Markdown tables, for bench/README.md")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    args.batch = args.batch or [100]
    if min(args.batch + [args.steps, args.T, args.gemm_n, args.gemm_reps]) < 1:
        p.error("--batch, --steps, --glimpses, --gemm-n and --gemm-reps must be at least 1")
    if args.warmup < 0 or args.ranks < 0 or args.threads < 0:
        p.error("--warmup, --ranks and --threads must not be negative")
    return args


def _runs(args, npdraw, comm):
    """(model name, batch, cfg, runner) of every profile, the same order on every rank."""
    for B in args.batch:
        for name, cfg, params, x, eps in bench_run._models(args, npdraw, B):
            yield name, B, cfg, bench_run.NpdrawRunner(npdraw, cfg, params, x, eps, "cpu", comm)


def run(args, comm) -> dict:
    """Rank 0's work: the peak, then every profile. The other ranks run ``follow``."""
    import npdraw
    from npdraw import backend, engine_layers
    retained = backend.retain_freed_memory()        # as train and bench/run.py do
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": bench_run.device_description("cpu"), "blas": bench_run.blas_info(),
              "settings": {"batches": args.batch, "T": args.T, "dtype": args.dtype,
                           "steps": args.steps, "warmup": args.warmup, "ranks": comm.size,
                           "threads": args.threads,
                           "seed": args.seed, "freed_memory_retained": retained,
                           "kernels": engine_layers.kernels()},
              "gemm": bench_run.blas_peak(args.gemm_n, args.gemm_reps), "profiles": []}
    peak = result["gemm"]["peak_gflops"]
    for name, B, cfg, runner in _runs(args, npdraw, comm):
        try:
            entry = {"model": name, "batch": B, "config": cfg.to_dict(),
                     "flops_per_step": bench_run.count_flops(cfg, B)}
            entry.update(profile_runner(runner, args.steps, args.warmup))
        finally:
            runner.close()
        gemm = entry["categories"]["gemm"]
        gflops = gemm["gemm_flops"] / gemm["ms"] / 1e6 if gemm["ms"] > 0 else None
        entry["gemm_gflops"] = gflops
        # rank 0's GEMMs have its share of the cores: against its share of the peak
        entry["gemm_peak_fraction"] = None if gflops is None else gflops / (peak / comm.size)
        # The whole step's share of peak, as bench/run.py gives it: count_flops / step time
        entry["step_peak_fraction"] = entry["flops_per_step"] / entry["step_ms_plain"] / 1e6 / peak
        result["profiles"].append(entry)
    return result


def follow(args, comm) -> None:
    import npdraw
    for _name, _B, _cfg, runner in _runs(args, npdraw, comm):
        runner.follow()


def _mb(n: float) -> str:
    return f"{n / 1e6:10.1f}"


def format_report(r: dict) -> str:
    d, s, g = r["device"], r["settings"], r["gemm"]
    lines = [f"npdraw training step by category, {r['date']}",
             f"device: {d['cpu']}, {d['cores']} usable cores; python {d['python']}, "
             f"numpy {d['numpy']}"]
    for lib in r["blas"]:
        lines.append(f"BLAS: {lib.get('internal_api')} kernel {lib.get('architecture')}, "
                     f"{lib.get('num_threads')} threads")
    lines.append(f"GEMM peak {g['peak_gflops']:.1f} GFLOP/s ({g['n']}^3 float32: best "
                 f"{g['best_gflops']:.1f}, one core {g['single_core_best_gflops']:.1f} x "
                 f"{g['cores']} cores)")
    where = (f"rank 0 of {s['ranks']} MPI ranks (each on its slice of the batch)"
             if s["ranks"] > 1 else "one process")
    lines.append(f"{s['dtype']}, T {s['T']}, {where}; means of {s['steps']} profiled steps; "
                 "passes = bytes moved / activation bytes")
    for e in r["profiles"]:
        c = e["config"]
        lines.append("")
        lines.append(f"[{e['model']}, batch {e['batch']}] enc/dec {c['enc_dim']}/{c['dec_dim']}, "
                     f"z {c['z_dim']}; step {e['step_ms_profiled']:.1f} ms profiled, "
                     f"{e['step_ms_plain']:.1f} ms plain; activations "
                     f"{e['activation_bytes'] / 1e6:.1f} MB")
        lines.append(f"  {'category':36s} {'ms/step':>9s} {'share':>6s} {'NumPy ops':>9s} "
                     f"{'MB moved':>10s} {'passes':>7s}")
        for key, cat in e["categories"].items():
            if key in ("allreduce", "rank_wait") and s["ranks"] == 1:
                lines.append(f"  {cat['label']:36s} {'n/a (one process)':>17s}")
                continue
            lines.append(f"  {cat['label']:36s} {cat['ms']:9.2f} "
                         f"{100 * cat['ms'] / e['step_ms_profiled']:5.1f}% {cat['ops']:9d} "
                         f"{_mb(cat['bytes'])} {cat['passes']:7.2f}")
        lines.append(f"  {'total':36s} {e['step_ms_profiled']:9.2f} 100.0%")
        gemm = e["categories"]["gemm"]
        if e["gemm_gflops"] is not None:
            share = "peak" if s["ranks"] == 1 else f"rank 0's share of peak (1/{s['ranks']})"
            lines.append(f"  GEMMs: {gemm['gemm_flops'] / 1e9:.2f} GFLOP at "
                         f"{e['gemm_gflops']:.1f} GFLOP/s, {100 * e['gemm_peak_fraction']:.0f}% of "
                         f"{share}; the whole step: {100 * e['step_peak_fraction']:.0f}% of peak "
                         f"(count_flops {e['flops_per_step'] / 1e9:.2f} GFLOP / plain step)")
        if e.get("allreduce_bare_ms"):
            lines.append(f"  the all-reduce call took {e['allreduce_call_ms']:.1f} ms a step in the "
                         f"step, {e['allreduce_bare_median_ms']:.1f} ms alone (median of "
                         f"{len(e['allreduce_bare_ms'])}, the ranks lined up by a barrier): "
                         "that much in 'allreduce' (with the packing), the rest in 'waiting for "
                         "the other ranks'")
        lines.append(f"  the {e['inline_gemms']} inline GEMMs replay in "
                     f"{e['gemm_replay_ms']:.1f} ms "
                     f"of the engine body's {e['engine_body_ms']:.1f} ms in the step (the rest: "
                     "its slicing, copies and small sums, in 'unattributed')")
        if e["categories"]["unattributed"]["ms"] < 0:
            lines.append("  note: negative 'unattributed': the replay ran slower than the step's "
                         "own GEMMs (a busy machine?); run again")
    return "\n".join(lines)


def format_markdown(r: dict) -> str:
    """One Markdown table a profile (model and batch), with a line saying where and when."""
    d, s, g = r["device"], r["settings"], r["gemm"]
    where = f"{s['ranks']} MPI ranks (rank 0's figures)" if s["ranks"] > 1 else "one process"
    blocks = []
    for e in r["profiles"]:
        lines = [f"**{e['model']}, batch {e['batch']}** ({r['date'][:10]}, {d['cpu']}, "
                 f"{d['cores']} cores, {where}, {s['dtype']}, T {s['T']}): step "
                 f"{e['step_ms_profiled']:.0f} ms profiled, {e['step_ms_plain']:.0f} ms plain; "
                 f"GEMM peak {g['peak_gflops']:.0f} GFLOP/s, the step "
                 f"{100 * e['step_peak_fraction']:.0f}% of it",
                 "",
                 "| category | ms/step | share | NumPy ops | MB moved | passes |",
                 "|---|---:|---:|---:|---:|---:|"]
        for key, cat in e["categories"].items():
            if key in ("allreduce", "rank_wait") and s["ranks"] == 1:
                lines.append(f"| {cat['label']} | n/a | | | | |")
                continue
            lines.append(f"| {cat['label']} | {cat['ms']:.1f} | "
                         f"{100 * cat['ms'] / e['step_ms_profiled']:.0f}% | {cat['ops']} | "
                         f"{cat['bytes'] / 1e6:.1f} | {cat['passes']:.2f} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None, launch: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    comm = bench_run.start_ranks(args.ranks, "cpu", min(args.batch), __file__, argv, launch)
    if comm is None:
        return 2
    restore = bench_run.set_threads(args.threads, torch_too=False) if args.threads else None
    try:
        if not comm.is_root:
            follow(args, comm)
            return 0
        result = run(args, comm)
    except BaseException as exc:  # the other ranks wait for rank 0: stop them too
        if comm.size == 1:
            raise
        comm.abort(f"{type(exc).__name__}: {exc}")
    finally:
        if restore is not None:
            restore()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_markdown(result) if args.markdown else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(launch=True))
