"""The attentive classifier of cluttered MNIST, written plainly (paper section 4.1, table 1).

Dimension legend
    B  batch
    T  glimpses (cfg.glimpses)
    H, W  image height, image width (cfg.height, cfg.width)
    Nr  read window size (cfg.read_n)
    Hs  the LSTM's hidden size (cfg.hidden)
    K  classes (cfg.classes)

The model ("differentiable RAM" in the paper's table 1): one LSTM; at each glimpse t it
reads one Nr x Nr attention glimpse of the image x (eq 27, no error image, no canvas),
its window computed from the previous hidden state (eq 21-26),

    p_t = h_{t-1} att_W + att_b,   r_t = read(x, window(p_t)),
    h_t, c_t = LSTM([r_t, h_{t-1}] lstm_W + lstm_b, c_{t-1}),

and a softmax layer on the last state, logits = h_T out_W + out_b, trained with
cross-entropy. h_0 = c_0 = 0, so the first window is set by att_b alone.

Parameters (name: shape)
    att_W  (Hs, 5)           att_b  (5,)      the 5 window parameters: g~X, g~Y, log sigma^2,
                                              log delta~, log gamma
    lstm_W (Nr*Nr + Hs, 4Hs) lstm_b (4Hs,)    input rows [r_t, h_{t-1}], gate blocks [i, f, o, g]
    out_W  (Hs, K)           out_b  (K,)

This module concatenates and loops plainly; npdraw.classifier is the fast path that the
tests compare with it.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from ..config import ClassifierConfig
from ..layers import (linear_backward, linear_forward, lstm_cell_backward, lstm_cell_forward,
                      softmax_xent_backward, softmax_xent_forward)
from . import attention as plain     # DRAW's plain attention: window (eq 21-26) and read (eq 27)
from .init import tiling_window_bias  # the same start window as DRAW's read

P_ATTENTION = 5                      # (g~X, g~Y, log sigma^2, log delta~, log gamma)


def param_shapes(cfg: ClassifierConfig) -> dict:
    """name -> shape of every parameter."""
    Hs, N = cfg.hidden, cfg.read_n
    return {"att_W": (Hs, P_ATTENTION), "att_b": (P_ATTENTION,),
            "lstm_W": (N * N + Hs, 4 * Hs), "lstm_b": (4 * Hs,),
            "out_W": (Hs, cfg.classes), "out_b": (cfg.classes,)}


def init_params(cfg: ClassifierConfig, seed: int = 0, dtype="float32") -> dict:
    """Fresh parameters (NumPy). The LSTM as in DRAW (U(+-1/sqrt(Hs)), forget bias 1);
    att_W small, so the first glimpses are near the start window, which tiles the
    whole image (as DRAW's read starts, see reference.init); out_W small."""
    rng = np.random.default_rng(seed)
    Hs = cfg.hidden
    params = {
        "att_W": 0.01 * rng.standard_normal((Hs, P_ATTENTION)),
        "att_b": tiling_window_bias(cfg, cfg.read_n),
        "lstm_W": rng.uniform(-1.0, 1.0, (cfg.read_n ** 2 + Hs, 4 * Hs)) / math.sqrt(Hs),
        "lstm_b": np.concatenate([np.zeros(Hs), np.ones(Hs), np.zeros(2 * Hs)]),
        "out_W": 0.01 * rng.standard_normal((Hs, cfg.classes)),
        "out_b": np.zeros(cfg.classes),
    }
    return {name: value.astype(dtype) for name, value in params.items()}


def forward(params, cfg: ClassifierConfig, x, labels):
    """x: (B, H*W) images in [0, 1]   labels: (B,) ints
    -> (loss (B,), probabilities (B, K)), cache."""
    xp = get_array_module(x)
    B, H, W, N, Hs = x.shape[0], cfg.height, cfg.width, cfg.read_n, cfg.hidden
    images = x.reshape(B, 1, H, W)
    h = xp.zeros((B, Hs), x.dtype)
    c = xp.zeros((B, Hs), x.dtype)
    steps = []
    for _ in range(cfg.glimpses):
        p, att_cache = linear_forward(h, params["att_W"], params["att_b"])       # eq 21
        (Fy, Fx, gamma), window_cache = plain.window_forward(p, H, W, N)        # eq 22-26
        glimpse, read_cache = plain.read_forward(images, Fy, Fx, gamma)         # eq 27
        inputs = xp.concatenate([glimpse.reshape(B, N * N), h], axis=1)
        a, lstm_in_cache = linear_forward(inputs, params["lstm_W"], params["lstm_b"])
        (h, c), cell_cache = lstm_cell_forward(a, c)
        steps.append((att_cache, window_cache, read_cache, lstm_in_cache, cell_cache))
    logits, out_cache = linear_forward(h, params["out_W"], params["out_b"])
    (loss, probs), xent_cache = softmax_xent_forward(logits, labels)
    return (loss, probs), (steps, out_cache, xent_cache)


def backward(params, cfg: ClassifierConfig, cache):
    """BPTT for the batch mean of the loss -> grads, a dict like params."""
    steps, out_cache, xent_cache = cache
    xp = get_array_module(params["lstm_W"])
    B, N = xent_cache[0].shape[0], cfg.read_n
    grads = {name: xp.zeros_like(value) for name, value in params.items()}
    dlogits = softmax_xent_backward(1.0 / B, xent_cache)
    dh, grads["out_W"], grads["out_b"] = linear_backward(dlogits, out_cache)
    dc = xp.zeros_like(dh)
    for att_cache, window_cache, read_cache, lstm_in_cache, cell_cache in reversed(steps):
        da, dc = lstm_cell_backward(dh, dc, cell_cache)
        dinputs, dW, db = linear_backward(da, lstm_in_cache)
        grads["lstm_W"] += dW
        grads["lstm_b"] += db
        dglimpse, dh = dinputs[:, :N * N], dinputs[:, N * N:]
        _, dFy, dFx, dgamma = plain.read_backward(dglimpse.reshape(B, 1, N, N), read_cache)
        dp = plain.window_backward(dFy, dFx, dgamma, window_cache)
        dh_att, dW, db = linear_backward(dp, att_cache)
        grads["att_W"] += dW
        grads["att_b"] += db
        dh = dh + dh_att
    return grads


def predict(params, cfg: ClassifierConfig, x):
    """x: (B, H*W) -> class probabilities (B, K) (the loss's labels are irrelevant here)."""
    xp = get_array_module(x)
    (_, probs), _ = forward(params, cfg, x, xp.zeros(x.shape[0], dtype=np.intp))
    return probs
