"""The public API of the DRAW model: parameters, input checks, loss and gradients, samples.

Dimension legend
    B  batch
    T  glimpses (cfg.T)
    D  C*H*W, one image flattened channels-first (cfg.D)
    Z  latent size (cfg.z_dim)

Paper: Gregor, Danihelka, Graves, Rezende, Wierstra, "DRAW: A Recurrent Neural
Network For Image Generation", ICML 2015. Equation numbers below are the paper's.

Parameters: the table is npdraw.reference.init (param_shapes, init_params).

Where the work happens: loss_and_grads and loss_only check their inputs, then run the
fast unrolled engine (npdraw.engine); generate runs the decoder of the plain reference
(npdraw.reference), which the engine is tested against.
"""
from __future__ import annotations

import math

import numpy as np

from . import engine, reference
from .backend import get_array_module, to_numpy
from .config import DrawConfig
from .reference.init import init_params, param_shapes  # noqa: F401 (public API)

# ---------------------------------------------------------------- input checks

def _check_params(params, cfg):
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    shapes = param_shapes(cfg)
    missing = sorted(set(shapes) - set(params))
    extra = sorted(set(params) - set(shapes))
    if missing or extra:
        raise ValueError(f"params do not match the config: missing {missing}, unexpected {extra}")
    dtype = params["c0"].dtype
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"params must be float32 or float64, got {dtype}")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"param {name} has shape {tuple(params[name].shape)}, "
                             f"the config needs {shape}")
        if params[name].dtype != dtype:
            raise ValueError(f"param {name} is {params[name].dtype}, the others are {dtype}")
    return dtype


def _as_model_array(value, name, xp, dtype):
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise ValueError(f"{name} must be an array, got {type(value).__name__}")
    if get_array_module(value) is not xp:
        raise ValueError(f"{name} and the params live on different devices (NumPy vs CuPy)")
    if value.dtype.kind not in "fiub":
        raise ValueError(f"{name} must hold numbers, got dtype {value.dtype}")
    return value.astype(dtype, copy=False)


def _check_eps(eps, cfg, B, xp, dtype, check_values=True):
    eps = _as_model_array(eps, "eps", xp, dtype)
    if eps.shape != (cfg.T, B, cfg.z_dim):
        raise ValueError(f"eps must have shape (T, B, z_dim) = {(cfg.T, B, cfg.z_dim)}, "
                         f"got {tuple(eps.shape)}")
    if check_values and not bool(xp.isfinite(eps).all()):
        raise ValueError("eps contains NaN or inf")
    return eps


def _check_model(params, cfg):
    """-> (dtype, xp) of params, which must fit cfg (a DrawConfig)."""
    if not isinstance(cfg, DrawConfig):
        raise ValueError(f"cfg must be a DrawConfig, got {type(cfg).__name__}")
    return _check_params(params, cfg), get_array_module(params["c0"])


def check_inputs(params, cfg, x, eps):
    """Check a batch against params and cfg -> (x, eps, xp, dtype): x and eps as arrays of
    the params' dtype (copies only where the dtype differs). Raises ValueError naming the
    problem. engine.loss_and_grads and engine.loss_only take inputs checked here."""
    dtype, xp = _check_model(params, cfg)
    x = _as_model_array(x, "x", xp, dtype)
    if x.ndim != 2 or x.shape[1] != cfg.D or x.shape[0] < 1:
        raise ValueError(f"x must have shape (B, D) with D = C*H*W = {cfg.D}, got {tuple(x.shape)}")
    eps = _check_eps(eps, cfg, x.shape[0], xp, dtype, check_values=False)
    # one transfer to the host for all value checks (one sync on a GPU, not three)
    summary = xp.stack([x.min(), x.max(), xp.isfinite(eps).all().astype(dtype)])
    low, high, eps_finite = (float(v) for v in to_numpy(summary))  # NaN reaches low, high
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("x contains NaN or inf")
    if low < 0.0 or high > 1.0:
        raise ValueError(f"x must hold values in [0, 1], got values in [{low:g}, {high:g}]")
    if not eps_finite:
        raise ValueError("eps contains NaN or inf")
    return x, eps, xp, dtype


# ---------------------------------------------------------------- public API

def loss_and_grads(params, cfg, x, eps):
    """Loss and gradients of a batch.

    params: dict from init_params (NumPy or CuPy arrays, float32 or float64)
    x: (B, D) in [0, 1]   eps: (T, B, Z) standard normal noise for eq 6
    -> (loss: float, grads: dict like params, stats: dict) where stats holds
       "loss", "recon" (float, batch mean of L^x), "kl" ((T,) NumPy, batch mean
       KL of each glimpse), "kl_total" (float) and "activation_bytes".
    """
    x, eps, _, _ = check_inputs(params, cfg, x, eps)
    return engine.loss_and_grads(params, cfg, x, eps)


def loss_only(params, cfg, x, eps, return_terms=False):
    """Forward only, for evaluation.

    -> (loss_per_example (B,) array on the params' device, stats) where stats
       holds "recon" and "kl" as in loss_and_grads and, with return_terms,
       "recon_per_example" (B,) and "log_weight" (B,), log p(x|z) + log p(z) - log q(z|x)
       for importance-weighted estimates.
    """
    x, eps, _, _ = check_inputs(params, cfg, x, eps)
    return engine.loss_only(params, cfg, x, eps, return_terms)


def generate(params, cfg, eps):
    """Sample images with the decoder alone (eq 13-16).

    eps: (T, B, Z) draws from the prior N(0, I), used as z_t directly
    -> (canvases (T, B, D) = sigmoid(c_t) for t = 1..T, windows). windows is None
       without attention, else a dict of (T, B) arrays "cx", "cy" (centre, 1-based
       pixel coordinates), "stride", "sigma", "gamma", and "N" (the write size).
    """
    dtype, xp = _check_model(params, cfg)
    if not hasattr(eps, "shape") or len(eps.shape) != 3:
        raise ValueError(f"eps must have shape (T, B, z_dim), got {getattr(eps, 'shape', eps)!r}")
    eps = _check_eps(eps, cfg, eps.shape[1], xp, dtype)
    return reference.generate(params, cfg, eps)


def reconstruct(params, cfg, x, eps):
    """Rebuild images glimpse by glimpse with the inference network (eq 3-8), for pictures.

    x: (B, D) in [0, 1]   eps: (T, B, Z) noise for eq 6
    -> (canvases (T, B, D) = sigmoid(c_t), windows, kl (T, B)) from the plain reference
       (npdraw.reference.reconstruct): windows is None without attention, else
       {"read": ..., "write": ...} of (T, B) arrays as in generate; the final canvas is
       the one whose L^x loss_only scores with the same eps.
    """
    x, eps, _, _ = check_inputs(params, cfg, x, eps)
    return reference.reconstruct(params, cfg, x, eps)


# ---------------------------------------------------------------- peepholes added

PEEPHOLE_PARAMS = ("enc_peep", "dec_peep")


def with_zero_peepholes(cfg: DrawConfig, arrays: dict) -> dict:
    """{name: (P,)} of a model without peepholes -> those of cfg's (with them), in
    param_shapes' order, the peepholes zero (on the arrays' device and dtype)."""
    like = arrays["c0"]
    xp = get_array_module(like)
    shapes = param_shapes(cfg)
    out = {name: arrays[name] if name in arrays else xp.zeros(shape, like.dtype)
           for name, shape in shapes.items() if name in arrays or name in PEEPHOLE_PARAMS}
    # names cfg lacks stay, for check_compatible to report
    return {**out, **{name: a for name, a in arrays.items() if name not in shapes}}
