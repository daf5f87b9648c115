"""DRAW, plainly: the reference model that the fast engine (npdraw.engine) is tested against.

Written to be read next to the paper (Gregor et al., "DRAW: A Recurrent Neural Network
For Image Generation", ICML 2015), and without it: each equation is written out beside
its number, where it is implemented. No tuning and no layout tricks: every array is
(B, features), every linear map is layers.linear_forward/backward on a concatenated input,
and one glimpse is a CS231n-style pair, step_forward -> cache, step_backward(dout, cache).

Read top-down: loss_and_grads (the T-step loop), then one glimpse (step_forward,
step_backward), then the read and write heads; the attention they use (window, read,
write, filterbank) is npdraw.reference.attention, the parameter table and the
initialisation npdraw.reference.init. generate and reconstruct close the file.

Dimension legend
    B  batch
    T  glimpses (cfg.T)
    C, H, W  channels, image height, image width
    D  = C*H*W, one image flattened channels-first (cfg.D)
    Nr, Nw  read and write window sizes (cfg.read_n, cfg.write_n)
    R  read width: 2*C*Nr^2 with attention, 2*D without (cfg.read_dim)
    He, Hd  encoder and decoder LSTM sizes (cfg.enc_dim, cfg.dec_dim); Hs either one
    Z  latent size (cfg.z_dim)

Departures from the paper (see reference.init): h_enc_0, h_dec_0 and c_0 are learned
parameters (the paper starts at zero; training starts c_0 at logit(mean image)), the
cell states start at 0, and the attention biases start at a window tiling the image.
Inputs are as npdraw.loss_and_grads takes them, and are not checked here.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from ..backend import get_array_module, to_numpy
from ..layers import (bce_backward, bce_forward, latent_backward, latent_forward,
                      linear_backward, linear_forward, lstm_cell_backward, lstm_cell_forward,
                      peephole_lstm_cell_backward, peephole_lstm_cell_forward, sigmoid)
from .attention import (read_backward, read_forward, window_backward, window_forward,
                        window_values, write_backward, write_forward)

# ---------------------------------------------------------------- T glimpses

def loss_and_grads(params, cfg, x, eps):
    """The batch-mean loss, its gradients and stats, glimpse by glimpse.

        state = initial_state()                   # c_0, h_enc_0, h_dec_0; cells 0
        for t = 1..T:
            state, L^z_t = step(state, x, eps_t)  # eq 3-8, 10-11
        L^x = -log D(x | sigmoid(c_T))            # eq 9, Bernoulli
        L   = mean over the batch of L^x + sum_t L^z_t     # eq 12
        backward: the same steps in reverse (BPTT), each step's gradients summed

    x: (B, D) in [0, 1]   eps: (T, B, Z)
    -> (loss, grads like params, stats {"loss", "recon", "kl" (T,) NumPy, "kl_total"})
    """
    xp = get_array_module(x)
    B = x.shape[0]
    state = initial_state(params, B)
    kls, caches = [], []
    for t in range(cfg.T):
        (state, kl), cache = step_forward(params, cfg, x, state, eps[t])
        kls.append(kl)
        caches.append(cache)
    recon, bce_cache = bce_forward(state["canvas"], x)        # eq 9, L^x = -log D(x | c_T)
    kl = xp.stack(kls)                                        # (T, B)
    loss = (recon + kl.sum(axis=0)).mean()                    # eq 12, <L^x + L^z>
    # BPTT: the batch mean weighs each example by 1/B
    dstate = {k: xp.zeros_like(v) for k, v in state.items()}
    dstate["canvas"] = bce_backward(1.0 / B, bce_cache)
    grads = {k: xp.zeros_like(v) for k, v in params.items()}
    for cache in reversed(caches):
        dstate, step_grads = step_backward(dstate, 1.0 / B, cache)
        for k, g in step_grads.items():
            grads[k] += g
    # the initial state is the learned rows broadcast over the batch: sum the batch
    grads["c0"] = dstate["canvas"].sum(axis=0)
    grads["h_enc0"] = dstate["h_enc"].sum(axis=0)
    grads["h_dec0"] = dstate["h_dec"].sum(axis=0)
    kl_means = to_numpy(kl.mean(axis=1))
    stats = {"loss": float(loss), "recon": float(recon.mean()), "kl": kl_means,
             "kl_total": float(kl_means.sum())}
    return float(loss), grads, stats


def initial_state(params, B):
    """The state before glimpse 1: canvas c_0, the learned h_0's, zero LSTM cells, each
    (B, .): {"canvas": (B, D), "h_enc", "c_enc": (B, He), "h_dec", "c_dec": (B, Hd)}."""
    xp = get_array_module(params["c0"])

    def rows(v):
        return xp.broadcast_to(v, (B,) + v.shape).copy()
    h_enc, h_dec = rows(params["h_enc0"]), rows(params["h_dec0"])
    return {"canvas": rows(params["c0"]), "h_enc": h_enc, "c_enc": xp.zeros_like(h_enc),
            "h_dec": h_dec, "c_dec": xp.zeros_like(h_dec)}


# ---------------------------------------------------------------- one glimpse

class StepCache(NamedTuple):
    cfg: object
    sig: object            # sigmoid(c_{t-1}) (B, D), for eq 3's backward
    read: "ReadHeadCache"
    enc_linear: tuple      # the encoder's input map
    enc_cell: "CellCache"
    q_linear: tuple        # eq 1-2
    latent: tuple          # eq 6, 10-11
    decoder: "DecoderCache"
    write: "WriteHeadCache"


def step_forward(params, cfg, x, state, eps_t):
    """One glimpse of the inference network:

        x_hat_t  = x - sigmoid(c_{t-1})                                      (eq 3)
        r_t      = read(x, x_hat_t, h_dec_{t-1})                             (eq 4)
        h_enc_t  = LSTM_enc([r_t, h_dec_{t-1}], h_enc_{t-1})                 (eq 5)
        [mu_t | log sigma_t] = h_enc_t q_W + q_b                             (eq 1-2)
        z_t      = mu_t + sigma_t eps_t                                      (eq 6)
        L^z_t    = sum_j 0.5 (mu^2 + sigma^2 - 1) - log sigma                (eq 10-11)
        h_dec_t  = LSTM_dec(z_t, h_dec_{t-1})                                (eq 7)
        c_t      = c_{t-1} + write(h_dec_t)                                  (eq 8)

    x: (B, D) in [0, 1]   eps_t: (B, Z)   state: dict of (B, .) arrays from initial_state
    or step_forward -> (new state, kl_t (B,)), StepCache
    """
    xp = get_array_module(x)
    sig = sigmoid(state["canvas"])
    x_hat = x - sig                                                       # eq 3
    r, read_cache = read_head_forward(params, cfg, x, x_hat, state["h_dec"])
    a_enc, enc_linear = linear_forward(xp.concatenate([r, state["h_dec"], state["h_enc"]], axis=1),
                                       params["enc_W"], params["enc_b"])
    (h_enc, c_enc), enc_cell = cell_forward(a_enc, state["c_enc"],      # eq 5
                                            params.get("enc_peep"))
    q, q_linear = linear_forward(h_enc, params["q_W"], params["q_b"])    # eq 1-2: [mu | log sigma]
    (z, kl), latent_cache = latent_forward(q, eps_t)      # eq 6, z = mu + sigma eps; eq 10-11, KL
    (h_dec, c_dec), decoder_cache = decoder_forward(params, z, state["h_dec"], state["c_dec"])
    w, write_cache = write_head_forward(params, cfg, h_dec)
    new_state = {"canvas": state["canvas"] + w,                           # eq 8
                 "h_enc": h_enc, "c_enc": c_enc, "h_dec": h_dec, "c_dec": c_dec}
    cache = StepCache(cfg, sig, read_cache, enc_linear, enc_cell, q_linear, latent_cache,
                      decoder_cache, write_cache)
    return (new_state, kl), cache


def step_backward(dstate, dkl, cache):
    """dstate: gradients of the step's output state (dict as step_forward's), dkl: (B,) or
    a number -> (gradients of its input state, grads of the parameters it used).

    The forward's order reversed: write, decoder, latent, q, encoder, read. h_dec_{t-1}
    fed the encoder, the decoder and (with attention) the read window, so its gradient
    is the sum of the three; c_{t-1} gets dc_t (eq 8) and, through x_hat = x - sigmoid(c),
    -dx_hat sigmoid'(c_{t-1}), sigmoid' = s (1 - s).
    """
    cfg = cache.cfg
    Z, Hd, R = cfg.z_dim, cfg.dec_dim, cfg.read_dim
    dcanvas = dstate["canvas"]
    dh_dec, grads = write_head_backward(dcanvas, cache.write)
    da_dec, dc_dec, dpeep_dec = cell_backward(dh_dec + dstate["h_dec"], dstate["c_dec"],
                                              cache.decoder.cell)
    ddec_in, grads["dec_W"], grads["dec_b"] = linear_backward(da_dec, cache.decoder.linear)
    dq = latent_backward(ddec_in[:, :Z], dkl, cache.latent)
    dh_enc, grads["q_W"], grads["q_b"] = linear_backward(dq, cache.q_linear)
    da_enc, dc_enc, dpeep_enc = cell_backward(dh_enc + dstate["h_enc"], dstate["c_enc"],
                                              cache.enc_cell)
    if dpeep_enc is not None:
        grads["enc_peep"], grads["dec_peep"] = dpeep_enc, dpeep_dec
    denc_in, grads["enc_W"], grads["enc_b"] = linear_backward(da_enc, cache.enc_linear)
    dh_dec_prev = ddec_in[:, Z:] + denc_in[:, R:R + Hd]
    dx_hat, dh_dec_read, read_grads = read_head_backward(denc_in[:, :R], cache.read)
    grads.update(read_grads)
    if dh_dec_read is not None:
        dh_dec_prev = dh_dec_prev + dh_dec_read
    sig = cache.sig
    dstate_prev = {"canvas": dcanvas - dx_hat * sig * (1 - sig),     # through x_hat = x - sig
                   "h_enc": denc_in[:, R + Hd:], "c_enc": dc_enc,
                   "h_dec": dh_dec_prev, "c_dec": dc_dec}
    return dstate_prev, grads


class CellCache(NamedTuple):
    peephole: bool
    layer: tuple           # the cache of layers.lstm_cell_forward or its peephole variant


def cell_forward(a, c_prev, peep):
    """The LSTM cell of eq 5 and 7, gates [i, f, o, g]:

        i, f, o = sigmoid(a_i, a_f, a_o),  g = tanh(a_g),  c = f c_prev + i g,  h = o tanh(c)

    plain (peep None), or with peepholes (Graves 2013 eq 7-11; peep (3Hs,) = [p_i, p_f, p_o]
    add p_i c_prev, p_f c_prev and p_o c to the gates' pre-activations).
    a (B, 4Hs), c_prev (B, Hs) -> (h, c), CellCache"""
    if peep is None:
        out, cache = lstm_cell_forward(a, c_prev)
    else:
        out, cache = peephole_lstm_cell_forward(a, c_prev, peep)
    return out, CellCache(peep is not None, cache)


def cell_backward(dh, dc, cache):
    """dh, dc (B, Hs) -> (da (B, 4Hs), dc_prev (B, Hs), dpeep (3Hs,) or None)."""
    if not cache.peephole:
        return (*lstm_cell_backward(dh, dc, cache.layer), None)
    return peephole_lstm_cell_backward(dh, dc, cache.layer)


class DecoderCache(NamedTuple):
    linear: tuple
    cell: CellCache


def decoder_forward(params, z, h_dec, c_dec):
    """Eq 7, h_dec_t = LSTM_dec(z_t, h_dec_{t-1}): the gates from [z_t, h_dec_{t-1}] dec_W
    + dec_b. z (B, Z), h_dec, c_dec (B, Hd) -> (h_dec, c_dec), DecoderCache"""
    xp = get_array_module(z)
    a, linear_cache = linear_forward(xp.concatenate([z, h_dec], axis=1),
                                     params["dec_W"], params["dec_b"])
    (h_dec, c_dec), cell_cache = cell_forward(a, c_dec, params.get("dec_peep"))
    return (h_dec, c_dec), DecoderCache(linear_cache, cell_cache)


# ---------------------------------------------------------------- the read and write heads

class ReadHeadCache(NamedTuple):
    cfg: object
    linear: Optional[tuple]      # the window's linear map (eq 21); None without attention
    window: Optional[tuple]      # attention.WindowCache
    read: Optional[tuple]        # attention.read_forward's cache


def read_head_forward(params, cfg, x, x_hat, h_dec_prev):
    """Eq 4, r_t = read(x, x_hat_t, h_dec_{t-1}).

    Without attention (eq 17): r_t = [x, x_hat_t]. With it: the window
    p = h_dec_{t-1} read_att_W + read_att_b (eq 21) sets the filterbanks (eq 19-26), and
    r_t = [gamma Fy x Fx^T, gamma Fy x_hat Fx^T], an Nr x Nr glimpse of each plane (eq 27).
    x, x_hat (B, D)   h_dec_prev (B, Hd) -> r (B, R), ReadHeadCache
    """
    xp = get_array_module(x)
    if not cfg.attention:
        return xp.concatenate([x, x_hat], axis=1), ReadHeadCache(cfg, None, None, None)
    B, C, H, W = x.shape[0], cfg.channels, cfg.height, cfg.width
    p, linear_cache = linear_forward(h_dec_prev, params["read_att_W"], params["read_att_b"])
    (Fy, Fx, gamma), window_cache = window_forward(p, H, W, cfg.read_n)
    images = xp.concatenate([x.reshape(B, C, H, W), x_hat.reshape(B, C, H, W)], axis=1)
    glimpse, read_cache = read_forward(images, Fy, Fx, gamma)
    return glimpse.reshape(B, -1), ReadHeadCache(cfg, linear_cache, window_cache, read_cache)


def read_head_backward(dr, cache):
    """dr (B, R) -> (dx_hat (B, D), dh_dec_prev (B, Hd) or None, grads).
    x is data: only the x_hat half of r_t passes a gradient on."""
    cfg = cache.cfg
    if cache.window is None:
        return dr[:, cfg.D:], None, {}
    B, C, N = dr.shape[0], cfg.channels, cfg.read_n
    dimages, dFy, dFx, dgamma = read_backward(dr.reshape(B, 2 * C, N, N), cache.read)
    dp = window_backward(dFy, dFx, dgamma, cache.window)
    dh_dec_prev, dW, db = linear_backward(dp, cache.linear)
    return dimages[:, C:].reshape(B, -1), dh_dec_prev, {"read_att_W": dW, "read_att_b": db}


class WriteHeadCache(NamedTuple):
    cfg: object
    patch: tuple                 # the linear map to w_t (eq 28) or to the delta (eq 18)
    linear: Optional[tuple]      # the window's linear map; None without attention
    window: Optional[tuple]      # attention.WindowCache
    write: Optional[tuple]       # attention.write_forward's cache


def write_head_forward(params, cfg, h_dec):
    """write(h_dec_t), the canvas increment of eq 8.

    Without attention (eq 18): h_dec_t write_W + write_b. With it: the patch
    w_t = h_dec_t write_W + write_b, Nw x Nw per plane (eq 28), put back through the
    window p = h_dec_t write_att_W + write_att_b as (1 / gamma) Fy^T w_t Fx (eq 29).
    h_dec (B, Hd) -> (B, D), WriteHeadCache
    """
    w, patch_cache = linear_forward(h_dec, params["write_W"], params["write_b"])
    if not cfg.attention:
        return w, WriteHeadCache(cfg, patch_cache, None, None, None)
    B, C, H, W, N = h_dec.shape[0], cfg.channels, cfg.height, cfg.width, cfg.write_n
    p, linear_cache = linear_forward(h_dec, params["write_att_W"], params["write_att_b"])
    (Fy, Fx, gamma), window_cache = window_forward(p, H, W, N)
    image, write_cache = write_forward(w.reshape(B, C, N, N), Fy, Fx, gamma)
    return image.reshape(B, -1), WriteHeadCache(cfg, patch_cache, linear_cache, window_cache,
                                                write_cache)


def write_head_backward(dcanvas, cache):
    """dcanvas (B, D) -> (dh_dec (B, Hd), grads).
    h_dec_t fed both the patch and the window: its gradient is the sum of both."""
    if cache.window is None:
        dh_dec, dW, db = linear_backward(dcanvas, cache.patch)
        return dh_dec, {"write_W": dW, "write_b": db}
    cfg = cache.cfg
    B, C, H, W = dcanvas.shape[0], cfg.channels, cfg.height, cfg.width
    dpatch, dFy, dFx, dgamma = write_backward(dcanvas.reshape(B, C, H, W), cache.write)
    dh_dec, dW, db = linear_backward(dpatch.reshape(B, -1), cache.patch)
    dp = window_backward(dFy, dFx, dgamma, cache.window)
    dh_dec_window, dW_att, db_att = linear_backward(dp, cache.linear)
    return dh_dec + dh_dec_window, {"write_W": dW, "write_b": db,
                                    "write_att_W": dW_att, "write_att_b": db_att}


# ---------------------------------------------------------------- the decoder alone, and pictures

WINDOW_KEYS = ("cx", "cy", "sigma", "stride", "gamma")


def _append_window(rows, window_cache):
    """One glimpse's window (window_values of its cache) onto rows {key: [(B,) ...]}:
    the 1-based centre, sigma (the root of eq 21's sigma^2), the stride and gamma."""
    gX, gY, sigma2, delta, gamma = window_values(window_cache)
    xp = get_array_module(gX)
    for key, value in zip(WINDOW_KEYS, (gX, gY, xp.sqrt(sigma2), delta, gamma)):
        rows[key].append(value)


def generate(params, cfg, eps):
    """Eq 13-16, the decoder alone: z_t = eps[t] drawn from the prior N(0, I),
    h_dec_t = LSTM_dec(z_t, h_dec_{t-1}), c_t = c_{t-1} + write(h_dec_t).

    eps: (T, B, Z) -> (canvases (T, B, D) = sigmoid(c_t) for t = 1..T, windows): windows is
    None without attention, else (T, B) arrays "cx", "cy" (1-based centre), "stride",
    "sigma", "gamma" of each write window, and "N" (the write size).
    """
    xp = get_array_module(eps)
    B = eps.shape[1]
    state = initial_state(params, B)
    canvas, h_dec, c_dec = state["canvas"], state["h_dec"], state["c_dec"]
    canvases = []
    window_rows = {k: [] for k in WINDOW_KEYS}
    for t in range(cfg.T):
        (h_dec, c_dec), _ = decoder_forward(params, eps[t], h_dec, c_dec)
        w, write_cache = write_head_forward(params, cfg, h_dec)
        canvas = canvas + w
        canvases.append(sigmoid(canvas))
        if cfg.attention:
            _append_window(window_rows, write_cache.window)
    windows = None
    if cfg.attention:
        windows = {key: xp.stack(rows) for key, rows in window_rows.items()}
        windows["N"] = cfg.write_n
    return xp.stack(canvases), windows


def reconstruct(params, cfg, x, eps):
    """The inference network glimpse by glimpse (step_forward), kept for pictures.

    x: (B, D) in [0, 1]   eps: (T, B, Z)
    -> (canvases (T, B, D) = sigmoid(c_t) for t = 1..T, windows, kl (T, B)): windows is
    None without attention, else {"read": ..., "write": ...}, each a dict of (T, B)
    arrays "cx", "cy" (1-based centre), "stride", "sigma", "gamma" and "N" (its size).
    """
    xp = get_array_module(x)
    state = initial_state(params, x.shape[0])
    canvases, kls = [], []
    rows = {"read": {k: [] for k in WINDOW_KEYS}, "write": {k: [] for k in WINDOW_KEYS}}
    for t in range(cfg.T):
        (state, kl), cache = step_forward(params, cfg, x, state, eps[t])
        canvases.append(sigmoid(state["canvas"]))
        kls.append(kl)
        if cfg.attention:
            _append_window(rows["read"], cache.read.window)
            _append_window(rows["write"], cache.write.window)
    windows = None
    if cfg.attention:
        windows = {which: {k: xp.stack(v) for k, v in r.items()} for which, r in rows.items()}
        windows["read"]["N"], windows["write"]["N"] = cfg.read_n, cfg.write_n
    return xp.stack(canvases), windows, xp.stack(kls)
