"""Paired forward/backward building blocks, plainly: linear, LSTM cell (and with
peepholes), Gaussian latent, BCE, softmax cross-entropy. The reference runs these.

Dimension legend
    B  batch
    I, O  input and output widths of a linear map
    Hs  the hidden size of one LSTM (He, Hd, or the classifier's)
    Z  latent size
    D  = C*H*W, one image flattened
    K  classes (the classifier's softmax)

Every `*_forward` returns `(out, cache)` and its `*_backward` takes `(dout, cache)`;
arrays are (B, features). Functions never write into their inputs; they take the array
module from the arguments, so NumPy and CuPy arrays both work and dtypes are kept.

The elementwise equations are written once, as the `_*_kernel` functions below, which
backend.fuse runs as plain NumPy code on NumPy arrays and compiles into one CuPy kernel
on a GPU. npdraw.engine_layers runs the same kernels in place and features first, for
the engine; tests/test_layers.py checks both kinds agree.
"""
from __future__ import annotations

import numpy as np

from .backend import fuse, get_array_module

# ---------------------------------------------------------------- linear

def linear_forward(x, W, b):
    """y = x W + b.

    x: (..., I)   W: (I, O)   b: (O,)   ->   y: (..., O), cache
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
# candidate g (tanh). The elementwise work of a step is one function of whole
# arrays, which backend.fuse turns into a single GPU kernel. The peephole variant
# (peephole_lstm_cell_*, below) adds the cell to the gates' pre-activations.

def _sigmoid(x):
    # 0.5*(1+tanh(x/2)) equals 1/(1+exp(-x)) but never overflows
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


sigmoid = fuse(_sigmoid)


@fuse
def _lstm_cell_kernel(a_i, a_f, a_o, a_g, c_prev):
    i, f, o, g = _sigmoid(a_i), _sigmoid(a_f), _sigmoid(a_o), np.tanh(a_g)
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    return i, f, o, g, c, tanh_c, o * tanh_c


@fuse
def _lstm_cell_backward_kernel(dh, dc, i, f, o, g, c_prev, tanh_c):
    dc_total = dc + dh * o * (1.0 - tanh_c * tanh_c)
    return (dc_total * g * i * (1.0 - i), dc_total * c_prev * f * (1.0 - f),
            dh * tanh_c * o * (1.0 - o), dc_total * i * (1.0 - g * g), dc_total * f)


def _gate_blocks(a, Hs):
    """a (B, 4Hs) -> its column blocks [a_i, a_f, a_o, a_g], each (B, Hs)."""
    return [a[:, k * Hs:(k + 1) * Hs] for k in range(4)]


def lstm_cell_forward(a, c_prev):
    """The elementwise half of an LSTM step:
    i, f, o = sigmoid(a_i, a_f, a_o),  g = tanh(a_g),  c = f c_prev + i g,  h = o tanh(c).

    a: (B, 4Hs) gate pre-activations [i, f, o, g]   c_prev: (B, Hs)
    -> (h (B, Hs), c (B, Hs)), cache
    """
    i, f, o, g, c, tanh_c, h = _lstm_cell_kernel(*_gate_blocks(a, c_prev.shape[1]), c_prev)
    return (h, c), ((i, f, o, g), c_prev, tanh_c)


def lstm_cell_backward(dh, dc, cache):
    """dh, dc: (B, Hs) gradients w.r.t. h and c -> (da (B, 4Hs), dc_prev (B, Hs)).

    dc_total = dc + dh o (1 - tanh(c)^2) (h = o tanh(c)); then each gate by the chain
    rule through its own nonlinearity (sigmoid' = s (1 - s), tanh' = 1 - g^2), and
    dc_prev = dc_total f.
    """
    xp = get_array_module(dh)
    (i, f, o, g), c_prev, tanh_c = cache
    *da, dc_prev = _lstm_cell_backward_kernel(dh, dc, i, f, o, g, c_prev, tanh_c)
    return xp.concatenate(da, axis=1), dc_prev


# ---------------------------------------------------------------- peephole LSTM cell
# Graves 2013 eq 7-11 (Blocks' LSTM, which the seed used): the input and forget gates
# see c_{t-1}, the output gate sees c_t, each through a diagonal weight vector:
#     i = sigmoid(a_i + p_i c_{t-1})       (eq 7)      f = sigmoid(a_f + p_f c_{t-1})  (eq 8)
#     c = f c_{t-1} + i tanh(a_g)          (eq 9)      o = sigmoid(a_o + p_o c)        (eq 10)
#     h = o tanh(c)                        (eq 11)
# peep (3Hs,) holds [p_i, p_f, p_o]. The three multiply-adds sit inside the one fused
# kernel of a step; with peep = 0 every value equals the plain cell's.

@fuse
def _peephole_lstm_cell_kernel(a_i, a_f, a_o, a_g, c_prev, p_i, p_f, p_o):
    i, f, g = _sigmoid(a_i + p_i * c_prev), _sigmoid(a_f + p_f * c_prev), np.tanh(a_g)
    c = f * c_prev + i * g
    o = _sigmoid(a_o + p_o * c)
    tanh_c = np.tanh(c)
    return i, f, o, g, c, tanh_c, o * tanh_c


@fuse
def _peephole_lstm_cell_backward_kernel(dh, dc, i, f, o, g, c_prev, tanh_c, p_i, p_f, p_o):
    da_o = dh * tanh_c * o * (1.0 - o)
    dc_total = dc + dh * o * (1.0 - tanh_c * tanh_c) + da_o * p_o     # c feeds o (eq 10)
    da_i = dc_total * g * i * (1.0 - i)
    da_f = dc_total * c_prev * f * (1.0 - f)
    return (da_i, da_f, da_o, dc_total * i * (1.0 - g * g),
            dc_total * f + da_i * p_i + da_f * p_f)                   # c_{t-1} feeds i, f


def peephole_lstm_cell_forward(a, c_prev, peep):
    """The elementwise half of a peephole LSTM step (Graves 2013 eq 7-11, above).

    a: (B, 4Hs) gate pre-activations [i, f, o, g] without the peepholes
    c_prev: (B, Hs)   peep: (3Hs,) = [p_i, p_f, p_o]
    -> (h (B, Hs), c (B, Hs)), cache
    """
    Hs = c_prev.shape[1]
    peeps = [peep[k * Hs:(k + 1) * Hs] for k in range(3)]
    i, f, o, g, c, tanh_c, h = _peephole_lstm_cell_kernel(*_gate_blocks(a, Hs), c_prev, *peeps)
    return (h, c), ((i, f, o, g), c_prev, c, tanh_c, peep)


def peephole_lstm_cell_backward(dh, dc, cache):
    """dh, dc: (B, Hs) gradients w.r.t. h and c
    -> (da (B, 4Hs), dc_prev (B, Hs), dpeep (3Hs,)), dpeep summed over the batch:
    dp_i = sum_b da_i c_{t-1},  dp_f = sum_b da_f c_{t-1},  dp_o = sum_b da_o c_t
    (each p multiplies that cell state inside its gate's pre-activation).
    """
    xp = get_array_module(dh)
    (i, f, o, g), c_prev, c, tanh_c, peep = cache
    Hs = c_prev.shape[1]
    peeps = [peep[k * Hs:(k + 1) * Hs] for k in range(3)]
    da_i, da_f, da_o, da_g, dc_prev = _peephole_lstm_cell_backward_kernel(
        dh, dc, i, f, o, g, c_prev, tanh_c, *peeps)
    dpeep = xp.concatenate([(da_i * c_prev).sum(axis=0), (da_f * c_prev).sum(axis=0),
                            (da_o * c).sum(axis=0)])
    return xp.concatenate([da_i, da_f, da_o, da_g], axis=1), dc_prev, dpeep


# ---------------------------------------------------------------- Gaussian latent
# Q(z_t|h_enc_t) = N(mu, sigma^2) with q = [mu | log sigma] (eq 1-2). Two paired ops:
# the reparameterised sample (eq 6) and the KL (eq 10-11); latent_forward/backward
# compose them.

@fuse
def _reparam_kernel(mu, log_sigma, eps):
    noise = np.exp(log_sigma) * eps
    return noise, mu + noise


@fuse
def _kl_terms_kernel(mu, log_sigma):
    var = np.exp(2.0 * log_sigma)
    return var, 0.5 * (mu * mu + var - 1.0) - log_sigma


def reparam_forward(q, eps):
    """z = mu + sigma * eps (eq 6).

    q: (B, 2Z) = [mu | log sigma]   eps: (B, Z) standard normal noise -> z (B, Z), cache
    """
    Z = eps.shape[1]
    noise, z = _reparam_kernel(q[:, :Z], q[:, Z:], eps)
    return z, noise                              # noise = sigma * eps = dz/dlog sigma


def reparam_backward(dz, cache):
    """dz: (B, Z) -> dq (B, 2Z) = [dz | dz * sigma * eps]
    (dz/dmu = 1, dz/dlog sigma = sigma eps)."""
    xp = get_array_module(dz)
    return xp.concatenate([dz, dz * cache], axis=1)


def kl_forward(q):
    """Exact KL(N(mu, sigma^2) || N(0, I)), summed over the Z units (eq 10-11):
    kl = sum_j 0.5 (mu^2 + sigma^2 - 1) - log sigma.

    q: (..., 2Z) = [mu | log sigma] -> kl (...), cache
    """
    xp = get_array_module(q)
    Z = q.shape[-1] // 2
    mu, log_sigma = q[..., :Z], q[..., Z:]
    var = xp.exp(2.0 * log_sigma)
    # the -1 summed once, after the sum (as on NumPy before; _kl_terms_kernel, the
    # engine's GPU form, adds it to every term)
    kl = (0.5 * (mu * mu + var) - log_sigma).sum(axis=-1) - 0.5 * Z
    return kl, (mu, var)


def kl_backward(dkl, cache):
    """dkl: shaped like kl, or a scalar -> dq = [dkl mu | dkl (sigma^2 - 1)], shaped like q
    (d/dmu of 0.5 mu^2 is mu; d/dlog sigma of 0.5 sigma^2 - log sigma is sigma^2 - 1)."""
    mu, var = cache
    xp = get_array_module(mu)
    if not isinstance(dkl, (int, float)):   # a python number needs no copy to a GPU
        dkl = xp.asarray(dkl, dtype=mu.dtype)[..., None]
    return xp.concatenate([mu * dkl, (var - 1.0) * dkl], axis=-1)


def latent_forward(q, eps):
    """Reparameterised sample and exact KL to N(0, I) of one glimpse (eq 1-2, 6, 10-11).

    q: (B, 2Z) = [mu | log sigma]   eps: (B, Z) standard normal noise
    -> (z (B, Z), kl (B,)), cache
    """
    z, reparam_cache = reparam_forward(q, eps)
    kl, kl_cache = kl_forward(q)
    return (z, kl), (reparam_cache, kl_cache)


def latent_backward(dz, dkl, cache):
    """dz: (B, Z), dkl: (B,) or scalar -> dq (B, 2Z), the sum of both paths into q."""
    reparam_cache, kl_cache = cache
    return reparam_backward(dz, reparam_cache) + kl_backward(dkl, kl_cache)


# ---------------------------------------------------------------- Bernoulli likelihood

@fuse
def _bce_kernel(logits, x):
    # softplus(l) - x*l, with softplus = max(l, 0) + log1p(exp(-|l|))
    return np.maximum(logits, 0) + np.log1p(np.exp(-np.abs(logits))) - x * logits


@fuse
def _bce_backward_kernel(dloss, logits, x):
    return dloss * (_sigmoid(logits) - x)


def bce_forward(logits, x):
    """-log Bernoulli(x | sigmoid(logits)) summed over pixels (paper eq 9).

    logits: (B, D) canvas c_T   x: (B, D) targets in [0, 1]
    -> loss (B,), cache
    """
    return _bce_kernel(logits, x).sum(axis=-1), (logits, x)


def bce_backward(dloss, cache):
    """dloss: (B,) or scalar -> dlogits (B, D) = dloss * (sigmoid(l) - x)."""
    xp = get_array_module(*cache)
    logits, x = cache
    dloss = xp.asarray(dloss, dtype=logits.dtype)
    if dloss.ndim:
        dloss = dloss.reshape(-1, 1)
    return _bce_backward_kernel(dloss, logits, x)


# ---------------------------------------------------------------- softmax cross-entropy

def softmax_xent_forward(logits, labels):
    """-log softmax(logits)[label] per example (the classifier's loss, paper section 4.1).

    logits: (B, K)   labels: (B,) integers in 0..K-1
    -> (loss (B,), probabilities (B, K)), cache
    The row maximum is subtracted before exp, so no logit can overflow it.
    """
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = exp.sum(axis=1)
    rows = xp.arange(logits.shape[0])
    loss = xp.log(total) - shifted[rows, labels]
    probs = exp / total[:, None]
    return (loss, probs), (probs, labels)


def softmax_xent_backward(dloss, cache):
    """dloss: (B,) or scalar -> dlogits (B, K) = dloss * (softmax(logits) - onehot(label))."""
    probs, labels = cache
    xp = get_array_module(probs)
    dlogits = probs.copy()
    dlogits[xp.arange(probs.shape[0]), labels] -= 1.0
    if isinstance(dloss, (int, float)):
        dlogits *= dloss
    else:
        dlogits *= xp.asarray(dloss, dtype=probs.dtype).reshape(-1, 1)
    return dlogits
