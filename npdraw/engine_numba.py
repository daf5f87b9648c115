"""Numba kernels for the engine's LSTM cells: the only module in npdraw that imports numba.

Optional (the `numba` extra) and off by default: env NPDRAW_KERNELS=numba, or
engine_layers.set_kernels("numba"), selects them (npdraw/engine_layers.py dispatches).
Each kernel fuses the in-place NumPy sequence of npdraw/engine_layers.py
(`_lstm_cell_numpy`, ...) into fewer passes over memory, writing into the same
preallocated arrays, so the cache (and everything downstream of it) holds what the NumPy
path's holds. The operations, their order and dtype are the NumPy path's and tanh is
NumPy's own, so the results are the NumPy path's to the bit (no fastmath: no FMA, no
reordering); the equations are npdraw/layers.py's (Graves 2013 eq 7-11 for the
peepholes). tests/test_engine_numba.py checks them against the NumPy path.

Dimension legend
    B  batch
    Hs  the hidden size of one LSTM (He or Hd)

Layout: features first (axis=0), the engine's: a, gates, da (4Hs, B) as blocks
[i, f, o, g] of Hs rows; c_prev, c, tanh_c, h, dh, dc (Hs, B); peepholes p_* (Hs,).
Any strides work; the loops vectorise where the arrays are C-contiguous, as the engine's
are but h (a view into its stacked buffer), which is only written.
`half` and `one` come typed as the arrays' dtype, so float32 stays float32
(a Python literal would promote every product to float64).
"""
from __future__ import annotations

import numba
import numpy as np

# Serial loops: parallel=True made the backward twice as slow on the 2-core machine
# (thread hand-off on a (256, 100) cell), and `train` runs one rank, one thread, a core.
_jit = numba.njit(cache=True, fastmath=False)


# tanh stays NumPy's: its ufunc is vectorised (SIMD), and a scalar tanh in a compiled
# loop costs some 40 times as much (measured: with it, a float32 cell's forward and
# backward took 13 times NumPy's). So a forward is NumPy's tanh over whole blocks, in place, with the rest of
# the chain fused around it; a backward has no tanh to take and is one pass.

@_jit
def _lstm_state(i_, f_, o_, g_, c_prev, c, half):
    """i, f, o hold tanh(a/2): finish the sigmoids in place; c = f c_prev + i g (eq 9's
    plain form)."""
    Hs, B = c_prev.shape
    for j in range(Hs):
        for b in range(B):
            i = i_[j, b] * half + half                 # sigmoid = (1 + tanh(a/2)) / 2
            f = f_[j, b] * half + half
            o_[j, b] = o_[j, b] * half + half
            i_[j, b], f_[j, b] = i, f
            c[j, b] = f * c_prev[j, b] + i * g_[j, b]


@_jit
def _lstm_backward(dh, dc, i_, f_, o_, g_, c_prev, tanh_c, da_i, da_f, da_o, da_g, dc_prev,
                   one):
    """-> da's blocks, dc_prev = dc_total f."""
    Hs, B = c_prev.shape
    for j in range(Hs):
        for b in range(B):
            i, f, o, g = i_[j, b], f_[j, b], o_[j, b], g_[j, b]
            t, dhj = tanh_c[j, b], dh[j, b]
            dc_total = (one - t * t) * o * dhj + dc[j, b]
            da_i[j, b] = dc_total * g * ((one - i) * i)                  # sigmoid' = s (1 - s)
            da_f[j, b] = dc_total * c_prev[j, b] * ((one - f) * f)
            da_o[j, b] = dhj * t * ((one - o) * o)
            da_g[j, b] = (one - g * g) * i * dc_total                    # tanh' = 1 - g^2
            dc_prev[j, b] = dc_total * f


@_jit
def _peephole_inputs(a_i, a_f, c_prev, p_i, p_f, i_, f_, half):
    """(a + p c_{t-1}) / 2 of the input and forget gates (eq 7-8), for their tanh."""
    Hs, B = c_prev.shape
    for j in range(Hs):
        for b in range(B):
            cp = c_prev[j, b]
            i_[j, b] = (a_i[j, b] + p_i[j] * cp) * half
            f_[j, b] = (a_f[j, b] + p_f[j] * cp) * half


@_jit
def _peephole_state(i_, f_, g_, a_o, o_, c_prev, p_o, c, half):
    """i, f hold tanh(.../2): finish their sigmoids; c = f c_{t-1} + i g (eq 9); o's
    (a_o + p_o c) / 2 (eq 10), for its tanh."""
    Hs, B = c_prev.shape
    for j in range(Hs):
        for b in range(B):
            i = i_[j, b] * half + half
            f = f_[j, b] * half + half
            i_[j, b], f_[j, b] = i, f
            cj = f * c_prev[j, b] + i * g_[j, b]
            c[j, b] = cj
            o_[j, b] = (a_o[j, b] + p_o[j] * cj) * half


@_jit
def _peephole_output(o_, tanh_c, h, half):
    """o holds tanh(.../2): finish its sigmoid; h = o tanh(c) (eq 11)."""
    Hs, B = tanh_c.shape
    for j in range(Hs):
        for b in range(B):
            o = o_[j, b] * half + half
            o_[j, b] = o
            h[j, b] = o * tanh_c[j, b]


@_jit
def _peephole_backward(dh, dc, i_, f_, o_, g_, c_prev, tanh_c, p_i, p_f, p_o,
                       da_i, da_f, da_o, da_g, dc_prev, one):
    """-> da's blocks, dc_prev (c_t fed o, c_{t-1} fed i and f)."""
    Hs, B = c_prev.shape
    for j in range(Hs):
        for b in range(B):
            i, f, o, g = i_[j, b], f_[j, b], o_[j, b], g_[j, b]
            t, dhj = tanh_c[j, b], dh[j, b]
            do = dhj * t * o * (one - o)
            dc_total = (one - t * t) * o * dhj + dc[j, b] + do * p_o[j]      # eq 10
            di = dc_total * g * i * (one - i)
            df = dc_total * c_prev[j, b] * f * (one - f)
            da_i[j, b], da_f[j, b], da_o[j, b] = di, df, do
            da_g[j, b] = (one - g * g) * i * dc_total
            dc_prev[j, b] = dc_total * f + di * p_i[j] + df * p_f[j]        # eq 7-8


# The callers: engine_layers' NumPy functions with axis=0, taking and returning the same.
# blocks(x): x's four row blocks [i, f, o, g]; peeps: [p_i, p_f, p_o], each (Hs,).

def lstm_cell(a, c_prev, gates, h_out, blocks):
    """As engine_layers._lstm_cell_numpy -> (gates, c, tanh(c), h)."""
    half = a.dtype.type(0.5)
    ifo, g = a[:3 * c_prev.shape[0]], a[3 * c_prev.shape[0]:]
    i, f, o, g_out = blocks(gates)
    ifo_out = gates[:3 * c_prev.shape[0]]
    np.multiply(ifo, half, out=ifo_out)
    np.tanh(ifo_out, out=ifo_out)
    np.tanh(g, out=g_out)
    c = np.empty_like(c_prev)
    _lstm_state(i, f, o, g_out, c_prev, c, half)
    tanh_c = np.tanh(c)
    return gates, c, tanh_c, np.multiply(o, tanh_c, out=h_out)


def lstm_cell_backward(dh, dc, gates, c_prev, tanh_c, out, blocks):
    """As engine_layers._lstm_cell_backward_numpy: da into out; -> dc_prev."""
    dc_prev = np.empty_like(c_prev)
    _lstm_backward(dh, dc, *blocks(gates), c_prev, tanh_c, *blocks(out), dc_prev,
                   out.dtype.type(1.0))
    return dc_prev


def peephole_lstm_cell(a, c_prev, peeps, gates, h_out, blocks):
    """As engine_layers._peephole_lstm_cell_numpy -> (gates, c, tanh(c), h)."""
    half = a.dtype.type(0.5)
    p_i, p_f, p_o = peeps
    a_i, a_f, a_o, a_g = blocks(a)
    i, f, o, g = blocks(gates)
    _peephole_inputs(a_i, a_f, c_prev, p_i, p_f, i, f, half)
    i_f = gates[:2 * c_prev.shape[0]]                  # i and f: one block, features first
    np.tanh(i_f, out=i_f)
    np.tanh(a_g, out=g)
    c = np.empty_like(c_prev)
    _peephole_state(i, f, g, a_o, o, c_prev, p_o, c, half)
    np.tanh(o, out=o)
    tanh_c = np.tanh(c)
    h = np.empty_like(c_prev) if h_out is None else h_out
    _peephole_output(o, tanh_c, h, half)
    return gates, c, tanh_c, h


def peephole_lstm_cell_backward(dh, dc, gates, c_prev, tanh_c, peeps, out, blocks):
    """As engine_layers._peephole_lstm_cell_backward_numpy, gates its tuple of blocks:
    da into out; -> dc_prev."""
    dc_prev = np.empty_like(c_prev)
    _peephole_backward(dh, dc, *gates, c_prev, tanh_c, *peeps, *blocks(out), dc_prev,
                       out.dtype.type(1.0))
    return dc_prev
