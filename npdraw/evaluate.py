"""Scoring a DRAW model: the variational bound, the IWAE estimate and the noise they use.

Every score takes its noise from a generator it is given; ``eval_noise_rng`` and
``derived_rng`` make the ones a run uses, apart from the training stream, so that an
evaluation never moves the noise training draws. Also here: the memory a batch of the
model takes (``model_bytes``), which guards.check_memory compares with the machine's.

Dimension legend
    B  batch
    T  glimpses
    Z  latent size
    D  C*H*W, one image flattened
    E  images (examples) of a split
    J  importance samples (IWAE; the argument ``K`` of evaluate_iwae)
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from . import distributed
from . import model as model_lib
from .config import DrawConfig, TrainConfig
from .progress import Progress

# Examples per forward pass during evaluation (independent of the training batch size).
EVAL_BATCH = 500


def device_of(params: dict) -> str:
    """'gpu' when the parameters are CuPy arrays, else 'cpu'."""
    for value in params.values():
        return "gpu" if backend.is_gpu_array(value) else "cpu"
    return "cpu"


def params_dtype(params: dict):
    for value in params.values():
        return np.dtype(value.dtype)
    return np.dtype("float32")


def derived_rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator for evaluation/sampling noise, fixed by (seed, stream...)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(s) for s in stream]])


def host_noise(rng: np.random.Generator, cfg: DrawConfig, batch: int, dtype) -> np.ndarray:
    """eps (T, B, Z) standard normal, drawn on the host in ``dtype``."""
    return rng.standard_normal((cfg.T, batch, cfg.z_dim), dtype=np.dtype(dtype))


def device_noise(rng: np.random.Generator, cfg: DrawConfig, batch: int, dtype, device: str):
    """eps (T, B, Z) standard normal, drawn on the host in ``dtype`` then moved to ``device``."""
    return backend.to_device(host_noise(rng, cfg, batch, dtype), device)


def example_noise(eps: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The noise of examples lo..hi-1 of a batch: eps (T, B, Z) -> (T, hi - lo, Z),
    contiguous (eps itself when that is the whole batch)."""
    return eps if (lo, hi) == (0, eps.shape[1]) else np.ascontiguousarray(eps[:, lo:hi])


def _per_example_floats(cfg: DrawConfig, training: bool) -> int:
    """Floats one example takes in a forward pass (with the caches backward keeps when
    ``training``): model.forward's stacked (features, T+1, B) buffers, the (T, B, .)
    gate, posterior and sigmoid(canvas) buffers, and per glimpse the LSTM, latent,
    canvas and attention (glimpse, patch, filterbank) arrays. An upper bound: it is
    checked against tracemalloc's peaks in tests/test_hardening.py."""
    T, D, Z, He, Hd = cfg.T, cfg.D, cfg.z_dim, cfg.enc_dim, cfg.dec_dim
    rows = 2 + Z + Hd + (cfg.read_dim if cfg.attention else D) + He
    stacked = rows * (T + 1) + T * (2 * Z + 1 + D + 4 * He + 4 * Hd)
    per_glimpse = 2 * He + 2 * Hd + 4 * Z + 3 * D
    if cfg.attention:
        C, H, W, Nr, Nw = cfg.channels, cfg.height, cfg.width, cfg.read_n, cfg.write_n
        per_glimpse += (4 * C * Nr * Nr + 2 * C * Nw * Nw + 4 * (Nr + Nw) * (H + W)
                        + 2 * C * H * W)
    return stacked + (T if training else 2) * per_glimpse + 4 * D


def model_bytes(cfg: DrawConfig, batch: int, itemsize: int, training: bool,
                ema: bool = False) -> int:
    """Estimated peak bytes of one batch: training (forward, backward, gradients and Adam
    state, and the parameters' moving average with ``ema``) or a forward pass
    (evaluation, sampling); ``itemsize``: 4 or 8."""
    n_params = sum(int(np.prod(shape)) for shape in model_lib.param_shapes(cfg).values())
    param_copies = (4 if training else 2) + int(ema)   # params, grads, Adam m and v, EMA
    return itemsize * (int(batch) * _per_example_floats(cfg, training) + param_copies * n_params)


def eval_noise_rng(tcfg: TrainConfig, epoch: int, split: int) -> np.random.Generator:
    """The generator of the noise that scores ``split`` (0 valid, 1 test) after ``epoch``:
    its own for each epoch (tcfg.eval_noise "epoch"), or the same at every epoch ("fixed"),
    which makes the bounds of two epochs a paired comparison of their models."""
    if tcfg.eval_noise == "fixed":
        return derived_rng(tcfg.seed, 4, split)
    return derived_rng(tcfg.seed, 1, epoch, split)


def evaluate_bound(params: dict, cfg: DrawConfig, x: np.ndarray, batch_size: int,
                   rng: np.random.Generator, comm=None, progress: bool = False,
                   label: str = "evaluating") -> float:
    """Mean negative variational bound (L^x + L^z, nats per example) over all of ``x``.

    x: (E, D) host array in [0, 1]; one fresh noise draw per example from ``rng``.
    Returns NaN for an empty ``x``. comm: a distributed communicator whose ranks each
    take their slice of every batch (the same figures as one process, up to rounding;
    every rank gets the result). progress: a bar on stderr over the batches, named label.
    """
    n = int(x.shape[0])
    if n == 0:
        return float("nan")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device, dtype = device_of(params), params_dtype(params)
    comm = distributed.SingleProcess() if comm is None else comm
    total = 0.0
    bar = Progress(f"{label} {n} images", (n + batch_size - 1) // batch_size, progress,
                   rate_unit="it/s")
    for start in range(0, n, batch_size):
        batch = np.asarray(x[start:start + batch_size], dtype=dtype)
        eps = host_noise(rng, cfg, batch.shape[0], dtype)      # the whole batch's, on every rank
        lo, hi = comm.shard(batch.shape[0])
        if hi > lo:
            per_example, _ = model_lib.loss_only(
                params, cfg, backend.to_device(batch[lo:hi], device),
                backend.to_device(example_noise(eps, lo, hi), device))
            total += float(np.sum(backend.to_numpy(per_example), dtype=np.float64))
        bar.update(start // batch_size + 1)
    bar.close()
    return float(comm.sum([total])[0]) / n


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def evaluate_iwae_and_bound(params: dict, cfg: DrawConfig, x: np.ndarray, K: int,
                            batch_size: int, rng: np.random.Generator, comm=None,
                            progress: bool = False):
    """Both estimates from one pass of K noise draws per example.

    Returns (iwae_nll, bound_nll), nats per example:
      iwae_nll  = -mean_n [logsumexp_k log w_nk - log K],
                  log w = log p(x|z) + log p(z) - log q(z|x)   (Burda et al. 2016)
      bound_nll = mean over n and k of the model's per-example loss L^x + L^z.
    With K = 1 the IWAE estimate is a (noisier) single-sample bound; as K grows it
    tightens towards -log p(x), so iwae_nll <= bound_nll in expectation.
    comm: as in evaluate_bound. progress: a bar on stderr over the K passes of
    all batches, with the running bound (of this rank's examples).
    """
    n = int(x.shape[0])
    if K < 1:
        raise ValueError(f"K (importance samples) must be at least 1, got {K}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if n == 0:
        return float("nan"), float("nan")
    device, dtype = device_of(params), params_dtype(params)
    comm = distributed.SingleProcess() if comm is None else comm
    iwae_total, bound_total = 0.0, 0.0
    n_batches = (n + batch_size - 1) // batch_size
    bar = Progress(f"evaluating {n} images, K={K}", n_batches * K, progress, rate_unit="it/s")
    seen = 0
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            batch = np.asarray(x[start:start + batch_size], dtype=dtype)
            lo, hi = comm.shard(batch.shape[0])
            xb = backend.to_device(batch[lo:hi], device)
            log_w = np.empty((K, hi - lo), dtype=np.float64)
            for k in range(K):
                eps = host_noise(rng, cfg, batch.shape[0], dtype)  # the whole batch: every rank
                bar.update(i * K + k + 1, f"bound {bound_total / max(seen, 1):.2f}")
                if hi == lo:
                    continue
                per_example, stats = model_lib.loss_only(
                    params, cfg, xb, backend.to_device(example_noise(eps, lo, hi), device),
                    return_terms=True)
                log_w[k] = backend.to_numpy(stats["log_weight"]).astype(np.float64)
                bound_total += float(np.sum(backend.to_numpy(per_example), dtype=np.float64))
                seen += hi - lo
            iwae_total += float(np.sum(_logsumexp(log_w, axis=0) - math.log(K)))
    finally:
        bar.close()
    iwae_total, bound_total = comm.sum([iwae_total, bound_total])
    return -float(iwae_total) / n, float(bound_total) / (n * K)


def evaluate_iwae(params: dict, cfg: DrawConfig, x: np.ndarray, K: int, batch_size: int,
                  rng: np.random.Generator, comm=None) -> float:
    """Importance-weighted estimate of -log p(x) (nats per example) with K samples."""
    return evaluate_iwae_and_bound(params, cfg, x, K, batch_size, rng, comm)[0]


def fixed_noise_bound(params: dict, cfg: DrawConfig, x: np.ndarray, seed: int) -> float:
    """The mean bound over ``x`` in float64 with noise from ``default_rng(seed)``.

    params: {name: array}, cast to float64 on the host; x: (E, D) in [0, 1]. The
    figure depends on the parameters, the images and the seed only (float64 makes it
    independent of the BLAS kernel to about 1e-13), so it pins a shipped model to the
    number stated beside it.
    """
    params64 = {k: np.asarray(backend.to_numpy(v), dtype=np.float64) for k, v in params.items()}
    x64 = np.asarray(x, dtype=np.float64)
    eps = np.random.default_rng(seed).standard_normal((cfg.T, x64.shape[0], cfg.z_dim))
    per_example, _ = model_lib.loss_only(params64, cfg, x64, eps)
    return float(np.mean(per_example))
