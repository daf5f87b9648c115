"""Numba kernels for the engine's elementwise chains: the only module in npdraw that imports numba.

Optional (the `numba` extra) and off by default: env NPDRAW_KERNELS=numba, or
engine_layers.set_kernels("numba"), selects them (npdraw/engine_layers.py dispatches the
LSTM cells; npdraw/engine_attention.py the filters' rows, eq 25-26; npdraw/engine.py
eq 3's glimpse error, through engine_layers.numba_kernels()).
Each kernel fuses an in-place NumPy sequence (`_lstm_cell_numpy`, ...) into fewer passes
over memory, writing into the same preallocated arrays, so the cache (and everything
downstream of it) holds what the NumPy path's holds. For the LSTM cells and eq 3 the
operations, their order and dtype are the NumPy path's and tanh is NumPy's own, so the
results are the NumPy path's to the bit (no fastmath: no FMA, no reordering); the
equations are npdraw/layers.py's (Graves 2013 eq 7-11 for the peepholes). The filters'
row sums run in another order than NumPy's (BLAS), so there the results differ by
rounding. tests/test_engine_numba.py checks every kernel against the NumPy path.

Dimension legend
    B  batch
    Hs  the hidden size of one LSTM (He or Hd)
    M  filter rows handled together, A one image axis (as in npdraw/engine_attention.py)
    D  C*H*W, one image flattened

Layout: features first (axis=0), the engine's: a, gates (4Hs, B) and da (4Hs, B), or
its slot of the stacked (4Hs, T, B) buffer, as blocks [i, f, o, g] of Hs rows; c_prev, c, tanh_c, h, dh, dc (Hs, B); peepholes p_* (Hs,).
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
def _lstm_backward(dh, dc, i_, f_, o_, g_, c_prev, tanh_c, da_i, da_f, da_o, da_g, slot,
                   dc_prev, one):
    """-> da's blocks at [:, slot] (each (Hs, S, B), C-contiguous: the engine's stacked
    buffer, or one array with S = 1), dc_prev = dc_total f."""
    Hs, B = c_prev.shape
    for j in range(Hs):
        for b in range(B):
            i, f, o, g = i_[j, b], f_[j, b], o_[j, b], g_[j, b]
            t, dhj = tanh_c[j, b], dh[j, b]
            dc_total = (one - t * t) * o * dhj + dc[j, b]
            da_i[j, slot, b] = dc_total * g * ((one - i) * i)            # sigmoid' = s (1 - s)
            da_f[j, slot, b] = dc_total * c_prev[j, b] * ((one - f) * f)
            da_o[j, slot, b] = dhj * t * ((one - o) * o)
            da_g[j, slot, b] = (one - g * g) * i * dc_total              # tanh' = 1 - g^2
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
                       da_i, da_f, da_o, da_g, slot, dc_prev, one):
    """-> da's blocks at [:, slot], as _lstm_backward's, dc_prev (c_t fed o, c_{t-1}
    fed i and f)."""
    Hs, B = c_prev.shape
    for j in range(Hs):
        for b in range(B):
            i, f, o, g = i_[j, b], f_[j, b], o_[j, b], g_[j, b]
            t, dhj = tanh_c[j, b], dh[j, b]
            do = dhj * t * o * (one - o)
            dc_total = (one - t * t) * o * dhj + dc[j, b] + do * p_o[j]      # eq 10
            di = dc_total * g * i * (one - i)
            df = dc_total * c_prev[j, b] * f * (one - f)
            da_i[j, slot, b], da_f[j, slot, b], da_o[j, slot, b] = di, df, do
            da_g[j, slot, b] = (one - g * g) * i * dc_total
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


def _slot_of(out, slot):
    """out (rows, B) and slot None, or out (rows, S, B) and a slot -> ((rows, S, B), the
    slot): a backward (da of an LSTM, dq of the latent) is written at [:, slot], with unit
    strides where out is C-contiguous, where NumPy would copy a (rows, B) result into the
    strided out[:, slot]."""
    return (out[:, None], 0) if slot is None else (out, slot)


def lstm_cell_backward(dh, dc, gates, c_prev, tanh_c, out, blocks, slot=None):
    """As engine_layers._lstm_cell_backward_numpy: da into out, or into out[:, slot]
    (see _slot_of); -> dc_prev."""
    dc_prev = np.empty_like(c_prev)
    out, slot = _slot_of(out, slot)
    _lstm_backward(dh, dc, *blocks(gates), c_prev, tanh_c, *blocks(out), slot, dc_prev,
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


def peephole_lstm_cell_backward(dh, dc, gates, c_prev, tanh_c, peeps, out, blocks,
                                slot=None):
    """As engine_layers._peephole_lstm_cell_backward_numpy, gates its tuple of blocks:
    da into out, or into out[:, slot] (see _slot_of); -> dc_prev."""
    dc_prev = np.empty_like(c_prev)
    out, slot = _slot_of(out, slot)
    _peephole_backward(dh, dc, *gates, c_prev, tanh_c, *peeps, *blocks(out), slot, dc_prev,
                       out.dtype.type(1.0))
    return dc_prev


# ---------------------------------------------------------------- attention (eq 25-26)
# npdraw/engine_attention.py's _gaussian_rows and its backward, in three passes over the
# (B, M, A) filters where NumPy takes about ten: the logits in one kernel, NumPy's SIMD exp
# in place, the row sums and the normalisation in another. The row sums run in a loop, in
# order, where NumPy's run in BLAS, so results differ from the NumPy path's by rounding
# (tests/test_engine_numba.py bounds it). Shapes: mu, twice_gap, index (B, M);
# neg_inv_two_var (B, 1) or (B, M); steps the (A + 1, A) table u = a - index.

@_jit
def _gaussian_logits(mu, neg_inv_two_var, steps, F, twice_gap, index, one, two, A):
    """F <- -u (u + 2d) / (2 sigma^2) around the nearest pixel a* (see _gaussian_rows);
    twice_gap <- 2d = 2 (a* - mu); index <- a*. A NaN centre takes a* = 1, as fmax does."""
    B, M = mu.shape
    per_row = neg_inv_two_var.shape[1] > 1
    for b in range(B):
        for m in range(M):
            nearest = np.rint(mu[b, m])
            if not nearest >= one:                  # below 1, or NaN
                nearest = one
            if nearest > A:
                nearest = A
            gap = two * (nearest - mu[b, m])
            k = int(nearest)
            twice_gap[b, m], index[b, m] = gap, k
            scale = neg_inv_two_var[b, m if per_row else 0]
            for a in range(F.shape[2]):
                u = steps[k, a]
                F[b, m, a] = scale * u * (u + gap)


@_jit
def _normalise_rows(F, one):
    """Each row of F (B, M, A) divided by its sum (eq 25-26's normalisers Z)."""
    B, M, A = F.shape
    for b in range(B):
        for m in range(M):
            total = one - one
            for a in range(A):
                total += F[b, m, a]
            inv = one / total
            for a in range(A):
                F[b, m, a] *= inv


@_jit
def _gaussian_sums_backward(dF, F, index, twice_gap, steps, first, second, zero):
    """Per row, with the softmax backward dl = F (dF - s), s = sum_a F dF:
    first <- S1 = sum_a dl u, second <- S2 + 2d S1 with S2 = sum_a dl u^2."""
    B, M, A = F.shape
    for b in range(B):
        for m in range(M):
            s = zero
            for a in range(A):
                s += dF[b, m, a] * F[b, m, a]
            s1, s2 = zero, zero
            k = index[b, m]
            for a in range(A):
                u = steps[k, a]
                dl_u = (dF[b, m, a] - s) * F[b, m, a] * u
                s1 += dl_u
                s2 += dl_u * u
            first[b, m] = s1
            second[b, m] = s2 + twice_gap[b, m] * s1


def gaussian_rows(mu, neg_inv_two_var, steps, A):
    """As engine_attention._gaussian_rows' body -> (F (B, M, A), index, twice_gap)."""
    B, M = mu.shape
    F = np.empty((B, M, A), mu.dtype)
    twice_gap = np.empty_like(mu)
    index = np.empty((B, M), np.intp)
    dt = mu.dtype.type
    _gaussian_logits(mu, neg_inv_two_var, steps, F, twice_gap, index, dt(1), dt(2), dt(A))
    np.exp(F, out=F)
    _normalise_rows(F, dt(1))
    return F, index, twice_gap


def gaussian_sums_backward(dF, F, index, twice_gap, steps):
    """-> (S1, S2 + 2d S1), each (B, M), as engine_attention._gaussian_rows_backward has them."""
    first = np.empty(F.shape[:2], F.dtype)
    second = np.empty_like(first)
    _gaussian_sums_backward(dF, F, index, twice_gap, steps, first, second, F.dtype.type(0))
    return first, second


# ---------------------------------------------------------------- eq 3
# npdraw/engine.py's glimpse error on (B, D) views: NumPy's SIMD tanh first, then one
# pass; the operations and their order are the NumPy path's, so the results are its own.

@_jit
def _sigmoid_and_error(x, sig, x_hat, half, one):
    """sig holds tanh(c/2): sig <- (sig + 1) / 2 = sigmoid(c); x_hat <- x - sig."""
    B, D = sig.shape
    for b in range(B):
        for d in range(D):
            s = (sig[b, d] + one) * half
            sig[b, d] = s
            x_hat[b, d] = x[b, d] - s


@_jit
def _error_backward(dcanvas, dx_hat, sig, one):
    """dcanvas <- dcanvas - dx_hat sig (1 - sig), in place."""
    B, D = sig.shape
    for b in range(B):
        for d in range(D):
            s = sig[b, d]
            dcanvas[b, d] = dcanvas[b, d] - dx_hat[b, d] * s * (one - s)


def glimpse_error(x, sig, x_hat):
    """x (B, D); sig (B, D) holding tanh(c/2) -> sigmoid(c) in place, x_hat (B, D) <- x - sig."""
    dt = sig.dtype.type
    _sigmoid_and_error(x, sig, x_hat, dt(0.5), dt(1))


def glimpse_error_backward(dcanvas, dx_hat, sig):
    """dcanvas (B, D) <- dcanvas - dx_hat * sig * (1 - sig), in place; -> dcanvas."""
    _error_backward(dcanvas, dx_hat, sig, sig.dtype.type(1))
    return dcanvas


# ---------------------------------------------------------------- the latent (eq 6, 10-11)
# npdraw/engine_layers.py's latent_forward and latent_backward, features first: NumPy's
# SIMD exp for sigma and sigma^2, the rest in one pass each way, in the NumPy path's order
# (its KL sum over the Z rows runs row after row, as this loop does), so the results are
# its own. Shapes: mu, log_sigma, eps, noise, var, z (Z, B); kl (B,); dq (2Z, S, B).

@_jit
def _latent_rest(mu, log_sigma, eps, noise, var, z, kl, half, minus_half_z):
    """noise <- sigma eps, z <- mu + noise; kl <- sum_j 0.5 (mu^2 + sigma^2) - log sigma
    - Z/2."""
    Z, B = mu.shape
    for b in range(B):
        kl[b] = minus_half_z - minus_half_z
    for j in range(Z):
        for b in range(B):
            n = noise[j, b] * eps[j, b]
            noise[j, b] = n
            z[j, b] = mu[j, b] + n
            m = mu[j, b]
            kl[b] += (m * m + var[j, b]) * half - log_sigma[j, b]
    for b in range(B):
        kl[b] += minus_half_z


@_jit
def _latent_backward(dz, dkl, mu, var, noise, dq, slot, one):
    """dq[:, slot] <- [dkl mu + dz | dkl (sigma^2 - 1) + dz sigma eps]."""
    Z, B = mu.shape
    for j in range(Z):
        for b in range(B):
            dq[j, slot, b] = mu[j, b] * dkl + dz[j, b]
            dq[Z + j, slot, b] = (var[j, b] - one) * dkl + dz[j, b] * noise[j, b]


def latent(q, eps, z_out):
    """As engine_layers.latent_forward with axis=0: q (2Z, B), eps (Z, B), z_out (Z, B)
    -> (z, kl (B,)), (noise, var)."""
    Z = eps.shape[0]
    mu, log_sigma = q[:Z], q[Z:]
    noise = np.exp(log_sigma)
    var = np.multiply(log_sigma, 2.0)
    np.exp(var, out=var)
    kl = np.empty(q.shape[1], q.dtype)
    dt = q.dtype.type
    _latent_rest(mu, log_sigma, eps, noise, var, z_out, kl, dt(0.5), dt(-0.5 * Z))
    return (z_out, kl), (noise, var)


def latent_backward(dz, dkl, mu, var, noise, out, slot=None):
    """As engine_layers.latent_backward with axis=0, dkl a number: dq into out (2Z, B), or
    into out[:, slot] of a (2Z, S, B) buffer (see _slot_of)."""
    out3, slot3 = _slot_of(out, slot)
    dt = mu.dtype.type
    _latent_backward(dz, dt(dkl), mu, var, noise, out3, slot3, dt(1))
    return out if slot is None else out[:, slot]
