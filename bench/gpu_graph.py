"""Prepared experiment for a GPU session (not yet run): can CuPy capture npdraw's
forward + backward of one training step as a CUDA graph, and how fast does a replay run
against eager calls? `python bench/gpu_graph.py 100 2000` (batch sizes)."""
import sys
import time

import numpy as np

sys.path.insert(0, ".")
import npdraw  # noqa: E402
from npdraw import backend, engine  # noqa: E402

try:
    cp = backend.xp_for("gpu")   # CuPy, through the one module that imports it
except ValueError as error:
    sys.exit(f"error: {error}")


def main(B):
    cfg = npdraw.DrawConfig()
    params = {k: cp.asarray(v) for k, v in npdraw.init_params(cfg, 0).items()}
    rng = np.random.default_rng(0)

    def batch():
        return ((rng.random((B, cfg.D)) < 0.3).astype(np.float32),
                rng.standard_normal((cfg.T, B, cfg.z_dim)).astype(np.float32))
    hx, heps = batch()
    x, eps = cp.asarray(hx), cp.asarray(heps)

    def core():
        lpe, terms, cache = engine.forward(params, cfg, x, eps)
        return lpe, engine.backward(params, cfg, cache)

    def timed(fn, n=10):
        fn()
        cp.cuda.get_current_stream().synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        cp.cuda.get_current_stream().synchronize()
        return (time.perf_counter() - t) / n * 1e3

    eager_ms = timed(core)
    ref_lpe, ref_grads = core()
    ref_lpe, ref_grads = ref_lpe.copy(), {k: v.copy() for k, v in ref_grads.items()}

    pool = cp.cuda.MemoryPool()            # the graph's blocks: used by nothing else
    stream = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc), stream:
        core()
        stream.synchronize()
        t = time.perf_counter()
        mode = getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", None)
        stream.begin_capture(mode) if mode is not None else stream.begin_capture()
        out_lpe, out_grads = core()
        graph = stream.end_capture()
        capture_s = time.perf_counter() - t
        graph.upload(stream)
        graph.launch(stream)
        stream.synchronize()
        same = float(cp.abs(out_lpe - ref_lpe).max()) == 0.0 and all(
            float(cp.abs(out_grads[k] - ref_grads[k]).max()) == 0.0 for k in ref_grads)

        def replay():
            graph.launch(stream)
        graph_ms = timed(replay)
        # a new batch copied into the captured input buffers
        hx2, heps2 = batch()
        x.set(hx2, stream=stream)
        eps.set(heps2, stream=stream)
        graph.launch(stream)
        stream.synchronize()
        got = out_lpe.copy()
    with stream:
        want, _ = core()
        stream.synchronize()
        new_batch_diff = float(cp.abs(got - want).max() / cp.abs(want).max())
    print(f"batch {B}: eager {eager_ms:.1f} ms, graph replay {graph_ms:.1f} ms "
          f"({eager_ms / graph_ms:.1f}x), capture {capture_s:.2f} s, "
          f"replay equals eager: {same}, new batch rel diff {new_batch_diff:.2e}, "
          f"graph pool {pool.total_bytes() / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    for B in [int(b) for b in sys.argv[1:]] or [100]:
        try:
            main(B)
        except Exception as error:   # noqa: BLE001 - an experiment: report and go on
            print(f"batch {B}: {type(error).__name__}: {error}", flush=True)
