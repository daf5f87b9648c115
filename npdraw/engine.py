"""The fast engine: DRAW's T glimpses unrolled into preallocated buffers, and BPTT.

It computes what npdraw.reference computes glimpse by glimpse (the tests check loss, stats
and every gradient agree to 1e-12 in float64), laid out for speed: see "unrolled forward"
below, and docs/DESIGN.md for why each choice was made.

Dimension legend
    B  batch
    T  glimpses (cfg.T)
    C, H, W  channels, image height, image width (cfg.channels, cfg.height, cfg.width)
    D  C*H*W, one image flattened channels-first (cfg.D)
    Nr, Nw  read and write window sizes (cfg.read_n, cfg.write_n)
    R  read width: 2*C*Nr^2 with attention, 2*D without (cfg.read_dim)
    Rc  rows of r_t that are the same at every glimpse (x without attention, else none)
    Pw  write width: C*Nw^2 with attention, D without (cfg.write_dim)
    He, Hd  encoder and decoder LSTM sizes (cfg.enc_dim, cfg.dec_dim); Hs either one
    Z  latent size (cfg.z_dim)

Entry points take inputs that model.check_inputs has checked: loss_and_grads, loss_only
(npdraw.model's public functions call them), and the forward/backward pair they are
made of.
"""
from __future__ import annotations

import numpy as np

from . import engine_attention as att
from .backend import fuse, get_array_module, to_numpy
from .config import DrawConfig
from .engine_layers import (latent_backward, latent_forward, linear_forward, lstm_cell_backward,
                            lstm_cell_forward, numba_kernels, peephole_lstm_cell_backward,
                            peephole_lstm_cell_forward)
from .layers import bce_backward, bce_forward

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
    kernels = numba_kernels()
    if kernels is not None:        # the rest in one pass (npdraw/engine_numba.py)
        B = x.shape[0]
        kernels.glimpse_error(x.reshape(B, -1), sig_out.reshape(B, -1), x_hat_out.reshape(B, -1))
        return
    sig_out += 1.0
    sig_out *= 0.5
    np.subtract(x, sig_out, out=x_hat_out)


@fuse
def _glimpse_error_backward_kernel(dcanvas, dx_hat, sig):
    return dcanvas - dx_hat * sig * (1.0 - sig)


def _glimpse_error_backward(dcanvas, dx_hat, sig):
    """Add eq 3's path to dL/dc_{t-1}: dcanvas - dx_hat * sigmoid'(c_{t-1}), all (B, D).
    The Numba kernels write it over dcanvas, which the backward owns."""
    kernels = numba_kernels() if get_array_module(dcanvas) is np else None
    if kernels is not None:
        return kernels.glimpse_error_backward(dcanvas, dx_hat, sig)
    return _glimpse_error_backward_kernel(dcanvas, dx_hat, sig)


# ---------------------------------------------------------------- read and write

def _static_read_rows(cfg):
    """Rows of enc_W fed by a part of r_t that is the same at every glimpse: x itself
    without attention (eq 17), nothing with attention."""
    return 0 if cfg.attention else cfg.D


def _decoder_heads(params):
    """With attention, h_dec_t feeds three linear maps: the write patch w_t (eq 28), the
    write window (eq 21) and the read window of the next glimpse (eq 21, which reads with
    h_dec_{t-1}). The unrolled forward runs them as one GEMM with these columns:
    -> W (Hd, Pw + 10), b (Pw + 10,) = [write | write window | next read window]."""
    xp = get_array_module(params["write_W"])
    return (xp.concatenate([params["write_W"], params["write_att_W"], params["read_att_W"]],
                           axis=1),
            xp.concatenate([params["write_b"], params["write_att_b"], params["read_att_b"]]))


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
    Rc = _static_read_rows(cfg)
    R, Hd = cfg.read_dim - Rc, cfg.dec_dim
    W = params["enc_W"]
    return xp.concatenate([W[Rc + R:Rc + R + Hd], W[Rc:Rc + R], W[Rc + R + Hd:]])


def _transpose(a):
    """A contiguous copy of a.T, for a 2-D array.

    On NumPy copied 8 rows of `a` at a time. NumPy's own transposing copy walks down
    the columns of `a`, and with rows of 1024 float32 (4 KiB, the LSTMs' 4H) every
    read lands in the same cache set (docs/DESIGN.md, item 13, has the measurement).
    """
    xp = get_array_module(a)
    if xp is not np:
        return xp.ascontiguousarray(a.T)
    out = np.empty(a.shape[::-1], a.dtype)
    for start in range(0, a.shape[0], 8):
        out[:, start:start + 8] = a[start:start + 8].T
    return out


def _cell_forward(peep, a, c_prev, h_out):
    """Eq 5 or 7's elementwise half, features first, the activations written over a;
    with peepholes (peep (3Hs,), else None) Graves 2013 eq 7-11 in the same one kernel."""
    if peep is None:
        return lstm_cell_forward(a, c_prev, axis=0, gates_out=a, h_out=h_out)
    return peephole_lstm_cell_forward(a, c_prev, peep, axis=0, gates_out=a, h_out=h_out)


def _cell_backward(dh, dc, cache, out, slot, dpeep):
    """-> (da, written into out[:, slot] too, dc_prev); the peepholes' gradient, if any,
    is added into dpeep."""
    if dpeep is None:
        return lstm_cell_backward(dh, dc, cache, out=out, slot=slot)
    da, dc_prev, dpeep_step = peephole_lstm_cell_backward(dh, dc, cache, out=out, slot=slot)
    dpeep += dpeep_step
    return da, dc_prev


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
    the small batch as the GEMM's last dimension, a form OpenBLAS runs faster than the
    (B, features) one (docs/DESIGN.md, item 4). Images, canvas, read and write stay (B, .).
    """
    xp = get_array_module(x)
    dtype = params["c0"].dtype
    T, B, D, Z = cfg.T, x.shape[0], cfg.D, cfg.z_dim
    He, Hd = cfg.enc_dim, cfg.dec_dim
    Rc = _static_read_rows(cfg)
    rows = _InputRows(cfg)
    # Transposed weights with the bias as the column that meets the ones row, made
    # once per call, so that each glimpse's GEMM reads them contiguously.
    enc_W_T = _transpose(xp.concatenate([_encoder_weights(params, cfg),
                                         params["enc_b"][None]]))         # (4He, Hd+R+He+1)
    dec_W_T = _transpose(xp.concatenate([params["dec_b"][None], params["dec_W"]]))  # (4Hd, 1+Z+Hd)
    q_W_T = _transpose(xp.concatenate([params["q_W"], params["q_b"][None]]))        # (2Z, He+1)
    # the constant rows of r_t (x, without attention) are projected once, not T times
    enc_static = xp.ascontiguousarray((x @ params["enc_W"][:Rc]).T) if Rc else None  # (4He, B)
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
    enc_peep, dec_peep = params.get("enc_peep"), params.get("dec_peep")   # None: no peepholes
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
        if Rc:
            a_enc[t] += enc_static
        (_, c_enc), enc_cache = _cell_forward(enc_peep, a_enc[t], c_enc,        # eq 5
                                              next_slot[rows.h_enc])
        xp.matmul(q_W_T, next_slot[rows.posterior], out=q_all[t])              # eq 1-2
        # eq 6, and eq 10-11's KL per glimpse, while q_t is in the CPU caches
        (_, kl[t]), latent_cache = latent_forward(q_all[t], eps_T[t], axis=0, z_out=slot[rows.z])
        xp.matmul(dec_W_T, slot[rows.decoder], out=a_dec[t])
        (h_dec, c_dec), dec_cache = _cell_forward(dec_peep, a_dec[t], c_dec,    # eq 7
                                                  next_slot[rows.h_dec])
        if cfg.attention:
            heads = h_dec.T @ heads_W + heads_b                                  # eq 21, 28
            (write_window, read_window), window_cache = att.windows_forward(
                heads[:, Pw:], H, W, (cfg.write_n, cfg.read_n))                  # eq 19-26
            w, write_cache = att.write_forward(
                heads[:, :Pw].reshape(B, C, cfg.write_n, cfg.write_n), *write_window)  # eq 29
            w = w.reshape(B, D)
            write_cache = (window_cache, write_cache)
        else:
            w, write_cache = linear_forward(h_dec.T, params["write_W"], params["write_b"])  # eq 18
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
    Rc = _static_read_rows(cfg)
    R = cfg.read_dim - Rc
    rows = _InputRows(cfg)
    enc_W = _encoder_weights(params, cfg)       # rows [h_dec ; r ; h_enc], as in forward
    inv_B = 1.0 / B

    # stacked output gradients of the linear maps: features first for the LSTM and q
    # layers, (T, B, .) for the decoder's heads (write, and with attention both windows)
    da_enc = xp.empty((4 * He, T, B), dtype)
    da_dec = xp.empty((4 * Hd, T, B), dtype)
    dq_all = xp.empty((2 * Z, T, B), dtype)
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

    dcanvas = bce_backward(inv_B, bce_cache)             # d loss / d c_T
    dh_dec_next = xp.zeros((Hd, B), dtype)               # from step t+1's uses of h_dec_t
    dc_dec = xp.zeros((Hd, B), dtype)
    dh_enc_next = xp.zeros((He, B), dtype)
    dc_enc = xp.zeros((He, B), dtype)
    # the peepholes' gradients, summed over the glimpses (None: no peepholes)
    dpeep_enc = xp.zeros(3 * He, dtype) if cfg.peepholes else None
    dpeep_dec = xp.zeros(3 * Hd, dtype) if cfg.peepholes else None
    for t in reversed(range(T)):
        read_cache, enc_cache, latent_cache, dec_cache, write_cache = steps[t]
        # c_t = c_{t-1} + write(h_dec_t); with attention h_dec_t also set glimpse t+1's read
        if cfg.attention:
            window_cache, write_cache = write_cache
            dpatch, dFy, dFx, dgamma = att.write_backward(dcanvas.reshape(B, C, H, W),
                                                          write_cache)
            dheads[t, :, :Pw] = dpatch.reshape(B, Pw)
            dheads[t, :, Pw:] = att.windows_backward([(dFy, dFx, dgamma), dread_window],
                                                     window_cache)
        else:
            dheads[t] = dcanvas
        dh_dec = heads_W @ dheads[t].T + dh_dec_next
        # da into its slot of the stacked buffer (see lstm_cell_backward)
        da_dec_step, dc_dec = _cell_backward(dh_dec, dc_dec, dec_cache, da_dec, t, dpeep_dec)
        ddec_in = params["dec_W"] @ da_dec_step                          # [dz, dh_dec_{t-1}]
        dq_step = latent_backward(ddec_in[:Z], inv_B, latent_cache, out=dq_all, slot=t)
        dh_enc = params["q_W"] @ dq_step + dh_enc_next
        da_enc_step, dc_enc = _cell_backward(dh_enc, dc_enc, enc_cache, da_enc, t, dpeep_enc)
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

    def block(row_slice, first):         # rows of slots first..first+T-1 -> (rows, T*B), a view
        return inputs[row_slice, first:first + T].reshape(row_slice.stop - row_slice.start, -1)

    def features_first(buffer):          # (rows, T, B) -> (rows, T*B)
        return buffer.reshape(buffer.shape[0], -1)

    grads = {"c0": dcanvas.sum(axis=0), "h_dec0": dh_dec_next.sum(axis=1),
             "h_enc0": dh_enc_next.sum(axis=1)}
    if cfg.peepholes:
        grads["enc_peep"], grads["dec_peep"] = dpeep_enc, dpeep_dec
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
    if Rc:  # x fed the same rows at every glimpse: sum their output gradients first
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


# ---------------------------------------------------------------- entry points

def loss_and_grads(params, cfg, x, eps):
    """As model.loss_and_grads, on inputs that model.check_inputs has checked.

    x: (B, D)   eps: (T, B, Z), both of the params' dtype and device
    -> (loss, grads, stats with "activation_bytes", the bytes kept for backward)
    """
    loss_per_example, terms, cache = forward(params, cfg, x, eps)
    grads = backward(params, cfg, cache)
    loss, recon, kl = _batch_means(loss_per_example, terms)
    stats = {"loss": loss, "recon": recon, "kl": kl, "kl_total": float(kl.sum()),
             "activation_bytes": _activation_nbytes(cache, x, eps)}
    return loss, grads, stats


def loss_only(params, cfg, x, eps, return_terms=False):
    """As model.loss_only, on inputs that model.check_inputs has checked."""
    loss_per_example, terms, _ = forward(params, cfg, x, eps, need_terms=return_terms,
                                         need_cache=False)
    loss, recon, kl = _batch_means(loss_per_example, terms)
    stats = {"recon": recon, "kl": kl, "kl_total": float(kl.sum()), "loss": loss}
    if return_terms:
        stats["recon_per_example"] = terms["recon"]
        stats["log_weight"] = terms["log_weight"]
    return loss_per_example, stats


def _batch_means(loss_per_example, terms):
    """-> (loss, recon) floats and kl (T,) NumPy: batch means, in one transfer from a GPU."""
    xp = get_array_module(loss_per_example)
    means = to_numpy(xp.concatenate([loss_per_example.mean()[None], terms["recon"].mean()[None],
                                     terms["kl"].mean(axis=1)]))
    return float(means[0]), float(means[1]), means[2:]
