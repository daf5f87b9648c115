"""The engine's layers: the kernels of npdraw.layers in place, into preallocated arrays,
and in either layout, (B, features) or features first (axis=0, the engine's).

Dimension legend
    B  batch
    I, O  input and output widths of a linear map
    Hs  the hidden size of one LSTM (He, Hd, or the classifier's)
    Z  latent size

npdraw.layers holds the plain pairs that the reference runs, and the fused kernels
(_lstm_cell_kernel, _reparam_kernel, ...): the equations, written once. Here a GPU runs
those same kernels; on NumPy the same equations run as in-place ufunc sequences over
whole gate blocks (the three sigmoid gates are one contiguous block features first),
which spare temporaries and copies. tests/test_layers.py checks both kinds agree.
The options: axis=0 takes everything transposed, features first; out, gates_out,
h_out and z_out receive results in the caller's arrays; dq accumulates a gradient.
Each `*_forward` returns `(out, cache)` and its `*_backward` takes `(dout, cache)`.
"""
from __future__ import annotations

import os

import numpy as np

from .backend import get_array_module
from .layers import (_kl_terms_kernel, _lstm_cell_backward_kernel, _lstm_cell_kernel,
                     _peephole_lstm_cell_backward_kernel, _peephole_lstm_cell_kernel,
                     _reparam_kernel)

# ---------------------------------------------------------------- kernels
# The engine's elementwise chains on NumPy, features first (the LSTM cells and the latent
# here, eq 3 and the attention filters through numba_kernels), run NumPy's in-place
# sequences by default, or npdraw.engine_numba's fused kernels (the `numba` extra)
# when env NPDRAW_KERNELS=numba (read once, on import) or set_kernels("numba") asks.

KERNELS = ("numpy", "numba")
KERNELS_VARIABLE = "NPDRAW_KERNELS"


class _Unavailable:
    """Stands in for npdraw.engine_numba when it was asked for but cannot load: the
    first cell that would run it raises the sentence (ValueError) instead."""

    def __init__(self, sentence):
        self.sentence = sentence

    def __getattr__(self, name):
        raise ValueError(self.sentence)


def _load_kernels(name, source):
    """'numpy' -> None, 'numba' -> npdraw.engine_numba; else ValueError, one sentence."""
    if name not in KERNELS:
        raise ValueError(f"{source} names kernels {name!r}; choose 'numpy' or 'numba'")
    if name == "numpy":
        return None
    try:
        from . import engine_numba
    except ImportError as err:
        raise ValueError(f"{source} asks for Numba kernels, but numba cannot be imported "
                         f"({err}); install it with: pip install numba") from None
    return engine_numba


def set_kernels(name: str) -> None:
    """Run the engine's elementwise chains on NumPy with 'numpy' (the default) or 'numba'
    kernels; a ValueError (one sentence) for another name or numba missing."""
    global _numba
    _numba = _load_kernels(name, f"set_kernels({name!r})")


def kernels() -> str:
    """The kernels selected: 'numpy' or 'numba'; a ValueError (one sentence) when
    NPDRAW_KERNELS asked for kernels that cannot be had."""
    if isinstance(_numba, _Unavailable):
        raise ValueError(_numba.sentence)
    return "numpy" if _numba is None else "numba"


def numba_kernels():
    """npdraw.engine_numba when the Numba kernels are selected, else None (NumPy's), for
    the engine's elementwise chains outside this module (eq 3, the attention filters); a
    ValueError (one sentence) from its first use when they were asked for and cannot be
    had."""
    return _numba


def _kernels_from_environment():
    name = os.environ.get(KERNELS_VARIABLE, "").strip() or "numpy"
    try:
        return _load_kernels(name, f"{KERNELS_VARIABLE}={name}")
    except ValueError as err:          # raised where the kernels are used, not on import
        return _Unavailable(str(err))


_numba = _kernels_from_environment()   # npdraw.engine_numba or _Unavailable; None: NumPy's


# ---------------------------------------------------------------- linear

def linear_forward(x, W, b, out=None):
    """y = x W + b.

    x: (..., I)   W: (I, O)   b: (O,) or broadcastable to y   ->   y: (..., O)
    out: optional array for y; the model reuses one per layer across glimpses,
    which spares the allocator a fresh page-faulted block for every GEMM.
    """
    xp = get_array_module(x)
    y = xp.matmul(x, W, out=out)
    y += b
    return y, (x, W)


# ---------------------------------------------------------------- LSTM cell

def _blocks(a, width, count, axis):
    """`count` consecutive blocks of `width` along axis 0 or -1 of an array."""
    return [_span(a, k * width, (k + 1) * width, axis) for k in range(count)]


def _span(a, start, stop, axis):
    return a[start:stop] if axis == 0 else a[..., start:stop]


def _gate_blocks(a):
    """The four row blocks [i, f, o, g] of a features-first (4Hs, B) array."""
    return _blocks(a, a.shape[0] // 4, 4, 0)


# On NumPy the same equations run as in-place ufunc calls over whole gate blocks: the
# three sigmoid gates are one contiguous block in the features-first layout, and
# writing into preallocated outputs spares temporaries and copies. The fused kernels
# of npdraw.layers are the equations (a test checks the two agree) and what a GPU runs.

def _lstm_cell_numpy(a, c_prev, axis, gates=None, h_out=None):
    """a (B, 4Hs), c_prev (B, Hs), or transposed with axis=0 -> (gates [i, f, o, g]
    shaped like a, c, tanh(c), h); gates may be given, and may be a itself; h is
    written into h_out if given."""
    Hs = c_prev.shape[axis]
    if gates is None:
        gates = np.empty_like(a)                               # [i, f, o, g] activations
    ifo, g = _span(gates, 0, 3 * Hs, axis), _span(gates, 3 * Hs, 4 * Hs, axis)
    np.multiply(_span(a, 0, 3 * Hs, axis), 0.5, out=ifo)
    np.tanh(ifo, out=ifo)
    ifo *= 0.5
    ifo += 0.5                                                 # sigmoid = (1 + tanh(a/2)) / 2
    np.tanh(_span(a, 3 * Hs, 4 * Hs, axis), out=g)
    i, f, o = _blocks(ifo, Hs, 3, axis)
    c = f * c_prev
    c += i * g
    tanh_c = np.tanh(c)
    return gates, c, tanh_c, np.multiply(o, tanh_c, out=h_out)


def _lstm_cell_backward_numpy(dh, dc, gates, c_prev, tanh_c, out, axis):
    """Writes da into out (shaped like gates); -> dc_prev. Shapes as in the forward."""
    Hs = c_prev.shape[axis]
    i, f, o, g = _blocks(gates, Hs, 4, axis)
    da_i, da_f, da_o, da_g = _blocks(out, Hs, 4, axis)
    dc_total = tanh_c * tanh_c
    np.subtract(1.0, dc_total, out=dc_total)
    dc_total *= o
    dc_total *= dh
    dc_total += dc
    np.multiply(dc_total, g, out=da_i)         # dL/d(i, f, o); the sigmoid's slope next
    np.multiply(dc_total, c_prev, out=da_f)
    np.multiply(dh, tanh_c, out=da_o)
    ifo = _span(gates, 0, 3 * Hs, axis)
    slope = 1.0 - ifo
    slope *= ifo                                               # sigmoid' = s (1 - s)
    _span(out, 0, 3 * Hs, axis)[...] *= slope
    np.multiply(g, g, out=da_g)
    np.subtract(1.0, da_g, out=da_g)
    da_g *= i
    da_g *= dc_total                                           # tanh' = 1 - g^2
    dc_total *= f
    return dc_total


def lstm_cell_forward(a, c_prev, axis=-1, gates_out=None, h_out=None):
    """The elementwise half of an LSTM step.

    a: (B, 4Hs) gate pre-activations   c_prev: (B, Hs)
    -> (h (B, Hs), c (B, Hs)), cache
    axis=0 takes everything transposed, features first: a (4Hs, B), c_prev (Hs, B);
    the model uses that layout, where BLAS runs its GEMMs faster.
    gates_out: optional array shaped like a to keep the gate activations in (the
    cache refers to it); it may be a itself, when the caller no longer needs a.
    Only NumPy uses it.
    h_out: optional array shaped like c_prev that receives h (the model's slot for
    h in the next glimpse's GEMM input), which is then the h returned.
    """
    Hs = c_prev.shape[axis]
    if get_array_module(a) is np:
        if _numba is not None and axis == 0:
            gates = np.empty_like(a) if gates_out is None else gates_out
            gates, c, tanh_c, h = _numba.lstm_cell(a, c_prev, gates, h_out, _gate_blocks)
        else:
            gates, c, tanh_c, h = _lstm_cell_numpy(a, c_prev, axis, gates_out, h_out)
        return (h, c), (gates, c_prev, tanh_c, axis)
    i, f, o, g, c, tanh_c, h = _lstm_cell_kernel(*_blocks(a, Hs, 4, axis), c_prev)
    if h_out is not None:
        h_out[...] = h
        h = h_out
    return (h, c), ((i, f, o, g), c_prev, tanh_c, axis)


def lstm_cell_backward(dh, dc, cache, out=None, slot=None):
    """dh, dc: (B, Hs) gradients w.r.t. h and c -> (da (B, 4Hs), dc_prev (B, Hs)).

    Transposed, as the forward was. out: optional array to receive da.
    slot: features first only, out then (4Hs, T, B), the engine's stacked buffer: da goes
    into out[:, slot]. The Numba kernels write it there; the other paths compute it in a
    contiguous array, returned as da, and copy it in (ufuncs crawl over the strided slot).
    """
    xp = get_array_module(dh)
    gates, c_prev, tanh_c, axis = cache
    Hs = c_prev.shape[axis]
    if slot is not None:
        if xp is np and _numba is not None and axis == 0:
            dc_prev = _numba.lstm_cell_backward(dh, dc, gates, c_prev, tanh_c, out,
                                                _gate_blocks, slot)
            return out[:, slot], dc_prev
        da, dc_prev = lstm_cell_backward(dh, dc, cache)
        out[:, slot] = da
        return da, dc_prev
    if out is None:
        shape = (4 * Hs, dh.shape[1]) if axis == 0 else (dh.shape[0], 4 * Hs)
        out = xp.empty(shape, dh.dtype)
    if xp is np and _numba is not None and axis == 0:
        return out, _numba.lstm_cell_backward(dh, dc, gates, c_prev, tanh_c, out, _gate_blocks)
    if xp is np:
        return out, _lstm_cell_backward_numpy(dh, dc, gates, c_prev, tanh_c, out, axis)
    grads = _lstm_cell_backward_kernel(dh, dc, *gates, c_prev, tanh_c)
    for block, grad in zip(_blocks(out, Hs, 4, axis), grads[:4]):
        block[...] = grad
    return out, grads[4]


# ---------------------------------------------------------------- peephole LSTM cell

def _peep_blocks(peep, Hs, axis):
    """peep (3Hs,) -> [p_i, p_f, p_o], each (Hs,), or (Hs, 1) for the features-first layout."""
    return [p[:, None] if axis == 0 else p for p in _blocks(peep, Hs, 3, -1)]


def _sigmoid_in_place(x):
    x *= 0.5
    np.tanh(x, out=x)
    x *= 0.5
    x += 0.5                                                   # sigmoid = (1 + tanh(a/2)) / 2


# On NumPy, as for the plain cell: in-place ufunc calls into preallocated outputs.

def _peephole_lstm_cell_numpy(a, c_prev, peeps, axis, gates, h_out):
    """As _lstm_cell_numpy, with peeps = [p_i, p_f, p_o] -> (gates, c, tanh(c), h)."""
    Hs = c_prev.shape[axis]
    p_i, p_f, p_o = peeps
    gates = np.empty_like(a) if gates is None else gates
    a_i, a_f, a_o, a_g = _blocks(a, Hs, 4, axis)
    i, f, o, g = _blocks(gates, Hs, 4, axis)
    for gate, pre, p in ((i, a_i, p_i), (f, a_f, p_f)):        # eq 7-8: c_{t-1} peeps in
        np.add(pre, p * c_prev, out=gate)                      # gates may be a itself
        _sigmoid_in_place(gate)
    np.tanh(a_g, out=g)
    c = f * c_prev
    c += i * g                                                 # eq 9
    np.add(a_o, p_o * c, out=o)                                # eq 10: c_t peeps in
    _sigmoid_in_place(o)
    tanh_c = np.tanh(c)
    return gates, c, tanh_c, np.multiply(o, tanh_c, out=h_out)  # eq 11


def _peephole_lstm_cell_backward_numpy(dh, dc, gates, c_prev, tanh_c, peeps, out, axis):
    """Writes da into out (shaped like gates); -> dc_prev. Shapes as in the forward."""
    Hs = c_prev.shape[axis]
    p_i, p_f, p_o = peeps
    i, f, o, g = gates
    da_i, da_f, da_o, da_g = _blocks(out, Hs, 4, axis)
    np.multiply(dh, tanh_c, out=da_o)
    da_o *= o
    da_o *= 1.0 - o                                            # sigmoid' = s (1 - s)
    dc_total = tanh_c * tanh_c
    np.subtract(1.0, dc_total, out=dc_total)
    dc_total *= o
    dc_total *= dh
    dc_total += dc
    dc_total += da_o * p_o                                     # c_t fed o (eq 10)
    np.multiply(dc_total, g, out=da_i)
    da_i *= i
    da_i *= 1.0 - i
    np.multiply(dc_total, c_prev, out=da_f)
    da_f *= f
    da_f *= 1.0 - f
    np.multiply(g, g, out=da_g)
    np.subtract(1.0, da_g, out=da_g)
    da_g *= i
    da_g *= dc_total                                           # tanh' = 1 - g^2
    dc_total *= f
    dc_total += da_i * p_i                                     # c_{t-1} fed i and f
    dc_total += da_f * p_f
    return dc_total


def peephole_lstm_cell_forward(a, c_prev, peep, axis=-1, gates_out=None, h_out=None):
    """The elementwise half of a peephole LSTM step (Graves 2013 eq 7-11, above).

    a: (B, 4Hs) gate pre-activations [i, f, o, g] without the peepholes
    c_prev: (B, Hs)   peep: (3Hs,) = [p_i, p_f, p_o]
    -> (h (B, Hs), c (B, Hs)), cache
    axis, gates_out and h_out as for lstm_cell_forward (axis=0: features first,
    a (4Hs, B), c_prev (Hs, B); gates_out receives the activations [i, f, o, g]).
    """
    Hs = c_prev.shape[axis]
    if get_array_module(a) is np:
        if _numba is not None and axis == 0:
            gates = np.empty_like(a) if gates_out is None else gates_out
            gates, c, tanh_c, h = _numba.peephole_lstm_cell(
                a, c_prev, _blocks(peep, Hs, 3, -1), gates, h_out, _gate_blocks)
        else:
            gates, c, tanh_c, h = _peephole_lstm_cell_numpy(
                a, c_prev, _peep_blocks(peep, Hs, axis), axis, gates_out, h_out)
        return (h, c), (tuple(_blocks(gates, Hs, 4, axis)), c_prev, c, tanh_c, peep, axis)
    peeps = _peep_blocks(peep, Hs, axis)
    i, f, o, g, c, tanh_c, h = _peephole_lstm_cell_kernel(*_blocks(a, Hs, 4, axis), c_prev,
                                                          *peeps)
    gates = (i, f, o, g)
    if gates_out is not None:
        for block, value in zip(_blocks(gates_out, Hs, 4, axis), gates):
            block[...] = value
        gates = tuple(_blocks(gates_out, Hs, 4, axis))
    if h_out is not None:
        h_out[...] = h
        h = h_out
    return (h, c), (gates, c_prev, c, tanh_c, peep, axis)


def peephole_lstm_cell_backward(dh, dc, cache, out=None, slot=None):
    """dh, dc: (B, Hs) gradients w.r.t. h and c
    -> (da (B, 4Hs), dc_prev (B, Hs), dpeep (3Hs,)), dpeep summed over the batch:
    dp_i = sum_b da_i c_{t-1},  dp_f = sum_b da_f c_{t-1},  dp_o = sum_b da_o c_t.

    Transposed, as the forward was. out, slot: as for lstm_cell_backward.
    """
    xp = get_array_module(dh)
    gates, c_prev, c, tanh_c, peep, axis = cache
    Hs = c_prev.shape[axis]
    on_numba = xp is np and _numba is not None and axis == 0
    if slot is not None and not on_numba:
        da, dc_prev, dpeep = peephole_lstm_cell_backward(dh, dc, cache)
        out[:, slot] = da
        return da, dc_prev, dpeep
    if out is None:
        shape = (4 * Hs, dh.shape[1]) if axis == 0 else (dh.shape[0], 4 * Hs)
        out = xp.empty(shape, dh.dtype)
    if on_numba:
        dc_prev = _numba.peephole_lstm_cell_backward(dh, dc, gates, c_prev, tanh_c,
                                                     _blocks(peep, Hs, 3, -1), out, _gate_blocks,
                                                     slot)
        out = out if slot is None else out[:, slot]
    elif xp is np:
        dc_prev = _peephole_lstm_cell_backward_numpy(dh, dc, gates, c_prev, tanh_c,
                                                     _peep_blocks(peep, Hs, axis), out, axis)
    else:
        grads = _peephole_lstm_cell_backward_kernel(dh, dc, *gates, c_prev, tanh_c,
                                                    *_peep_blocks(peep, Hs, axis))
        for block, grad in zip(_blocks(out, Hs, 4, axis), grads[:4]):
            block[...] = grad
        dc_prev = grads[4]
    da_i, da_f, da_o, _ = _blocks(out, Hs, 4, axis)
    batch = 1 if axis == 0 else 0
    dpeep = xp.concatenate([(da_i * c_prev).sum(axis=batch), (da_f * c_prev).sum(axis=batch),
                            (da_o * c).sum(axis=batch)])
    return out, dc_prev, dpeep


# ---------------------------------------------------------------- Gaussian latent

def reparam_forward(q, eps, axis=-1, z_out=None):
    """z = mu + sigma * eps (eq 6).

    q: (B, 2Z) = [mu | log sigma]   eps: (B, Z) standard normal noise
    -> z (B, Z), cache. axis=0: all transposed, features first (q (2Z, B), eps (Z, B)).
    z_out: optional array shaped like eps to write z into (then returned as z).
    """
    xp = get_array_module(q)
    mu, log_sigma = _blocks(q, eps.shape[axis], 2, axis)
    if xp is np:                                 # in place: no temporaries
        noise = np.exp(log_sigma)
        noise *= eps
        z = np.add(mu, noise, out=z_out)
    else:
        noise, z = _reparam_kernel(mu, log_sigma, eps)
        if z_out is not None:
            z_out[...] = z
            z = z_out
    return z, (noise, axis)                      # noise = sigma * eps = dz/dlog sigma


def reparam_backward(dz, cache, dq=None):
    """dz: (B, Z) -> dq (B, 2Z) = [dz | dz * sigma * eps]. Transposed, as the forward was.

    dq: optional array to add the gradient into, which is then returned (the model's
    already holds the KL's gradient)."""
    xp = get_array_module(dz)
    noise, axis = cache
    if dq is None:
        return xp.concatenate([dz, dz * noise], axis=axis)
    dmu, dlog_sigma = _blocks(dq, dz.shape[axis], 2, axis)
    dmu += dz
    dlog_sigma += dz * noise
    return dq


def kl_forward(q, axis=-1):
    """Exact KL(N(mu, sigma^2) || N(0, I)), summed over the Z units (eq 10-11):
    kl = sum_j 0.5 (mu^2 + sigma^2 - 1) - log sigma.

    q: (..., 2Z) = [mu | log sigma] -> kl (...), cache.
    axis=0: features first, q (2Z, ...) -> kl (...).
    """
    xp = get_array_module(q)
    Z = q.shape[axis] // 2
    mu, log_sigma = _blocks(q, Z, 2, axis)
    if xp is not np:
        var, terms = _kl_terms_kernel(mu, log_sigma)
        return terms.sum(axis=axis), (mu, var, axis)
    var = np.multiply(log_sigma, 2.0)             # in place: no further temporaries
    np.exp(var, out=var)
    terms = np.multiply(mu, mu)
    terms += var
    terms *= 0.5
    terms -= log_sigma
    kl = terms.sum(axis=axis)
    kl -= 0.5 * Z
    return kl, (mu, var, axis)


def kl_backward(dkl, cache, out=None):
    """dkl: shaped like kl, or a scalar -> dq = [dkl mu | dkl (sigma^2 - 1)], shaped like q
    (written into `out` if given)."""
    mu, var, axis = cache
    xp = get_array_module(mu)
    if not isinstance(dkl, (int, float)):   # a python number needs no copy to a GPU
        dkl = xp.asarray(dkl, dtype=mu.dtype)
        if dkl.ndim:
            dkl = xp.expand_dims(dkl, axis)
    if out is None:
        shape = list(mu.shape)
        shape[axis] *= 2
        out = xp.empty(shape, mu.dtype)
    dmu, dlog_sigma = _blocks(out, mu.shape[axis], 2, axis)
    xp.multiply(mu, dkl, out=dmu)
    xp.subtract(var, 1.0, out=dlog_sigma)
    dlog_sigma *= dkl
    return out


def latent_forward(q, eps, axis=-1, z_out=None):
    """Reparameterised sample and exact KL to N(0, I) of one glimpse (eq 1-2, 6, 10-11).

    q: (B, 2Z) = [mu | log sigma]   eps: (B, Z) standard normal noise
    -> (z (B, Z), kl (B,)), cache
    axis=0: all transposed, features first (q (2Z, B), eps (Z, B), z (Z, B)).
    z_out: optional array shaped like eps to write z into (see reparam_forward).
    """
    if axis == 0 and z_out is not None and get_array_module(q) is np and _numba is not None:
        (z, kl), (noise, var) = _numba.latent(q, eps, z_out)
        return (z, kl), ((noise, 0), (q[:eps.shape[0]], var, 0))
    z, reparam_cache = reparam_forward(q, eps, axis, z_out=z_out)
    kl, kl_cache = kl_forward(q, axis)
    return (z, kl), (reparam_cache, kl_cache)


def latent_backward(dz, dkl, cache, out=None, slot=None):
    """dz: (B, Z), dkl: (B,) or scalar -> dq (B, 2Z) (written into `out` if given).

    Transposed, as the forward was. slot: features first, with a number dkl only: out is
    then (2Z, T, B) and dq goes into out[:, slot], as lstm_cell_backward's da does."""
    reparam_cache, kl_cache = cache
    (noise, axis), (mu, var, _) = reparam_cache, kl_cache
    if slot is not None:
        if get_array_module(dz) is np and _numba is not None and axis == 0:
            return _numba.latent_backward(dz, dkl, mu, var, noise, out, slot)
        dq = latent_backward(dz, dkl, cache)
        out[:, slot] = dq
        return dq
    return reparam_backward(dz, reparam_cache, dq=kl_backward(dkl, kl_cache, out=out))
