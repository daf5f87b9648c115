"""The DRAW network: parameters, the unrolled T-step forward, BPTT, and generation.

Dimension legend
    B  batch                 T  glimpses (cfg.T)
    C  channels              H, W  image height and width
    D  = C*H*W, flattened channels-first (C, H, W)
    Nr, Nw  read and write window sizes
    R  read width: 2*C*Nr^2 with attention, 2*D without (cfg.read_dim)
    Pw write width: C*Nw^2 with attention, D without (cfg.write_dim)
    He, Hd  encoder and decoder LSTM sizes     Z  latent size

Paper: Gregor, Danihelka, Graves, Rezende, Wierstra, "DRAW: A Recurrent Neural
Network For Image Generation", ICML 2015. Equation numbers below are the paper's.

Parameters (name: shape, role)
    c0          (D,)            initial canvas c_0, a learned bias
    h_enc0      (He,)           initial encoder hidden state (cell state starts at 0)
    h_dec0      (Hd,)           initial decoder hidden state (cell state starts at 0)
    enc_W       (R+Hd+He, 4He)  encoder LSTM; input rows [r_t, h_dec_{t-1}, h_enc_{t-1}]
    enc_b       (4He,)          gate column blocks [i, f, o, g]
    q_W, q_b    (He, 2Z), (2Z,) Q(z|h_enc): columns [mu | log sigma] (eq 1-2)
    dec_W       (Z+Hd, 4Hd)     decoder LSTM; input rows [z_t, h_dec_{t-1}]
    dec_b       (4Hd,)
    write_W     (Hd, Pw)        write layer: the patch w_t (eq 28) or the canvas delta (eq 18)
    write_b     (Pw,)
  with attention only:
    read_att_W  (Hd, 5), read_att_b (5,)    read window (eq 21) from h_dec_{t-1}
    write_att_W (Hd, 5), write_att_b (5,)   write window from h_dec_t

The forward keeps the inputs of the recurrent GEMMs in one stacked buffer allocated
once per call, (features, T+1, B) (see "unrolled forward" below), and the backward
keeps the stacked output gradients likewise, so each weight gradient is one GEMM over
all T*B columns after the reverse loop.
"""
from __future__ import annotations

import math

import numpy as np

from . import attention as att
from .backend import fuse, get_array_module, to_numpy
from .config import DrawConfig
from .layers import (bce_backward, bce_forward, latent_backward, latent_forward,
                     linear_forward, lstm_cell_backward, lstm_cell_forward, sigmoid)

def param_shapes(cfg: DrawConfig) -> dict:
    """name -> shape of every parameter for this configuration."""
    He, Hd, Z = cfg.enc_dim, cfg.dec_dim, cfg.z_dim
    shapes = {
        "c0": (cfg.D,),
        "h_enc0": (He,),
        "h_dec0": (Hd,),
        "enc_W": (cfg.read_dim + Hd + He, 4 * He),
        "enc_b": (4 * He,),
        "q_W": (He, 2 * Z),
        "q_b": (2 * Z,),
        "dec_W": (Z + Hd, 4 * Hd),
        "dec_b": (4 * Hd,),
        "write_W": (Hd, cfg.write_dim),
        "write_b": (cfg.write_dim,),
    }
    if cfg.attention:
        shapes.update({"read_att_W": (Hd, att.P_ATTENTION), "read_att_b": (att.P_ATTENTION,),
                       "write_att_W": (Hd, att.P_ATTENTION), "write_att_b": (att.P_ATTENTION,)})
    return shapes


def _tiling_window_bias(cfg, N):
    """Attention bias (g~X, g~Y, log sigma^2, log delta~, log gamma) for a centred
    window of N filters spaced A/N apart with sigma = A/(2N) (see init_params)."""
    A = max(cfg.height, cfg.width)
    tile = A / N
    delta_tilde = tile * (N - 1) / (A - 1) if N > 1 and A > 1 else 1.0
    return np.array([0.0, 0.0, 2.0 * math.log(tile / 2.0), math.log(delta_tilde), 0.0])


def init_params(cfg: DrawConfig, seed: int = 0, dtype="float32") -> dict:
    """Fresh parameters as NumPy arrays (move them with backend.to_device).

    LSTM weights ~ U(-1/sqrt(Hd), 1/sqrt(Hd)) as in common LSTM practice, forget
    gate bias 1 so that memory survives the early glimpses. The output layers
    (q, write, attention) start small (std 0.01), so at initialisation the
    posterior is close to the prior and the canvas stays near c0; the loss then
    starts at its analytic value (see tests/test_model.py).

    The attention biases start every window centred and tiling the image: N
    filters a stride A/N apart (A = max(H, W)), each with sigma = half that
    stride, and gamma = 1. With eq 24's own neutral point (delta~ = 1,
    sigma^2 = 1) a 2x2 read puts its two filters on the border pixels, with no
    overlap; on MNIST they then read only black, the encoder gets no signal and
    the posterior collapses to the prior (measured: KL stays 0 and the bound
    stalls at the mean image's ~206 nats, while the tiling start learns).
    """
    if dtype not in ("float32", "float64", np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name in ("enc_W", "dec_W"):
            hidden = shape[1] // 4
            value = rng.uniform(-1.0, 1.0, shape) / math.sqrt(hidden)
        elif name in ("enc_b", "dec_b"):
            hidden = shape[0] // 4
            value = np.zeros(shape)
            value[hidden:2 * hidden] = 1.0
        elif name in ("read_att_b", "write_att_b"):
            value = _tiling_window_bias(cfg, cfg.read_n if name == "read_att_b" else cfg.write_n)
        elif name.endswith("_W"):
            value = 0.01 * rng.standard_normal(shape)
        else:
            value = np.zeros(shape)
        params[name] = value.astype(dtype)
    return params


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


def _check_inputs(params, cfg, x, eps):
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


# ---------------------------------------------------------------- eq 3

@fuse
def _glimpse_error(x, canvas):
    """x, canvas: (B, D) -> (sigmoid(c_{t-1}), x_hat = x - sigmoid(c_{t-1})) (eq 3)."""
    sig = 0.5 * (np.tanh(0.5 * canvas) + 1.0)
    return sig, x - sig


def _glimpse_error_into(x, canvas, sig_out, x_hat_out):
    """Eq 3 written into preallocated arrays: x, canvas -> sig_out, x_hat_out, all of one
    shape ((B, D), or (B, C, H, W) to write x_hat into the read's image buffer).

    On NumPy in place, with no temporaries; on a GPU the fused kernel, then copies."""
    if get_array_module(x) is not np:
        sig_out[...], x_hat_out[...] = _glimpse_error(x, canvas)
        return
    np.multiply(canvas, 0.5, out=sig_out)
    np.tanh(sig_out, out=sig_out)
    sig_out += 1.0
    sig_out *= 0.5
    np.subtract(x, sig_out, out=x_hat_out)


@fuse
def _glimpse_error_backward(dcanvas, dx_hat, sig):
    """Add eq 3's path to dL/dc_{t-1}: dcanvas - dx_hat * sigmoid'(c_{t-1})."""
    return dcanvas - dx_hat * sig * (1.0 - sig)


# ---------------------------------------------------------------- read and write

def _static_read_rows(cfg):
    """Rows of enc_W fed by a part of r_t that is the same at every glimpse: x itself
    without attention (eq 17), nothing with attention."""
    return 0 if cfg.attention else cfg.D


def _read_forward(params, cfg, x, x_hat, h_dec_prev):
    """The time-varying part of r_t = read(x, x_hat, h_dec_{t-1}), plainly, for draw_step.

    -> (B, R - S) with S = _static_read_rows(cfg): x_hat without attention (eq 17;
    the x half is constant and projected once per forward), or the glimpses
    (B, 2C*Nr^2) of eq 21-27 with attention.
    """
    xp = get_array_module(x)
    if not cfg.attention:
        return x_hat, None
    B, C, H, W = x.shape[0], cfg.channels, cfg.height, cfg.width
    p, _ = linear_forward(h_dec_prev, params["read_att_W"], params["read_att_b"])
    (Fy, Fx, gamma), window_cache = att.window_forward(p, H, W, cfg.read_n)
    images = xp.concatenate([x.reshape(B, C, H, W), x_hat.reshape(B, C, H, W)], axis=1)
    glimpse, read_cache = att.read_forward(images, Fy, Fx, gamma)
    return glimpse.reshape(B, -1), (window_cache, read_cache)


def _write_forward(params, cfg, h_dec):
    """write(h_dec_t) -> canvas increment (B, D): eq 18, or eq 28-29 with attention.

    The cache is None without attention, else (window cache, write cache).
    """
    w, _ = linear_forward(h_dec, params["write_W"], params["write_b"])
    if not cfg.attention:
        return w, None
    B, C, H, W, N = h_dec.shape[0], cfg.channels, cfg.height, cfg.width, cfg.write_n
    p, _ = linear_forward(h_dec, params["write_att_W"], params["write_att_b"])
    (Fy, Fx, gamma), window_cache = att.window_forward(p, H, W, N)
    image, write_cache = att.write_forward(w.reshape(B, C, N, N), Fy, Fx, gamma)
    return image.reshape(B, -1), (window_cache, write_cache)


def _decoder_heads(params):
    """With attention, h_dec_t feeds three linear maps: the write patch w_t (eq 28), the
    write window (eq 21) and the read window of the next glimpse (eq 21, which reads with
    h_dec_{t-1}). The unrolled forward runs them as one GEMM with these columns:
    -> W (Hd, Pw + 10), b (Pw + 10,) = [write | write window | next read window]."""
    xp = get_array_module(params["write_W"])
    return (xp.concatenate([params["write_W"], params["write_att_W"], params["read_att_W"]],
                           axis=1),
            xp.concatenate([params["write_b"], params["write_att_b"], params["read_att_b"]]))


# ---------------------------------------------------------------- one glimpse

def initial_state(params, B):
    """The state before glimpse 1: canvas c_0, learned h_0's, zero LSTM cells."""
    xp = get_array_module(params["c0"])
    dtype = params["c0"].dtype

    def rows(v):
        return xp.broadcast_to(v, (B,) + v.shape).copy()
    return {"canvas": rows(params["c0"]),
            "h_enc": rows(params["h_enc0"]), "c_enc": xp.zeros((B, len(params["h_enc0"])), dtype),
            "h_dec": rows(params["h_dec0"]), "c_dec": xp.zeros((B, len(params["h_dec0"])), dtype)}


def _decoder_step(params, cfg, z, h_dec, c_dec):
    """Decoder and write of one glimpse, plainly (eq 7-8, 14-15), for draw_step and generate.

    z: (B, Z)   h_dec, c_dec: (B, Hd) -> (h_dec, c_dec, canvas increment (B, D), write cache)
    """
    xp = get_array_module(z)
    a_dec = xp.concatenate([z, h_dec], axis=1) @ params["dec_W"] + params["dec_b"]
    (h_dec, c_dec), _ = lstm_cell_forward(a_dec, c_dec)
    w, write_cache = _write_forward(params, cfg, h_dec)
    return h_dec, c_dec, w, write_cache


def draw_step(params, cfg, x, state, eps_t):
    """One glimpse of the inference network (eq 3-8), with no cache kept.

    x: (B, D)   eps_t: (B, Z)   state: dict from initial_state or draw_step
    -> (new state, kl_t (B,)). Written plainly, with concatenations, so that the
    preallocated unrolled forward can be checked against it.
    """
    xp = get_array_module(x)
    _, x_hat = _glimpse_error(x, state["canvas"])                               # eq 3
    r, _ = _read_forward(params, cfg, x, x_hat, state["h_dec"])                 # eq 4
    if _static_read_rows(cfg):
        r = xp.concatenate([x, r], axis=1)
    a_enc = xp.concatenate([r, state["h_dec"], state["h_enc"]], axis=1) @ params["enc_W"]
    (h_enc, c_enc), _ = lstm_cell_forward(a_enc + params["enc_b"], state["c_enc"])  # eq 5
    q = h_enc @ params["q_W"] + params["q_b"]
    (z, kl), _ = latent_forward(q, eps_t)                                       # eq 6
    h_dec, c_dec, w, _ = _decoder_step(params, cfg, z, state["h_dec"], state["c_dec"])  # eq 7
    return {"canvas": state["canvas"] + w,                                      # eq 8
            "h_enc": h_enc, "c_enc": c_enc, "h_dec": h_dec, "c_dec": c_dec}, kl


# ---------------------------------------------------------------- unrolled forward
# One stacked buffer, features first, holds the inputs of the three recurrent GEMMs.
# Its slot t (t = 0..T) has the rows
#     [1 ; z_t ; h_dec_{t-1} ; r_t ; h_enc_{t-1} ; 1]
# so that each GEMM's input is one contiguous block of rows, ending or starting with a
# row of ones that carries the bias:
#     decoder (eq 7)      [1 ; z_t ; h_dec_{t-1}]                 slot t
#     encoder (eq 5)      [h_dec_{t-1} ; r_t ; h_enc_{t-1} ; 1]   slot t
#     posterior (eq 1-2)  [h_enc_t ; 1]                           slot t + 1
# The LSTMs write h straight into the next slot and the sample z into its own, so no
# state is copied and no bias added per glimpse; after the reverse loop each weight's
# gradient, its bias's included, is one GEMM over the T*B columns of its block. r_t
# holds only the varying part of the read (the x rows without attention are constant
# and projected once per forward).

class _InputRows:
    """Row slices of the stacked GEMM-input buffer (see above) for a config."""

    def __init__(self, cfg: DrawConfig):
        Z, Hd, He = cfg.z_dim, cfg.dec_dim, cfg.enc_dim
        R = cfg.read_dim - _static_read_rows(cfg)
        self.z = slice(1, 1 + Z)
        self.h_dec = slice(1 + Z, 1 + Z + Hd)
        self.r = slice(1 + Z + Hd, 1 + Z + Hd + R)
        self.h_enc = slice(1 + Z + Hd + R, 1 + Z + Hd + R + He)
        self.count = 2 + Z + Hd + R + He
        self.decoder = slice(0, self.h_dec.stop)
        self.encoder = slice(self.h_dec.start, self.count)
        self.posterior = slice(self.h_enc.start, self.count)


def _encoder_weights(params, cfg):
    """enc_W's varying rows in the buffer's order [h_dec ; r ; h_enc] (the parameter
    keeps the paper's [r ; h_dec ; h_enc]) -> (Hd+R+He, 4He), contiguous."""
    xp = get_array_module(params["enc_W"])
    S = _static_read_rows(cfg)
    R, Hd = cfg.read_dim - S, cfg.dec_dim
    W = params["enc_W"]
    return xp.concatenate([W[S + R:S + R + Hd], W[S:S + R], W[S + R + Hd:]])


def _transpose(a):
    """A contiguous copy of a.T, for a 2-D array.

    On NumPy copied 8 rows of `a` at a time. NumPy's own transposing copy walks down
    the columns of `a`, and with rows of 1024 float32 (4 KiB, the LSTMs' 4H) every
    read lands in the same cache set: 1.07 against 0.24 ms for (521, 1024).
    """
    xp = get_array_module(a)
    if xp is not np:
        return xp.ascontiguousarray(a.T)
    out = np.empty(a.shape[::-1], a.dtype)
    for start in range(0, a.shape[0], 8):
        out[:, start:start + 8] = a[start:start + 8].T
    return out


def forward(params, cfg, x, eps, need_terms=False, need_cache=True):
    """The whole inference network, unrolled over T glimpses (eq 3-12).

    x: (B, D) in [0, 1]   eps: (T, B, Z)
    -> (loss_per_example (B,), terms, cache); terms holds "recon" (B,) = L^x,
       "kl" (T, B) and, with need_terms, "log_weight" (B,) = log p(x|z) + log p(z)
       - log q(z|x) for importance-weighted estimates. need_cache=False keeps no
    per-glimpse caches (the cache is then None), for forward-only evaluation.
    Inputs are assumed checked (loss_and_grads and loss_only check them).

    Layout: the recurrent state runs features first, (features, B), in the stacked
    buffer described above, (features, T+1, B). A gate GEMM is then W^T [input] with
    the small batch as the GEMM's last dimension, which OpenBLAS runs about a third
    faster than the (B, features) form. Images, canvas, read and write stay (B, .).
    """
    xp = get_array_module(x)
    dtype = params["c0"].dtype
    T, B, D, Z = cfg.T, x.shape[0], cfg.D, cfg.z_dim
    He, Hd = cfg.enc_dim, cfg.dec_dim
    S = _static_read_rows(cfg)
    rows = _InputRows(cfg)
    # Transposed weights with the bias as the column that meets the ones row, made
    # once per call, so that each glimpse's GEMM reads them contiguously.
    enc_W_T = _transpose(xp.concatenate([_encoder_weights(params, cfg),
                                         params["enc_b"][None]]))         # (4He, Hd+R+He+1)
    dec_W_T = _transpose(xp.concatenate([params["dec_b"][None], params["dec_W"]]))  # (4Hd, 1+Z+Hd)
    q_W_T = _transpose(xp.concatenate([params["q_W"], params["q_b"][None]]))        # (2Z, He+1)
    # the constant rows of r_t (x, without attention) are projected once, not T times
    enc_static = xp.ascontiguousarray((x @ params["enc_W"][:S]).T) if S else None  # (4He, B)
    eps_T = eps.transpose(0, 2, 1)                                          # (T, Z, B) view

    inputs = xp.empty((rows.count, T + 1, B), dtype)      # the stacked buffer (see above)
    inputs[0] = inputs[-1] = 1
    inputs[rows.h_dec, 0] = params["h_dec0"][:, None]
    inputs[rows.h_enc, 0] = params["h_enc0"][:, None]
    q_all = xp.empty((T, 2 * Z, B), dtype)                 # [mu ; log sigma] of every glimpse
    kl = xp.empty((T, B), dtype)
    sig_prev = xp.empty((T, B, D), dtype)                  # sigmoid(c_{t-1}), for eq 3's backward
    canvas = xp.broadcast_to(params["c0"], (B, D))
    c_enc = xp.zeros((He, B), dtype)
    c_dec = xp.zeros((Hd, B), dtype)
    # gate pre-activations, turned into the activations backward needs in place
    a_enc = xp.empty((T, 4 * He, B), dtype)
    a_dec = xp.empty((T, 4 * Hd, B), dtype)
    if cfg.attention:
        C, H, W, Pw = cfg.channels, cfg.height, cfg.width, cfg.write_dim
        # [x, x_hat] as the read sees them, x written once, x_hat rewritten each glimpse
        images = xp.empty((B, 2 * C, H, W), dtype)
        x_planes = x.reshape(B, C, H, W)                       # x in x_hat's shape, for eq 3
        images[:, :C] = x_planes
        x_hat = images[:, C:]                                  # (B, C, H, W), a view
        heads_W, heads_b = _decoder_heads(params)
        # the first glimpse's read window, from h_dec_0 (eq 21); later ones come with
        # the previous glimpse's write window
        p_read = inputs[rows.h_dec, 0].T @ params["read_att_W"] + params["read_att_b"]
        (read_window,), first_window_cache = att.windows_forward(p_read, H, W, (cfg.read_n,))
    else:
        x_hat, first_window_cache = xp.empty((B, D), dtype), None
        x_planes = x
    steps = []
    for t in range(T):
        slot, next_slot = inputs[:, t], inputs[:, t + 1]
        _glimpse_error_into(x_planes, canvas.reshape(x_hat.shape),               # eq 3
                            sig_prev[t].reshape(x_hat.shape), x_hat)
        if cfg.attention:                                                        # eq 4
            glimpse, read_cache = att.read_forward(images, *read_window)        # eq 27
            r = glimpse.reshape(B, -1)
        else:
            r, read_cache = x_hat, None                                          # eq 17
        slot[rows.r] = r.T
        xp.matmul(enc_W_T, slot[rows.encoder], out=a_enc[t])
        if S:
            a_enc[t] += enc_static
        (_, c_enc), enc_cache = lstm_cell_forward(a_enc[t], c_enc, axis=0,       # eq 5
                                                  gates_out=a_enc[t], h_out=next_slot[rows.h_enc])
        xp.matmul(q_W_T, next_slot[rows.posterior], out=q_all[t])              # eq 1-2
        # eq 6, and eq 10-11's KL per glimpse, while q_t is in the CPU caches
        (_, kl[t]), latent_cache = latent_forward(q_all[t], eps_T[t], axis=0, z_out=slot[rows.z])
        xp.matmul(dec_W_T, slot[rows.decoder], out=a_dec[t])
        (h_dec, c_dec), dec_cache = lstm_cell_forward(a_dec[t], c_dec, axis=0,   # eq 7
                                                      gates_out=a_dec[t], h_out=next_slot[rows.h_dec])
        if cfg.attention:
            heads = h_dec.T @ heads_W + heads_b                                  # eq 21, 28
            (write_window, read_window), window_cache = att.windows_forward(
                heads[:, Pw:], H, W, (cfg.write_n, cfg.read_n))                  # eq 19-26
            w, write_cache = att.write_forward(
                heads[:, :Pw].reshape(B, C, cfg.write_n, cfg.write_n), *write_window)  # eq 29
            w = w.reshape(B, D)
            write_cache = (write_cache, window_cache)
        else:
            w, write_cache = _write_forward(params, cfg, h_dec.T)                # eq 18
        canvas = canvas + w                                                      # eq 8
        if need_cache:
            steps.append((read_cache, enc_cache, latent_cache, dec_cache, write_cache))
    recon, bce_cache = bce_forward(canvas, x)                                    # eq 9
    loss = recon + kl.sum(axis=0)                                                # eq 10-12
    terms = {"recon": recon, "kl": kl}
    if need_terms:  # log p(z) - log q(z|x) = sum over t, j of -z^2/2 + eps^2/2 + log sigma
        z_all, eps_all = inputs[rows.z, :T].transpose(1, 0, 2), eps.transpose(0, 2, 1)  # (T, Z, B)
        log_ratio = (0.5 * (eps_all * eps_all - z_all * z_all) + q_all[:, Z:]).sum(axis=(0, 1))
        terms["log_weight"] = log_ratio - recon
    if not need_cache:
        return loss, terms, None
    # the gate buffers are reached through the glimpse caches; listed here so that
    # activation counts see them once
    stacked = {"inputs": inputs, "q": q_all, "sig_prev": sig_prev, "x": x,
               "gates_enc": a_enc, "gates_dec": a_dec}
    return loss, terms, (steps, stacked, bce_cache, first_window_cache)


def backward(params, cfg, cache):
    """BPTT through the unrolled forward, for loss = batch mean of L^x + L^z.

    cache: from forward -> grads, a dict with the keys and shapes of params.
    Gradients of the recurrent state run features first, as in forward.
    """
    steps, stacked, bce_cache, first_window_cache = cache
    inputs = stacked["inputs"]
    xp = get_array_module(inputs)
    dtype = inputs.dtype
    T, B = stacked["gates_enc"].shape[0], inputs.shape[2]
    Z, He, Hd, D, Pw = cfg.z_dim, cfg.enc_dim, cfg.dec_dim, cfg.D, cfg.write_dim
    S = _static_read_rows(cfg)
    R = cfg.read_dim - S
    rows = _InputRows(cfg)
    enc_W = _encoder_weights(params, cfg)       # rows [h_dec ; r ; h_enc], as in forward
    inv_B = 1.0 / B

    # stacked output gradients of the linear maps: features first for the LSTM and q
    # layers, (T, B, .) for the decoder's heads (write, and with attention both windows)
    da_enc = xp.empty((4 * He, T, B), dtype)
    da_dec = xp.empty((4 * Hd, T, B), dtype)
    dq_all = xp.empty((2 * Z, T, B), dtype)
    dq_step = xp.empty((2 * Z, B), dtype)
    if cfg.attention:
        C, H, W, Nr = cfg.channels, cfg.height, cfg.width, cfg.read_n
        heads_W, _ = _decoder_heads(params)
        dheads = xp.empty((T, B, Pw + 2 * att.P_ATTENTION), dtype)
        # glimpse T+1 does not exist: its read window gets zero gradients
        dread_window = (xp.zeros((B, Nr, H), dtype), xp.zeros((B, Nr, W), dtype),
                        xp.zeros(B, dtype))
    else:
        heads_W = params["write_W"]
        dheads = xp.empty((T, B, Pw), dtype)

    da_enc_step = xp.empty((4 * He, B), dtype)
    da_dec_step = xp.empty((4 * Hd, B), dtype)
    dcanvas = bce_backward(inv_B, bce_cache)             # d loss / d c_T
    dh_dec_next = xp.zeros((Hd, B), dtype)               # from step t+1's uses of h_dec_t
    dc_dec = xp.zeros((Hd, B), dtype)
    dh_enc_next = xp.zeros((He, B), dtype)
    dc_enc = xp.zeros((He, B), dtype)
    for t in reversed(range(T)):
        read_cache, enc_cache, latent_cache, dec_cache, write_cache = steps[t]
        # c_t = c_{t-1} + write(h_dec_t); with attention h_dec_t also set glimpse t+1's read
        if cfg.attention:
            write_cache, window_cache = write_cache
            dpatch, dFy, dFx, dgamma = att.write_backward(dcanvas.reshape(B, C, H, W),
                                                          write_cache)
            dheads[t, :, :Pw] = dpatch.reshape(B, Pw)
            dheads[t, :, Pw:] = att.windows_backward([(dFy, dFx, dgamma), dread_window],
                                                     window_cache)
        else:
            dheads[t] = dcanvas
        dh_dec = heads_W @ dheads[t].T + dh_dec_next
        # into a contiguous scratch, then one copy: ufuncs crawl over the strided slice
        da_dec[:, t], dc_dec = lstm_cell_backward(dh_dec, dc_dec, dec_cache, out=da_dec_step)
        ddec_in = params["dec_W"] @ da_dec_step                          # [dz, dh_dec_{t-1}]
        dq_all[:, t] = latent_backward(ddec_in[:Z], inv_B, latent_cache, out=dq_step)
        dh_enc = params["q_W"] @ dq_step + dh_enc_next
        da_enc[:, t], dc_enc = lstm_cell_backward(dh_enc, dc_enc, enc_cache, out=da_enc_step)
        denc_in = enc_W @ da_enc_step                    # [dh_dec_{t-1}, dr, dh_enc_{t-1}]
        dh_enc_next = denc_in[Hd + R:]
        dh_dec_next = ddec_in[Z:] + denc_in[:Hd]
        dr = denc_in[Hd:Hd + R]
        if cfg.attention:    # the window's gradients wait for the previous glimpse's heads
            dx_hat, *dread_window = att.read_backward(
                dr.T.reshape(B, 2 * C, Nr, Nr), read_cache, first_plane=C)
            dx_hat = dx_hat.reshape(B, D)
        else:
            dx_hat = dr.T
        dcanvas = _glimpse_error_backward(dcanvas, dx_hat, stacked["sig_prev"][t])
    if cfg.attention:        # the first glimpse's read window came from h_dec_0
        dp_first_read = att.windows_backward([dread_window], first_window_cache)   # (B, 5)
        dh_dec_next += params["read_att_W"] @ dp_first_read.T

    def block(row_slice, first):         # rows of slots first..first+T-1 -> (F, T*B), a view
        return inputs[row_slice, first:first + T].reshape(row_slice.stop - row_slice.start, -1)

    def features_first(buffer):          # (F, T, B) -> (F, T*B)
        return buffer.reshape(buffer.shape[0], -1)

    grads = {"c0": dcanvas.sum(axis=0), "h_dec0": dh_dec_next.sum(axis=1),
             "h_enc0": dh_enc_next.sum(axis=1)}
    # one GEMM per weight, bias included, over all T*B columns (see the layout above)
    enc = block(rows.encoder, 0) @ features_first(da_enc).T          # [h_dec ; r ; h_enc ; 1]
    grads["enc_W"] = xp.concatenate([enc[Hd:Hd + R], enc[:Hd], enc[Hd + R:-1]])
    grads["enc_b"] = enc[-1]
    dec = block(rows.decoder, 0) @ features_first(da_dec).T          # [1 ; z ; h_dec]
    grads["dec_b"], grads["dec_W"] = dec[0], dec[1:]
    q = block(rows.posterior, 1) @ features_first(dq_all).T          # [h_enc ; 1]
    grads["q_W"], grads["q_b"] = q[:-1], q[-1]
    dheads_2d = dheads.reshape(T * B, -1)
    dheads_W = block(rows.h_dec, 1) @ dheads_2d                      # h_dec_1..T
    dheads_b = dheads_2d.sum(axis=0)
    grads["write_W"], grads["write_b"] = dheads_W[:, :Pw], dheads_b[:Pw]
    if cfg.attention:
        P = att.P_ATTENTION
        grads["write_att_W"] = dheads_W[:, Pw:Pw + P]
        grads["write_att_b"] = dheads_b[Pw:Pw + P]
        grads["read_att_W"] = dheads_W[:, Pw + P:] + inputs[rows.h_dec, 0] @ dp_first_read
        grads["read_att_b"] = dheads_b[Pw + P:] + dp_first_read.sum(axis=0)
    if S:  # x fed the same rows at every glimpse: sum their output gradients first
        dW_static = stacked["x"].T @ da_enc.sum(axis=1).T
        grads["enc_W"] = xp.concatenate([dW_static, grads["enc_W"]], axis=0)
    return {name: xp.ascontiguousarray(grads[name]) for name in params}


def _cache_nbytes(obj, seen=None):
    """Bytes of the distinct arrays a cache holds (views count once, via their base)."""
    seen = set() if seen is None else seen
    if isinstance(obj, (tuple, list)):
        return sum(_cache_nbytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_cache_nbytes(o, seen) for o in obj.values())
    if hasattr(obj, "nbytes") and hasattr(obj, "base"):
        owner = obj if obj.base is None else obj.base
        if id(owner) in seen:
            return 0
        seen.add(id(owner))
        return int(owner.nbytes)
    return 0


def _activation_nbytes(cache, x, eps):
    """Bytes kept for the backward pass: the stacked buffers plus T times one
    glimpse's cache (every glimpse caches arrays of the same shapes). The inputs
    x and eps are not counted."""
    steps, stacked, bce_cache, first_window_cache = cache
    seen = {id(x), id(eps if eps.base is None else eps.base)}
    per_step = _cache_nbytes(steps[0], seen | {id(v) for v in stacked.values()})
    return (_cache_nbytes(stacked, seen) + len(steps) * per_step
            + _cache_nbytes((bce_cache, first_window_cache), seen))


# ---------------------------------------------------------------- public API

def loss_and_grads(params, cfg, x, eps):
    """Loss and gradients of a batch.

    params: dict from init_params (NumPy or CuPy arrays, float32 or float64)
    x: (B, D) in [0, 1]   eps: (T, B, Z) standard normal noise for eq 6
    -> (loss: float, grads: dict like params, stats: dict) where stats holds
       "loss", "recon" (float, batch mean of L^x), "kl" ((T,) NumPy, batch mean
       KL of each glimpse), "kl_total" (float) and "activation_bytes".
    """
    x, eps, _, _ = _check_inputs(params, cfg, x, eps)
    return _loss_and_grads(params, cfg, x, eps)


def _loss_and_grads(params, cfg, x, eps):
    """loss_and_grads on inputs already checked (the data-parallel workers' entry)."""
    loss_per_example, terms, cache = forward(params, cfg, x, eps)
    grads = backward(params, cfg, cache)
    loss, recon, kl = _batch_means(loss_per_example, terms)
    stats = {"loss": loss, "recon": recon, "kl": kl, "kl_total": float(kl.sum()),
             "activation_bytes": _activation_nbytes(cache, x, eps)}
    return loss, grads, stats


def _batch_means(loss_per_example, terms):
    """-> (loss, recon) floats and kl (T,) NumPy: batch means, in one transfer from a GPU."""
    xp = get_array_module(loss_per_example)
    means = to_numpy(xp.concatenate([loss_per_example.mean()[None], terms["recon"].mean()[None],
                                     terms["kl"].mean(axis=1)]))
    return float(means[0]), float(means[1]), means[2:]


def loss_only(params, cfg, x, eps, return_terms=False):
    """Forward only, for evaluation.

    -> (loss_per_example (B,) array on the params' device, stats) where stats
       holds "recon" and "kl" as in loss_and_grads and, with return_terms,
       "recon_per_example" (B,) and "log_weight" (B,) (see forward).
    """
    x, eps, _, _ = _check_inputs(params, cfg, x, eps)
    return _loss_only(params, cfg, x, eps, return_terms)


def _loss_only(params, cfg, x, eps, return_terms=False):
    """loss_only on inputs already checked (the data-parallel workers' entry)."""
    loss_per_example, terms, _ = forward(params, cfg, x, eps, need_terms=return_terms,
                                         need_cache=False)
    loss, recon, kl = _batch_means(loss_per_example, terms)
    stats = {"recon": recon, "kl": kl, "kl_total": float(kl.sum()), "loss": loss}
    if return_terms:
        stats["recon_per_example"] = terms["recon"]
        stats["log_weight"] = terms["log_weight"]
    return loss_per_example, stats


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
    T, B = cfg.T, eps.shape[1]
    canvases = xp.empty((T, B, cfg.D), dtype)
    windows = None
    if cfg.attention:
        windows = {k: xp.empty((T, B), dtype) for k in ("cx", "cy", "stride", "sigma", "gamma")}
        windows["N"] = cfg.write_n
    state = initial_state(params, B)
    canvas, h_dec, c_dec = state["canvas"], state["h_dec"], state["c_dec"]
    for t in range(T):
        h_dec, c_dec, w, write_cache = _decoder_step(params, cfg, eps[t], h_dec, c_dec)  # eq 14
        canvas = canvas + w                                                      # eq 15
        canvases[t] = sigmoid(canvas)                                            # eq 16
        if windows is not None:
            gx, gy, sigma2, delta, gamma = att.window_values(write_cache[0]).T   # eq 22-24
            windows["cx"][t], windows["cy"][t], windows["stride"][t] = gx, gy, delta
            windows["sigma"][t], windows["gamma"][t] = xp.sqrt(sigma2), gamma
    return canvases, windows
