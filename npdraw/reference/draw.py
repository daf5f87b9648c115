"""DRAW, plainly: the reference model that the fast engine (npdraw.engine) is tested against.

Written to be read next to the paper, with no tuning and no layout tricks: every array is
(B, features), every linear map is layers.linear_forward/backward on a concatenated input,
and one glimpse is a CS231n-style pair, step_forward -> cache, step_backward(dout, cache).
The T-step loop keeps the caches and walks them in reverse, summing each step's gradients.

Dimension legend
    B  batch            T  glimpses            C, H, W  channels, height, width
    D  = C*H*W          A  one image axis (H or W)
    N  a window size (Nr read, Nw write)       K  image planes read or written at once
    R  read width: 2*C*Nr^2 with attention, 2*D without (cfg.read_dim)
    He, Hd  encoder and decoder LSTM sizes     Z  latent size

Paper: Gregor et al., "DRAW: A Recurrent Neural Network For Image Generation", ICML 2015.
Each equation number appears once, where it is implemented. Parameters and their shapes
are those of npdraw.model.param_shapes; inputs are as npdraw.loss_and_grads takes them,
and are not checked here.
"""
from __future__ import annotations

from ..backend import get_array_module, to_numpy
from ..layers import (bce_backward, bce_forward, latent_backward, latent_forward,
                      linear_backward, linear_forward, lstm_cell_backward, lstm_cell_forward,
                      peephole_lstm_cell_backward, peephole_lstm_cell_forward, sigmoid)

# ---------------------------------------------------------------- attention (section 3.2)

def window_params_forward(p, height, width, N):
    """Eq 22-24: p (B, 5) = (g~X, g~Y, log sigma^2, log delta~, log gamma), a linear map of
    h_dec -> ((gX, gY, sigma2, delta, gamma), each (B,)), cache.
    N = 1 divides the stride by max(N - 1, 1): one filter sits at g whatever delta is."""
    xp = get_array_module(p)
    gX = (width + 1) / 2 * (p[:, 0] + 1)
    gY = (height + 1) / 2 * (p[:, 1] + 1)
    sigma2 = xp.exp(p[:, 2])
    delta = (max(height, width) - 1) / max(N - 1, 1) * xp.exp(p[:, 3])
    gamma = xp.exp(p[:, 4])
    values = (gX, gY, sigma2, delta, gamma)
    return values, (values, height, width)


def window_params_backward(dvalues, cache):
    """dvalues: (dgX, dgY, dsigma2, ddelta, dgamma), each (B,) -> dp (B, 5)."""
    (_, _, sigma2, delta, gamma), height, width = cache
    dgX, dgY, dsigma2, ddelta, dgamma = dvalues
    xp = get_array_module(dgX)
    return xp.stack([(width + 1) / 2 * dgX, (height + 1) / 2 * dgY, dsigma2 * sigma2,
                     ddelta * delta, dgamma * gamma], axis=1)


def filterbank_forward(g, delta, sigma2, N, A):
    """One axis of a window: g, delta, sigma2 (B,) -> F (B, N, A), cache.

    Filter i is centred at mu_i = g + (i - N/2 - 0.5) delta (eq 19-20), and
    F[b, i, a] = exp(-(a - mu_i)^2 / (2 sigma^2)) / Z_i over pixels a = 1..A (eq 25-26),
    computed as a softmax over a (row maximum subtracted, so Z_i >= 1, never 0).
    """
    xp = get_array_module(g)
    offsets = xp.arange(1, N + 1, dtype=g.dtype) - (N / 2 + 0.5)        # (N,)
    pixels = xp.arange(1, A + 1, dtype=g.dtype)                          # (A,)
    mu = g[:, None] + offsets * delta[:, None]                           # (B, N)
    diff = pixels - mu[:, :, None]                                       # (B, N, A)
    logits = -diff * diff / (2 * sigma2[:, None, None])
    F = xp.exp(logits - logits.max(axis=2, keepdims=True))
    F = F / F.sum(axis=2, keepdims=True)
    return F, (F, diff, sigma2, offsets)


def filterbank_backward(dF, cache):
    """dF (B, N, A) -> (dg, ddelta, dsigma2), each (B,)."""
    F, diff, sigma2, offsets = cache
    dlogits = F * (dF - (dF * F).sum(axis=2, keepdims=True))            # softmax backward
    dmu = (dlogits * diff).sum(axis=2) / sigma2[:, None]                 # (B, N)
    dsigma2 = (dlogits * diff * diff).sum(axis=(1, 2)) / (2 * sigma2 * sigma2)
    return dmu.sum(axis=1), dmu @ offsets, dsigma2


def window_forward(p, height, width, N):
    """p (B, 5) -> (Fy (B, N, H), Fx (B, N, W), gamma (B,)), cache: both axes' filters."""
    (gX, gY, sigma2, delta, gamma), params_cache = window_params_forward(p, height, width, N)
    Fy, y_cache = filterbank_forward(gY, delta, sigma2, N, height)
    Fx, x_cache = filterbank_forward(gX, delta, sigma2, N, width)
    return (Fy, Fx, gamma), (params_cache, y_cache, x_cache)


def window_backward(dFy, dFx, dgamma, cache):
    """dFy (B, N, H), dFx (B, N, W), dgamma (B,) -> dp (B, 5)."""
    params_cache, y_cache, x_cache = cache
    dgY, ddelta_y, dsigma2_y = filterbank_backward(dFy, y_cache)
    dgX, ddelta_x, dsigma2_x = filterbank_backward(dFx, x_cache)
    return window_params_backward((dgX, dgY, dsigma2_x + dsigma2_y, ddelta_x + ddelta_y,
                                   dgamma), params_cache)


def window_values(cache):
    """(gX, gY, sigma2, delta, gamma), each (B,), from a window_forward cache."""
    return cache[0][0]


def read_forward(images, Fy, Fx, gamma):
    """Eq 27: the glimpse gamma * Fy img Fx^T of every plane.
    images (B, K, H, W)   Fy (B, N, H)   Fx (B, N, W)   gamma (B,) -> (B, K, N, N), cache"""
    unscaled = Fy[:, None] @ images @ Fx[:, None].transpose(0, 1, 3, 2)
    return gamma[:, None, None, None] * unscaled, (images, Fy, Fx, gamma, unscaled)


def read_backward(dglimpse, cache):
    """dglimpse (B, K, N, N) -> (dimages (B, K, H, W), dFy, dFx, dgamma)."""
    images, Fy, Fx, gamma, unscaled = cache
    dunscaled = gamma[:, None, None, None] * dglimpse
    dimages = Fy[:, None].transpose(0, 1, 3, 2) @ dunscaled @ Fx[:, None]
    dFy = (dunscaled @ Fx[:, None] @ images.transpose(0, 1, 3, 2)).sum(axis=1)
    dFx = (dunscaled.transpose(0, 1, 3, 2) @ Fy[:, None] @ images).sum(axis=1)
    dgamma = (dglimpse * unscaled).sum(axis=(1, 2, 3))
    return dimages, dFy, dFx, dgamma


def write_forward(patch, Fy, Fx, gamma):
    """Eq 29: the image Fy^T w Fx / gamma of every plane.
    patch (B, K, N, N)   Fy (B, N, H)   Fx (B, N, W)   gamma (B,) -> (B, K, H, W), cache"""
    image = Fy[:, None].transpose(0, 1, 3, 2) @ patch @ Fx[:, None] / gamma[:, None, None, None]
    return image, (patch, Fy, Fx, gamma, image)


def write_backward(dimage, cache):
    """dimage (B, K, H, W) -> (dpatch (B, K, N, N), dFy, dFx, dgamma)."""
    patch, Fy, Fx, gamma, image = cache
    dunscaled = dimage / gamma[:, None, None, None]
    dpatch = Fy[:, None] @ dunscaled @ Fx[:, None].transpose(0, 1, 3, 2)
    dFy = (patch @ Fx[:, None] @ dunscaled.transpose(0, 1, 3, 2)).sum(axis=1)
    dFx = (patch.transpose(0, 1, 3, 2) @ Fy[:, None] @ dunscaled).sum(axis=1)
    dgamma = -(dimage * image).sum(axis=(1, 2, 3)) / gamma
    return dpatch, dFy, dFx, dgamma


# ---------------------------------------------------------------- the read and write heads

def read_head_forward(params, cfg, x, x_hat, h_dec_prev):
    """Eq 4, r_t = read(x, x_hat_t, h_dec_{t-1}): [x, x_hat] without attention (eq 17), else
    the glimpses of both from the window that h_dec_{t-1} sets (eq 21).
    x, x_hat (B, D)   h_dec_prev (B, Hd) -> r (B, R), cache"""
    xp = get_array_module(x)
    if not cfg.attention:
        return xp.concatenate([x, x_hat], axis=1), (cfg, None)
    B, C, H, W = x.shape[0], cfg.channels, cfg.height, cfg.width
    p, linear_cache = linear_forward(h_dec_prev, params["read_att_W"], params["read_att_b"])
    (Fy, Fx, gamma), window_cache = window_forward(p, H, W, cfg.read_n)
    images = xp.concatenate([x.reshape(B, C, H, W), x_hat.reshape(B, C, H, W)], axis=1)
    glimpse, read_cache = read_forward(images, Fy, Fx, gamma)
    return glimpse.reshape(B, -1), (cfg, (linear_cache, window_cache, read_cache))


def read_head_backward(dr, cache):
    """dr (B, R) -> (dx_hat (B, D), dh_dec_prev (B, Hd) or None, grads)."""
    cfg, window_caches = cache
    if window_caches is None:
        return dr[:, cfg.D:], None, {}
    linear_cache, window_cache, read_cache = window_caches
    B, C, N = dr.shape[0], cfg.channels, cfg.read_n
    dimages, dFy, dFx, dgamma = read_backward(dr.reshape(B, 2 * C, N, N), read_cache)
    dp = window_backward(dFy, dFx, dgamma, window_cache)
    dh_dec_prev, dW, db = linear_backward(dp, linear_cache)
    return dimages[:, C:].reshape(B, -1), dh_dec_prev, {"read_att_W": dW, "read_att_b": db}


def write_head_forward(params, cfg, h_dec):
    """write(h_dec_t) (B, Hd) -> the canvas increment (B, D), cache: a linear map without
    attention (eq 18); with it, the patch w_t = W(h_dec_t) (eq 28) written through its window."""
    w, patch_cache = linear_forward(h_dec, params["write_W"], params["write_b"])
    if not cfg.attention:
        return w, (cfg, patch_cache, None)
    B, C, H, W, N = h_dec.shape[0], cfg.channels, cfg.height, cfg.width, cfg.write_n
    p, linear_cache = linear_forward(h_dec, params["write_att_W"], params["write_att_b"])
    (Fy, Fx, gamma), window_cache = window_forward(p, H, W, N)
    image, write_cache = write_forward(w.reshape(B, C, N, N), Fy, Fx, gamma)
    return image.reshape(B, -1), (cfg, patch_cache, (linear_cache, window_cache, write_cache))


def write_head_backward(dcanvas, cache):
    """dcanvas (B, D) -> (dh_dec (B, Hd), grads)."""
    cfg, patch_cache, window_caches = cache
    if window_caches is None:
        dh_dec, dW, db = linear_backward(dcanvas, patch_cache)
        return dh_dec, {"write_W": dW, "write_b": db}
    linear_cache, window_cache, write_cache = window_caches
    B, C, H, W = dcanvas.shape[0], cfg.channels, cfg.height, cfg.width
    dpatch, dFy, dFx, dgamma = write_backward(dcanvas.reshape(B, C, H, W), write_cache)
    dh_dec, dW, db = linear_backward(dpatch.reshape(B, -1), patch_cache)
    dp = window_backward(dFy, dFx, dgamma, window_cache)
    dh_dec_window, dW_att, db_att = linear_backward(dp, linear_cache)
    return dh_dec + dh_dec_window, {"write_W": dW, "write_b": db,
                                    "write_att_W": dW_att, "write_att_b": db_att}


# ---------------------------------------------------------------- one glimpse

def initial_state(params, B):
    """The state before glimpse 1: canvas c_0, the learned h_0's, zero LSTM cells (B, .)."""
    xp = get_array_module(params["c0"])

    def rows(v):
        return xp.broadcast_to(v, (B,) + v.shape).copy()
    h_enc, h_dec = rows(params["h_enc0"]), rows(params["h_dec0"])
    return {"canvas": rows(params["c0"]), "h_enc": h_enc, "c_enc": xp.zeros_like(h_enc),
            "h_dec": h_dec, "c_dec": xp.zeros_like(h_dec)}


def cell_forward(a, c_prev, peep):
    """The LSTM cell of eq 5 and 7: plain (peep None), or with peepholes (Graves 2013
    eq 7-11; peep (3H,) = [p_i, p_f, p_o]). a (B, 4H), c_prev (B, H) -> (h, c), cache"""
    if peep is None:
        return lstm_cell_forward(a, c_prev)
    return peephole_lstm_cell_forward(a, c_prev, peep)


def cell_backward(dh, dc, cache):
    """dh, dc (B, H) -> (da (B, 4H), dc_prev (B, H), dpeep (3H,) or None)."""
    if len(cache) == 3:                                  # the plain cell's cache
        return (*lstm_cell_backward(dh, dc, cache), None)
    return peephole_lstm_cell_backward(dh, dc, cache)


def decoder_forward(params, z, h_dec, c_dec):
    """Eq 7, h_dec_t = RNN_dec(h_dec_{t-1}, z_t): z (B, Z), h_dec, c_dec (B, Hd)
    -> (h_dec, c_dec), cache"""
    xp = get_array_module(z)
    a, linear_cache = linear_forward(xp.concatenate([z, h_dec], axis=1),
                                     params["dec_W"], params["dec_b"])
    (h_dec, c_dec), cell_cache = cell_forward(a, c_dec, params.get("dec_peep"))
    return (h_dec, c_dec), (linear_cache, cell_cache)


def step_forward(params, cfg, x, state, eps_t):
    """One glimpse of the inference network.

    x: (B, D) in [0, 1]   eps_t: (B, Z)   state: dict of (B, .) arrays from initial_state
    or step_forward -> (new state, kl_t (B,)), cache
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
    cache = (cfg, sig, read_cache, enc_linear, enc_cell, q_linear, latent_cache, decoder_cache,
             write_cache)
    return (new_state, kl), cache


def step_backward(dstate, dkl, cache):
    """dstate: gradients of the step's output state (dict as step_forward's), dkl: (B,) or
    a number -> (gradients of its input state, grads of the parameters it used)."""
    cfg, sig, read_cache, enc_linear, enc_cell, q_linear, latent_cache, decoder_cache, \
        write_cache = cache
    Z, Hd, R = cfg.z_dim, cfg.dec_dim, cfg.read_dim
    dcanvas = dstate["canvas"]
    dh_dec, grads = write_head_backward(dcanvas, write_cache)
    dec_linear, dec_cell = decoder_cache
    da_dec, dc_dec, dpeep_dec = cell_backward(dh_dec + dstate["h_dec"], dstate["c_dec"],
                                              dec_cell)
    ddec_in, grads["dec_W"], grads["dec_b"] = linear_backward(da_dec, dec_linear)
    dq = latent_backward(ddec_in[:, :Z], dkl, latent_cache)
    dh_enc, grads["q_W"], grads["q_b"] = linear_backward(dq, q_linear)
    da_enc, dc_enc, dpeep_enc = cell_backward(dh_enc + dstate["h_enc"], dstate["c_enc"],
                                              enc_cell)
    if dpeep_enc is not None:
        grads["enc_peep"], grads["dec_peep"] = dpeep_enc, dpeep_dec
    denc_in, grads["enc_W"], grads["enc_b"] = linear_backward(da_enc, enc_linear)
    dh_dec_prev = ddec_in[:, Z:] + denc_in[:, R:R + Hd]
    dx_hat, dh_dec_read, read_grads = read_head_backward(denc_in[:, :R], read_cache)
    grads.update(read_grads)
    if dh_dec_read is not None:
        dh_dec_prev = dh_dec_prev + dh_dec_read
    dstate_prev = {"canvas": dcanvas - dx_hat * sig * (1 - sig),     # through x_hat = x - sig
                   "h_enc": denc_in[:, R + Hd:], "c_enc": dc_enc,
                   "h_dec": dh_dec_prev, "c_dec": dc_dec}
    return dstate_prev, grads


# ---------------------------------------------------------------- T glimpses

def loss_and_grads(params, cfg, x, eps):
    """The batch-mean loss, its gradients and stats, glimpse by glimpse.

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
    grads["c0"] = dstate["canvas"].sum(axis=0)
    grads["h_enc0"] = dstate["h_enc"].sum(axis=0)
    grads["h_dec0"] = dstate["h_dec"].sum(axis=0)
    kl_means = to_numpy(kl.mean(axis=1))
    stats = {"loss": float(loss), "recon": float(recon.mean()), "kl": kl_means,
             "kl_total": float(kl_means.sum())}
    return float(loss), grads, stats


WINDOW_KEYS = ("cx", "cy", "sigma", "stride", "gamma")


def _append_window(rows, window_cache):
    """One glimpse's window (window_values of its cache) onto rows {key: [(B,) ...]}:
    the 1-based centre, sigma (the root of eq 21's sigma^2), the stride and gamma."""
    gX, gY, sigma2, delta, gamma = window_values(window_cache)
    xp = get_array_module(gX)
    for key, value in zip(WINDOW_KEYS, (gX, gY, xp.sqrt(sigma2), delta, gamma)):
        rows[key].append(value)


def generate(params, cfg, eps):
    """Eq 13-16: the decoder alone, with z_t = eps[t] drawn from the prior N(0, I).

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
        w, (_, _, window_caches) = write_head_forward(params, cfg, h_dec)
        canvas = canvas + w
        canvases.append(sigmoid(canvas))
        if cfg.attention:
            _append_window(window_rows, window_caches[1])
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
            read_cache, write_cache = cache[2], cache[8]
            _append_window(rows["read"], read_cache[1][1])
            _append_window(rows["write"], write_cache[2][1])
    windows = None
    if cfg.attention:
        windows = {which: {k: xp.stack(v) for k, v in r.items()} for which, r in rows.items()}
        windows["read"]["N"], windows["write"]["N"] = cfg.read_n, cfg.write_n
    return xp.stack(canvases), windows, xp.stack(kls)
