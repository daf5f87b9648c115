"""Adam (Kingma & Ba 2015) with global-norm gradient clipping over name-keyed dicts,
and an exponential moving average of the parameters (Polyak averaging).

Parameters, gradients and the moment estimates are dicts ``name -> array`` that
share one set of keys; each entry may have any shape and lives on NumPy or CuPy.

Shapes: ``(...)`` is any shape of one parameter (each name has its own).

State layout (``adam_init``):
    {"m": {name: (...)}, "v": {name: (...)}, "step": int}
adam_step is pure (returns new params and a new state); ema_update updates its own
arrays in place. EMA layout (``ema_init``): {name: (...)}, the parameters' names, shapes
and dtypes.

Only the two norms are synchronised with the host (python floats), once per step.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module
from .config import TrainConfig


def _check_keys(params: dict, grads: dict, what: str = "grads") -> None:
    if set(params) != set(grads):
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        raise ValueError(f"params and {what} have different keys: missing from {what} {missing}, "
                         f"not in params {extra}")


_CHUNK = 1 << 16   # values per float64 partial sum: the converted chunk stays in cache


def _sq_sum(a):
    """Sum of squares of one array in float64: a python float on NumPy, a 0-d device
    array on a GPU (so that callers can add many and wait for the device once).

    Accumulated in float64 so float32 gradients of many entries do not lose bits. On
    NumPy the array is converted chunk by chunk, each chunk's squares summed by one
    einsum, which spares a full float64 copy and its squared copy.
    """
    xp = get_array_module(a)
    flat = a.reshape(-1)
    if xp is not np:
        return xp.sum(xp.square(flat.astype(xp.float64, copy=False)))
    total = 0.0
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK].astype(np.float64)
        # einsum, not dot: a BLAS call would wake BLAS threads that then spin
        # on cores that the other ranks of the machine want
        total += float(np.einsum("i,i->", chunk, chunk))
    return total


def _sq_norm(arrays) -> float:
    """Sum of squares over an iterable of arrays, as a python float (one device sync)."""
    return float(sum((_sq_sum(a) for a in arrays), 0.0))


def global_norm(grads: dict) -> float:
    """L2 norm of all arrays of ``grads`` taken together, sqrt(sum_k ||g_k||^2).

    grads: {name: (...)} -> python float.
    """
    return math.sqrt(_sq_norm(grads.values()))


def clip_scale(norm: float, max_norm: float) -> float:
    """The clipping factor min(1, max_norm / (norm + 1e-6)) for a gradient of global norm `norm`."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    return min(1.0, max_norm / (norm + 1e-6))


def clip_by_global_norm(grads: dict, max_norm: float):
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)).

    grads: {name: (...)}; returns (clipped {name: (...)} of new arrays, norm before clipping).
    The input arrays are never modified; dtypes are kept. The training loop instead
    passes clip_scale(...) to adam_step as grad_scale, which saves this pass.
    """
    norm = global_norm(grads)
    scale = clip_scale(norm, max_norm)
    clipped = {}
    for name, g in grads.items():
        xp = get_array_module(g)
        # Multiply by a scalar of g's own dtype so float32 stays float32.
        clipped[name] = g * xp.asarray(scale, dtype=g.dtype)
    return clipped, norm


def adam_init(params: dict) -> dict:
    """Zero first and second moments shaped like ``params``; step counter 0."""
    m, v = {}, {}
    for name, p in params.items():
        xp = get_array_module(p)
        m[name] = xp.zeros_like(p)
        v[name] = xp.zeros_like(p)
    return {"m": m, "v": v, "step": 0}


def adam_step(params: dict, grads: dict, state: dict, lr: float,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
              grad_scale: float = 1.0):
    """One bias-corrected Adam update, as a pure function: nothing passed in is modified.

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    params, grads: {name: (...)}; state from ``adam_init`` or a previous adam_step.
    Returns (new_params {name: (...)}, new_state, step_norm): new arrays throughout
    (new_state's "m" and "v" too, "step" one more), and step_norm, the global L2 norm of
    the update p_new - p. Use the return value, ``params, state, _ = adam_step(...)``:
    a loop that ignores it trains nothing, every time (the inputs stay as they were).
    grad_scale multiplies every gradient first (clipping, see clip_scale) without a
    pass of its own.
    """
    _check_keys(params, grads)
    for key in ("m", "v", "step"):
        if key not in state:
            raise ValueError(f"optimizer state lacks {key!r}; build it with adam_init")
    _check_keys(params, state["m"], "optimizer state m")
    _check_keys(params, state["v"], "optimizer state v")
    for name, p in params.items():
        if grads[name].shape != p.shape:
            raise ValueError(f"gradient {name!r} has shape {grads[name].shape}, "
                             f"parameter has {p.shape}")

    t = int(state["step"]) + 1
    # Both bias corrections folded into the step size and epsilon (python floats, no
    # device sync): lr m/bc1 / (sqrt(v/bc2) + eps) = lr_t m / (sqrt(v) + eps_t).
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    lr_t = lr * math.sqrt(bc2) / bc1
    eps_t = eps * math.sqrt(bc2)
    new_params, new_m, new_v, update_sq_sums = {}, {}, {}, []
    for name, p in params.items():
        xp = get_array_module(p)
        dt = p.dtype.type
        g = grads[name].astype(p.dtype, copy=False)
        # Each new array is written once and then updated in place, through one scratch
        # array per parameter: a handful of passes in all.
        scratch = xp.empty_like(p)                         # (0-d parameters stay arrays)
        xp.multiply(g, dt((1.0 - beta1) * grad_scale), out=scratch)
        m = xp.multiply(state["m"][name], dt(beta1), out=xp.empty_like(p))
        m += scratch                                       # m <- b1 m + (1 - b1) g
        xp.multiply(g, g, out=scratch)
        scratch *= dt((1.0 - beta2) * grad_scale * grad_scale)
        v = xp.multiply(state["v"][name], dt(beta2), out=xp.empty_like(p))
        v += scratch                                       # v <- b2 v + (1 - b2) g^2
        xp.sqrt(v, out=scratch)
        scratch += dt(eps_t)
        xp.divide(m, scratch, out=scratch)
        scratch *= dt(-lr_t)                               # the update
        new_params[name] = xp.add(p, scratch, out=xp.empty_like(p))
        new_m[name], new_v[name] = m, v
        update_sq_sums.append(_sq_sum(scratch))
    new_state = {**state, "m": new_m, "v": new_v, "step": t}
    return new_params, new_state, math.sqrt(float(sum(update_sq_sums, 0.0)))


def ema_init(params: dict) -> dict:
    """The moving average's own arrays, started at a copy of ``params`` {name: (...)}."""
    return {name: get_array_module(p).array(p, copy=True) for name, p in params.items()}


def ema_update(ema: dict, params: dict, decay: float) -> dict:
    """One step of the exponential moving average of the parameters (Polyak averaging):

    ema <- decay ema + (1 - decay) params,  computed as decay (ema - params) + params

    which keeps an average of unchanging parameters exactly where it is, and needs no
    scratch array: three in-place passes over ema. ema, params: {name: (...)} with the
    same keys; ema's arrays (from ``ema_init``) are updated in place, in their dtype, and
    returned; params are only read, and must not be ema's own arrays (ema_init copies).
    0 <= decay < 1; no device sync.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
    _check_keys(params, ema, "the EMA")
    for name, p in params.items():
        average = ema[name]
        if average.shape != p.shape:
            raise ValueError(f"EMA {name!r} has shape {average.shape}, parameter has {p.shape}")
        average -= p
        average *= average.dtype.type(decay)
        average += p
    return ema


def scheduled_lr(schedule: str, lr: float, epochs_done: float, *, lr_min: float = 0.0,
                 hold: float = 0.0, gamma: float = 1.0, decay_epochs: float = 0.0) -> float:
    """The learning rate after ``epochs_done`` epochs of training (a fraction within one).

    A pure function of the position in training, so a resumed run continues the same
    schedule. ``lr`` holds for the first ``hold`` epochs; after that, with s = epochs_done
    - hold:
      constant      lr
      exponential   max(lr_min, lr * gamma**s)
      cosine        lr_min + (lr - lr_min) * (1 + cos(pi * min(s / decay_epochs, 1))) / 2
    """
    s = epochs_done - hold
    if schedule == "constant" or s <= 0:
        return float(lr)
    if schedule == "exponential":
        return float(max(lr_min, lr * gamma ** s))
    if schedule == "cosine":
        if decay_epochs <= 0:
            raise ValueError("the cosine schedule needs decay_epochs > 0")
        frac = min(s / decay_epochs, 1.0)
        return float(lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def learning_rate(tcfg: TrainConfig, epochs_done: float) -> float:
    """The schedule's learning rate after ``epochs_done`` epochs (scheduled_lr)."""
    decay_epochs = tcfg.lr_decay_epochs or max(tcfg.epochs - tcfg.lr_hold, 1e-9)
    return scheduled_lr(tcfg.lr_schedule, tcfg.lr, epochs_done, lr_min=tcfg.lr_min,
                        hold=tcfg.lr_hold, gamma=tcfg.lr_gamma, decay_epochs=decay_epochs)
