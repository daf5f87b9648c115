"""DRAW's parameters: the table of names and shapes, and their initialisation.

Dimension legend
    T  glimpses (cfg.T)
    D  = C*H*W, one image flattened channels-first (cfg.D)
    A  one image axis (H or W)
    Nr, Nw  read and write window sizes (cfg.read_n, cfg.write_n)
    R  read width: 2*C*Nr^2 with attention, 2*D without (cfg.read_dim)
    Pw  write width: C*Nw^2 with attention, D without (cfg.write_dim)
    He, Hd  encoder and decoder LSTM sizes (cfg.enc_dim, cfg.dec_dim); Hs either one
    Z  latent size (cfg.z_dim)

Parameters (name: shape, role; equation numbers are the paper's)
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
  with peepholes only (cfg.peepholes; zero at the start):
    enc_peep    (3He,)          encoder peepholes [p_i, p_f, p_o] (Graves 2013 eq 7-11)
    dec_peep    (3Hd,)          decoder peepholes [p_i, p_f, p_o]
  with attention only:
    read_att_W  (Hd, 5), read_att_b (5,)    read window (eq 21) from h_dec_{t-1}
    write_att_W (Hd, 5), write_att_b (5,)   write window from h_dec_t

Departures from the paper: h_enc0, h_dec0 and c0 are learned (the paper starts them at
zero; the training loop may set c0 = logit(mean image) before the first step), and the
attention biases start at a window that tiles the image (tiling_window_bias), not at
eq 24's neutral point.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import DrawConfig

WINDOW_PARAMS = 5   # a window's (g~X, g~Y, log sigma^2, log delta~, log gamma), eq 21


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
    if cfg.peepholes:  # [p_i, p_f, p_o] of each LSTM (Graves 2013 eq 7-11)
        shapes.update({"enc_peep": (3 * He,), "dec_peep": (3 * Hd,)})
    if cfg.attention:
        P = WINDOW_PARAMS
        shapes.update({"read_att_W": (Hd, P), "read_att_b": (P,),
                       "write_att_W": (Hd, P), "write_att_b": (P,)})
    return shapes


def tiling_window_bias(cfg, N):
    """The attention bias (5,) = (g~X, g~Y, log sigma^2, log delta~, log gamma) of a
    centred window of N filters a stride A/N apart (A = max(H, W)), sigma = A/(2N),
    gamma = 1: the window tiles the whole image. cfg: any config with height and width.

    With eq 24's own neutral point (delta~ = 1, sigma^2 = 1) a 2x2 read puts its two
    filters on the border pixels, with no overlap; on MNIST they then read only black,
    the encoder gets no signal and the posterior collapses to the prior (measured: KL
    stays 0 and the bound stalls at the mean image's ~206 nats, while the tiling start
    learns).
    """
    A = max(cfg.height, cfg.width)
    tile = A / N
    delta_tilde = tile * (N - 1) / (A - 1) if N > 1 and A > 1 else 1.0
    return np.array([0.0, 0.0, 2.0 * math.log(tile / 2.0), math.log(delta_tilde), 0.0])


def init_params(cfg: DrawConfig, seed: int = 0, dtype="float32") -> dict:
    """Fresh parameters {name: (...)} as NumPy arrays (move them with backend.to_device).

    LSTM weights ~ U(-1/sqrt(Hs), 1/sqrt(Hs)) as in common LSTM practice, forget
    gate bias 1 so that memory survives the early glimpses. The output layers
    (q, write, attention) start small (std 0.01), so at initialisation the
    posterior is close to the prior and the canvas stays near c0; the loss then
    starts at its analytic value (see tests/test_model.py). The attention biases
    start at tiling_window_bias.
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
            value = tiling_window_bias(cfg, cfg.read_n if name == "read_att_b" else cfg.write_n)
        elif name.endswith("_W"):
            value = 0.01 * rng.standard_normal(shape)
        else:
            value = np.zeros(shape)
        params[name] = value.astype(dtype)
    return params
