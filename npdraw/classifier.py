"""The attentive classifier of cluttered MNIST (paper section 4.1, table 1): the fast path.

Dimension legend
    B  batch
    T  glimpses (cfg.glimpses)
    H, W  image height and width
    N  read window size (cfg.read_n)
    Hs  the LSTM's hidden size (cfg.hidden)
    K  classes (cfg.classes)
    I  = N*N + Hs, the input width of the LSTM's linear map

The model and its parameters are described in npdraw/reference/classifier.py, which
computes the same plainly (the tests compare the two). Here, as in the DRAW model, the
LSTM's inputs live in one stacked buffer allocated once per call,

    inputs (T + 1, B, I), slot t = [r_t, h_{t-1}]      (slot T holds h_T only),

the LSTM writes h_t straight into slot t + 1, and the gate activations of all glimpses
sit in one (T, B, 4Hs) buffer. The backward stacks the gates' and windows' gradients
likewise, so each weight gradient is one GEMM over all T*B rows after the reverse loop
instead of T small ones inside it.
"""
from __future__ import annotations

import math

import numpy as np

from . import engine_attention as att
from .backend import get_array_module, to_device, to_numpy
from .config import ClassifierConfig
from .engine_layers import linear_forward, lstm_cell_backward, lstm_cell_forward
from .layers import softmax_xent_backward, softmax_xent_forward
from .reference.classifier import init_params, param_shapes  # noqa: F401 (public API)


# ---------------------------------------------------------------- input checks

def check_params(params, cfg: ClassifierConfig):
    """-> the params' dtype; ValueError naming the first parameter that does not fit cfg."""
    if not isinstance(cfg, ClassifierConfig):
        raise ValueError(f"cfg must be a ClassifierConfig, got {type(cfg).__name__}")
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    shapes = param_shapes(cfg)
    if set(shapes) != set(params):
        raise ValueError(f"params do not match the classifier: missing "
                         f"{sorted(set(shapes) - set(params))}, unexpected "
                         f"{sorted(set(params) - set(shapes))}")
    dtype = params["lstm_W"].dtype
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"params must be float32 or float64, got {dtype}")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape or params[name].dtype != dtype:
            raise ValueError(f"param {name} is {params[name].dtype} {tuple(params[name].shape)}, "
                             f"the config needs {dtype} {shape}")
    return dtype


def check_inputs(params, cfg: ClassifierConfig, x, labels=None):
    """-> x as the params' dtype and labels as intp; ValueError on bad shapes or values."""
    dtype = check_params(params, cfg)
    xp = get_array_module(params["lstm_W"])
    if not hasattr(x, "shape") or x.ndim != 2 or x.shape[1] != cfg.height * cfg.width \
            or x.shape[0] < 1:
        raise ValueError(f"x must have shape (B, H*W) = (B, {cfg.height * cfg.width}), "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    x = xp.asarray(x, dtype=dtype)
    low, high = (float(v) for v in to_numpy(xp.stack([x.min(), x.max()])))
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0.0 or high > 1.0:
        raise ValueError(f"x must hold values in [0, 1], got values in [{low:g}, {high:g}]")
    if labels is None:
        return x, None
    labels = xp.asarray(labels)
    if labels.shape != (x.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be {x.shape[0]} integers, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= cfg.classes:
        raise ValueError(f"labels must lie in 0..{cfg.classes - 1}, got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return x, labels.astype(np.intp)


# ---------------------------------------------------------------- forward and BPTT

def forward(params, cfg: ClassifierConfig, x, labels, need_cache=True):
    """x: (B, H*W) in [0, 1]   labels: (B,) ints in 0..K-1 (inputs already checked)
    -> (loss (B,), probabilities (B, K)), cache (None without need_cache)."""
    xp = get_array_module(x)
    dtype = x.dtype
    B, H, W, N, Hs, T = x.shape[0], cfg.height, cfg.width, cfg.read_n, cfg.hidden, cfg.glimpses
    R = N * N
    images = x.reshape(B, 1, H, W)
    inputs = xp.zeros((T + 1, B, R + Hs), dtype)                # slot t: [r_t, h_{t-1}]; h_0 = 0
    gates = xp.empty((T, B, 4 * Hs), dtype)
    c = xp.zeros((B, Hs), dtype)
    steps = []
    for t in range(T):
        h_prev = inputs[t, :, R:]
        p = h_prev @ params["att_W"] + params["att_b"]                          # eq 21
        [(Fy, Fx, gamma)], window_cache = att.windows_forward(p, H, W, (N,))    # eq 22-26
        glimpse, read_cache = att.read_forward(images, Fy, Fx, gamma)           # eq 27
        inputs[t, :, :R] = glimpse.reshape(B, R)
        linear_forward(inputs[t], params["lstm_W"], params["lstm_b"], out=gates[t])
        (_, c), cell_cache = lstm_cell_forward(gates[t], c, gates_out=gates[t],
                                               h_out=inputs[t + 1, :, R:])
        if need_cache:
            steps.append((window_cache, read_cache, cell_cache))
    h_last = inputs[T, :, R:]
    logits = h_last @ params["out_W"] + params["out_b"]
    (loss, probs), xent_cache = softmax_xent_forward(logits, labels)
    if not need_cache:
        return (loss, probs), None
    return (loss, probs), (steps, inputs, gates, xent_cache)


def backward(params, cfg: ClassifierConfig, cache):
    """BPTT for the batch mean of the loss -> grads, a dict like params."""
    steps, inputs, gates, xent_cache = cache
    xp = get_array_module(inputs)
    T, B, Hs, N = cfg.glimpses, inputs.shape[1], cfg.hidden, cfg.read_n
    R = N * N
    dgates = xp.empty_like(gates)
    dp = xp.empty((T, B, att.P_ATTENTION), inputs.dtype)
    dlogits = softmax_xent_backward(1.0 / B, xent_cache)
    h_last = inputs[T, :, R:]
    grads = {"out_W": h_last.T @ dlogits, "out_b": dlogits.sum(axis=0)}
    dh = dlogits @ params["out_W"].T
    dc = xp.zeros_like(dh)
    lstm_W_T, att_W_T = params["lstm_W"].T, params["att_W"].T
    for t in reversed(range(T)):
        window_cache, read_cache, cell_cache = steps[t]
        _, dc = lstm_cell_backward(dh, dc, cell_cache, out=dgates[t])
        dinputs = dgates[t] @ lstm_W_T                                           # [dr_t, dh_{t-1}]
        _, dFy, dFx, dgamma = att.read_backward(dinputs[:, :R].reshape(B, 1, N, N), read_cache,
                                                need_images=False)
        dp[t] = att.windows_backward([(dFy, dFx, dgamma)], window_cache)
        dh = dinputs[:, R:] + dp[t] @ att_W_T
    gates_2d = dgates.reshape(T * B, 4 * Hs)
    dp_2d = dp.reshape(T * B, att.P_ATTENTION)
    grads["lstm_W"] = inputs[:T].reshape(T * B, R + Hs).T @ gates_2d
    grads["lstm_b"] = gates_2d.sum(axis=0)
    grads["att_W"] = inputs[:T, :, R:].reshape(T * B, Hs).T @ dp_2d
    grads["att_b"] = dp_2d.sum(axis=0)
    return {name: xp.ascontiguousarray(grads[name]) for name in params}


# ---------------------------------------------------------------- public API

def loss_and_grads(params, cfg: ClassifierConfig, x, labels):
    """params: from init_params   x: (B, H*W) in [0, 1]   labels: (B,) ints
    -> (loss: float, grads: dict like params, stats) with stats "loss" (batch mean
    cross-entropy) and "errors" (int, misclassified examples in the batch)."""
    x, labels = check_inputs(params, cfg, x, labels)
    (loss, probs), cache = forward(params, cfg, x, labels)
    grads = backward(params, cfg, cache)
    xp = get_array_module(x)
    mean_loss, errors = (float(v) for v in to_numpy(xp.stack(
        [loss.mean(), (probs.argmax(axis=1) != labels).sum().astype(loss.dtype)])))
    return mean_loss, grads, {"loss": mean_loss, "errors": int(errors)}


def predict(params, cfg: ClassifierConfig, x):
    """x: (B, H*W) in [0, 1] -> class probabilities (B, K), with no cache kept."""
    x, _ = check_inputs(params, cfg, x)
    xp = get_array_module(x)
    (_, probs), _ = forward(params, cfg, x, xp.zeros(x.shape[0], np.intp), need_cache=False)
    return probs


def evaluate(params, cfg: ClassifierConfig, x, labels, batch_size: int = 500):
    """Mean cross-entropy and error rate over a whole split, in batches.

    x: (M, H*W) NumPy   labels: (M,) -> (loss: float, error: float in [0, 1])."""
    device = "gpu" if get_array_module(params["lstm_W"]) is not np else "cpu"
    total_loss, errors = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        xb = to_device(np.ascontiguousarray(x[start:start + batch_size]), device)
        yb = to_device(np.asarray(labels[start:start + batch_size]), device)
        xb, yb = check_inputs(params, cfg, xb, yb)
        (loss, probs), _ = forward(params, cfg, xb, yb, need_cache=False)
        total_loss += float(loss.sum())
        errors += int((probs.argmax(axis=1) != yb).sum())
    count = max(int(x.shape[0]), 1)
    return total_loss / count, errors / count


def glimpse_windows(params, cfg: ClassifierConfig, x):
    """The read windows the classifier chooses for x: (B, H*W) -> dict of (T, B) NumPy
    arrays "cx", "cy" (centres, 1-based pixels), "stride", "sigma", "gamma", and "N".
    Read from the forward's caches (eq 22-24's values), not recomputed."""
    x, _ = check_inputs(params, cfg, x)
    xp = get_array_module(x)
    _, (steps, *_) = forward(params, cfg, x, xp.zeros(x.shape[0], np.intp))
    # a windows_forward cache starts with eq 22-24's values, (B, 5): gX, gY, sigma2, delta, gamma
    gx, gy, sigma2, delta, gamma = np.stack(
        [to_numpy(window_cache[0][0]) for window_cache, _, _ in steps]).transpose(2, 0, 1)
    return {"cx": gx, "cy": gy, "stride": delta, "sigma": np.sqrt(sigma2), "gamma": gamma,
            "N": cfg.read_n}
