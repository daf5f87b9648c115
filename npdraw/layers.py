"""Paired forward/backward building blocks: linear, LSTM cell, Gaussian latent, BCE.

Dimension legend
    B  batch                      I  input width of a linear map
    O  output width               Hd LSTM hidden size (one of enc_dim / dec_dim)
    Z  latent size (z_dim)        D  flattened image size C*H*W

Every `*_forward` returns `(out, cache)` and its `*_backward` takes `(dout, cache)`.
Functions never write into their inputs; they take the array module from the
arguments, so NumPy and CuPy arrays both work and dtypes are kept.
"""
from __future__ import annotations

from .backend import get_array_module

# ---------------------------------------------------------------- linear

def linear_forward(x, W, b):
    """y = x W + b.

    x: (..., I)   W: (I, O)   b: (O,)   ->   y: (..., O)
    """
    return x @ W + b, (x, W)


def linear_backward(dy, cache):
    """dy: (..., O) -> dx (..., I), dW (I, O), db (O,).

    Leading axes are flattened for dW, so one call with stacked (T, B, .) inputs
    gives the gradient summed over all glimpses in a single GEMM.
    """
    x, W = cache
    dx = dy @ W.T
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    return dx, x2.T @ dy2, dy2.sum(axis=0)


# ---------------------------------------------------------------- LSTM cell
# Gate pre-activations a = [x, h_prev] W + b hold four column blocks in the
# order [i, f, o, g]: input, forget and output gates (sigmoid), then the
# candidate g (tanh). No peepholes. The sigmoid blocks are contiguous so one
# call squashes all three.

def sigmoid(x):
    """Logistic function, computed as 0.5*(1+tanh(x/2)), which never overflows."""
    xp = get_array_module(x)
    return 0.5 * (xp.tanh(0.5 * x) + 1.0)


def lstm_cell_forward(a, c_prev):
    """The elementwise half of an LSTM step.

    a: (B, 4Hd) gate pre-activations   c_prev: (B, Hd)
    -> (h (B, Hd), c (B, Hd)), cache
    """
    xp = get_array_module(a)
    Hd = c_prev.shape[-1]
    gates = xp.empty_like(a)
    gates[:, :3 * Hd] = sigmoid(a[:, :3 * Hd])
    gates[:, 3 * Hd:] = xp.tanh(a[:, 3 * Hd:])
    i, f, o, g = (gates[:, k * Hd:(k + 1) * Hd] for k in range(4))
    c = f * c_prev + i * g
    tanh_c = xp.tanh(c)
    h = o * tanh_c
    return (h, c), (gates, c_prev, tanh_c)


def lstm_cell_backward(dh, dc, cache):
    """dh, dc: (B, Hd) gradients w.r.t. h and c -> (da (B, 4Hd), dc_prev (B, Hd))."""
    xp = get_array_module(dh)
    gates, c_prev, tanh_c = cache
    Hd = c_prev.shape[-1]
    i, f, o, g = (gates[:, k * Hd:(k + 1) * Hd] for k in range(4))
    dc_total = dc + dh * o * (1.0 - tanh_c * tanh_c)
    da = xp.empty_like(gates)
    da[:, 0 * Hd:1 * Hd] = dc_total * g * i * (1.0 - i)
    da[:, 1 * Hd:2 * Hd] = dc_total * c_prev * f * (1.0 - f)
    da[:, 2 * Hd:3 * Hd] = dh * tanh_c * o * (1.0 - o)
    da[:, 3 * Hd:4 * Hd] = dc_total * i * (1.0 - g * g)
    return da, dc_total * f


# ---------------------------------------------------------------- Gaussian latent

def latent_forward(q, eps):
    """Reparameterised sample and exact KL to N(0, I) (paper eq 1-3, 10).

    q: (B, 2Z) = [mu | log sigma]   eps: (B, Z) standard normal noise
    -> (z (B, Z), kl (B,)), cache
    kl = sum_j 0.5 * (mu^2 + sigma^2 - log sigma^2 - 1)
    """
    Z = eps.shape[-1]
    mu, log_sigma = q[:, :Z], q[:, Z:]
    xp = get_array_module(q)
    sigma = xp.exp(log_sigma)
    z = mu + sigma * eps
    kl = 0.5 * (mu * mu + sigma * sigma - 2.0 * log_sigma - 1.0).sum(axis=-1)
    return (z, kl), (mu, sigma, eps)


def latent_backward(dz, dkl, cache):
    """dz: (B, Z), dkl: (B,) or scalar -> dq (B, 2Z)."""
    xp = get_array_module(dz)
    mu, sigma, eps = cache
    dkl = xp.asarray(dkl, dtype=dz.dtype).reshape(-1, 1)
    dq = xp.empty((dz.shape[0], 2 * dz.shape[1]), dtype=dz.dtype)
    dq[:, :dz.shape[1]] = dz + dkl * mu
    dq[:, dz.shape[1]:] = dz * sigma * eps + dkl * (sigma * sigma - 1.0)
    return dq


# ---------------------------------------------------------------- Bernoulli likelihood

def bce_forward(logits, x):
    """-log Bernoulli(x | sigmoid(logits)) summed over pixels (paper eq 9).

    logits: (B, D) canvas c_T   x: (B, D) targets in [0, 1]
    -> loss (B,), cache.  softplus(l) - x*l, with softplus written stably.
    """
    xp = get_array_module(logits)
    softplus = xp.maximum(logits, 0) + xp.log1p(xp.exp(-xp.abs(logits)))
    return (softplus - x * logits).sum(axis=-1), (logits, x)


def bce_backward(dloss, cache):
    """dloss: (B,) or scalar -> dlogits (B, D) = dloss * (sigmoid(l) - x)."""
    xp = get_array_module(*cache)
    logits, x = cache
    dloss = xp.asarray(dloss, dtype=logits.dtype).reshape(-1, 1)
    return dloss * (sigmoid(logits) - x)
