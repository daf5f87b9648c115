"""The engine's attention (eq 19-29): the plain one of npdraw.reference, tuned for speed.

Dimension legend
    B  batch
    G  image planes read or written at once (C, or 2C for [x, x_hat])
    H, W  image height, image width
    A  one image axis (H or W)
    N  a window's size, Nr or Nw (cfg.read_n or cfg.write_n)
    M  filter rows handled together (N for one axis, 2N for both axes at once)

Windows have the 5 window parameters (g~X, g~Y, log sigma^2, log delta~, log gamma).

What the reference computes plainly (npdraw.reference.attention: window_forward, read_forward,
write_forward), this module computes for one or more windows at once, and the tests check
that both agree. Coordinates are 1-based pixel indices a = 1..A, as there.

DRAW calls these functions T times per step on small arrays (B=100, N=2..5, A=28), so
what they cost is mostly per-call overhead and memory traffic, not arithmetic: the number
of array operations, broadcasts and reductions along short rows (slow in NumPy), how each
product suits BLAS, and how much a cache keeps until backward (by then it has left the CPU
caches). Hence, below:
- constants built once, per device, dtype and shape;
- eq 22-24 as one expression over all columns of p, whichever the column's formula;
- eq 19-20's filter centres of several windows as one product with a constant matrix;
- eq 25-26's row maxima found analytically (no reduction), and row sums taken as
  matrix-vector products;
- both axes' filters, and several windows' (a glimpse's write window and the next read
  window), computed as one array;
- read and write products merged over the planes, and caches that hold small arrays only
  (the read keeps its two products of filters and images, not the images).
"""
from __future__ import annotations

import numpy as np

from .backend import fuse, get_array_module
from .engine_layers import numba_kernels

P_ATTENTION = 5


# ---------------------------------------------------------------- cached constants

_CONSTANTS = {}


def _constant(xp, name, key, dtype, build):
    """A small constant array, built once per (array module, device, name, key, dtype).

    build(key) returns it as a NumPy array; it is then moved to xp's device. These
    arrays are shared by every call, so they are only ever read, never written.
    """
    full_key = (xp, None if xp is np else xp.cuda.Device().id, name, key, dtype)
    value = _CONSTANTS.get(full_key)
    if value is None:
        value = _CONSTANTS[full_key] = xp.asarray(build(key).astype(dtype))
    return value


def _ones(xp, A, dtype):
    """(A,) ones: `rows @ ones` sums short rows far faster than .sum(axis=-1) on NumPy."""
    return _constant(xp, "ones", A, dtype, np.ones)


def _offsets(N):
    """(N,) NumPy: i - N/2 - 0.5 for i = 1..N, the filter offsets of eq 19-20."""
    return np.arange(1, N + 1) - (N / 2 + 0.5)


def _as_sizes(N):
    """An int N or a tuple of window sizes -> a tuple (N_1, ..., N_k)."""
    return (N,) if isinstance(N, (int, np.integer)) else tuple(int(n) for n in N)


def _centre_map(xp, Ns, dtype):
    """(5k, M), M = 2 * sum(Ns): values @ this = every filter centre of eq 19-20.

    values holds k windows' (gX, gY, sigma^2, delta, gamma) side by side. The columns are
    all windows' x centres, window after window, then all their y centres:
    column of x filter i of window w = g_X,w + offset_i delta_w, and likewise for y.
    The rows of sigma^2 and gamma are zero.
    """
    def build(Ns):
        Mx = sum(Ns)
        centre_map = np.zeros((5 * len(Ns), 2 * Mx))
        start = 0
        for w, N in enumerate(Ns):
            cols = slice(start, start + N)
            ycols = slice(Mx + start, Mx + start + N)
            centre_map[5 * w + 0, cols] = 1.0                # gX
            centre_map[5 * w + 1, ycols] = 1.0               # gY
            centre_map[5 * w + 3, cols] = _offsets(N)        # delta
            centre_map[5 * w + 3, ycols] = _offsets(N)
            start += N
        return centre_map
    return _constant(xp, "centre map", Ns, dtype, build)


def _row_owners(xp, Ns, dtype):
    """(k, M): 1 where filter row m (ordered as in _centre_map) belongs to window w.
    (B, k) @ this spreads one value per window over its rows; the transpose sums back."""
    def build(Ns):
        Mx = sum(Ns)
        member = np.zeros((len(Ns), 2 * Mx))
        start = 0
        for w, N in enumerate(Ns):
            member[w, start:start + N] = member[w, Mx + start:Mx + start + N] = 1.0
            start += N
        return member
    return _constant(xp, "row owners", Ns, dtype, build)


def _param_constants(xp, B, height, width, Ns, dtype):
    """(3, B, 5k): per column of p, eq 22-24's constant factor; 1 in the log columns
    (log sigma^2, log delta~, log gamma), else 0; the factor in the affine ones (g~X, g~Y):

        gX = (W+1)/2 (g~X + 1)      gY = (H+1)/2 (g~Y + 1)      sigma^2 = exp(log sigma^2)
        delta = (max(H,W)-1)/max(N-1,1) exp(log delta~)         gamma = exp(log gamma)

    for each of the k windows (sizes Ns) side by side. Repeated for each of the B rows
    (one cached copy per batch size): on arrays this small, broadcasting a row costs
    more than the arithmetic.
    """
    def build(key):
        B, height, width, Ns = key
        scale = np.concatenate([[0.5 * (width + 1), 0.5 * (height + 1), 1.0,
                                 (max(height, width) - 1) / max(N - 1, 1), 1.0] for N in Ns])
        logs = np.tile([0.0, 0.0, 1.0, 1.0, 1.0], len(Ns))
        return np.repeat(np.stack([scale, logs, scale * (1.0 - logs)])[:, None], B, axis=1)
    return _constant(xp, "param constants", (B, height, width, Ns), dtype, build)


# ---------------------------------------------------------------- eq 21-24

@fuse
def _window_params_kernel(p, scale, logs, slope):
    """In the affine columns exp sees 0 (so cannot overflow) and gives the constant
    term; slope * p is the linear term there, and 0 in the log columns."""
    return np.exp(p * logs) * scale + p * slope


@fuse
def _window_params_kernel_backward(dvalues, values, logs, slope):
    """dvalues times dvalues/dp: values itself in the exponential columns, else the slope."""
    return dvalues * (values * logs + slope)


def _window_params(p, height, width, N):
    """p (B, 5k) -> values (B, 5k) = (gX, gY, sigma^2, delta, gamma) of each of the k windows
    of sizes N (an int, or a tuple of k sizes), column by column (eq 21-24).

    All columns at once: on (B, 5) arrays an operation costs its call, and one on a
    column slice costs as much as one on the whole array.
    """
    xp = get_array_module(p)
    scale, logs, slope = _param_constants(xp, p.shape[0], height, width, _as_sizes(N), p.dtype)
    values = _window_params_kernel(p, scale, logs, slope)
    return values, (values, logs, slope)


def _window_params_backward(dvalues, cache):
    """dvalues (B, 5k) -> dp (B, 5k). Each column of values depends on its own p column only."""
    values, logs, slope = cache
    return _window_params_kernel_backward(dvalues, values, logs, slope)


# ---------------------------------------------------------------- eq 25-26, as a softmax

def _pixel_steps(xp, index, dtype, A):
    """u[b, m, a] = a - index[b, m] for a = 1..A, index in 1..A: (B, M, A).

    u depends on the index alone, so its rows are looked up in an (A + 1, A) table
    (row 0 unused) rather than computed by a broadcast subtraction.
    """
    return xp.take(_step_table(xp, dtype, A), index, axis=0)


def _step_table(xp, dtype, A):
    """(A + 1, A): row k holds a - k for a = 1..A (row 0 unused)."""
    return _constant(xp, "pixel steps", A, dtype,
                     lambda A: np.arange(1, A + 1)[None, :] - np.arange(A + 1)[:, None])


@fuse
def _gaussian_exp(steps, twice_gap, neg_inv_two_var):
    """exp of each logit minus its row's maximum, -u (u + 2d) / (2 sigma^2)."""
    return np.exp(neg_inv_two_var * steps * (steps + twice_gap))


def _gaussian_rows(mu, sigma2, A):
    """Rows of normalised Gaussians (eq 25-26) for any number of centres.

    mu: (B, M) centres;  sigma2: (B,) one variance per batch item, or (B, M) one per
    row (rows of several windows at once);  A: int
    -> F (B, M, A), F[b, m, a] = softmax over a of -(a - mu[b, m])^2 / (2 sigma2[b(, m)]);
       cache

    The row maximum is known without a reduction: over integer a, -(a - mu)^2 peaks
    at the pixel nearest mu, a* = clip(rint(mu), 1, A). With u = a - a* (exact small
    integers) and d = a* - mu,
        (a - mu)^2 - (a* - mu)^2 = u (u + 2 d),
    a product that is exactly 0 at u = 0 and, rounded, never below 0 elsewhere: u and
    u + 2d share their sign because |2d| <= 1 <= |u| inside the image and a* is the
    near end outside it. So each row holds an exact exp(0) = 1 and nothing above it,
    and the normaliser is >= 1 however small sigma^2 or far away mu is.
    """
    xp = get_array_module(mu)
    B, M = mu.shape
    neg_inv_two_var = (-0.5 / sigma2).reshape(B, -1)                     # (B, 1 or M)
    kernels = numba_kernels() if xp is np else None
    if kernels is not None:        # the same rows in three passes (npdraw/engine_numba.py)
        F, index, twice_gap = kernels.gaussian_rows(mu, neg_inv_two_var,
                                                    _step_table(xp, mu.dtype, A), A)
        return F, (F, index, twice_gap, sigma2)
    # fmax/fmin rather than clip: a NaN centre still picks a valid row, and stays NaN below.
    nearest = xp.fmin(xp.fmax(xp.rint(mu), 1), A)
    twice_gap = 2 * (nearest - mu)                                        # 2d, (B, M)
    index = nearest.astype(np.intp)
    F = _gaussian_exp(_pixel_steps(xp, index, mu.dtype, A), twice_gap[:, :, None],
                      neg_inv_two_var[:, :, None])
    Z = F.reshape(B * M, A) @ _ones(xp, A, mu.dtype)                      # (B*M,) row sums
    F *= (1.0 / Z).reshape(B, M, 1)
    # Only F is cached full-size: u is looked up again, cheaper than keeping it in memory.
    return F, (F, index, twice_gap, sigma2)


@fuse
def _dlogits_times_steps(dF, F, s, steps):
    """The softmax backward dl = F (dF - s), s = sum_a F dF, times u."""
    return (dF - s) * F * steps


def _gaussian_rows_backward(dF, cache):
    """dF (B, M, A) -> (dmu (B, M), dsigma2 shaped like the forward's sigma2), for
    _gaussian_rows' cache.

    With logits l = -(a - mu)^2 / (2 sigma^2) and the softmax backward dl:
        dmu     = sum_a dl (a - mu)   / sigma^2,
        dsigma2 = sum_a dl (a - mu)^2 / (2 sigma^4),  per row, or summed over a batch
                  item's rows when sigma2 was one value per item.
    Writing a - mu = u + d with u = a - a* as in the forward, and using sum_a dl = 0,
        sum_a dl (a - mu) = S1,   sum_a dl (a - mu)^2 = S2 + 2d S1,   Sk = sum_a dl u^k:
    u is small where F is not, so these sums lose nothing to cancellation.
    """
    F, index, twice_gap, sigma2 = cache
    xp = get_array_module(F)
    B, M, A = F.shape
    kernels = numba_kernels() if xp is np else None
    if kernels is not None:        # S1 and S2 + 2d S1 in one pass (npdraw/engine_numba.py)
        first, second = kernels.gaussian_sums_backward(dF, F, index, twice_gap,
                                                       _step_table(xp, F.dtype, A))
    else:
        ones = _ones(xp, A, F.dtype)
        steps = _pixel_steps(xp, index, F.dtype, A)
        s = ((dF * F).reshape(B * M, A) @ ones).reshape(B, M, 1)
        dl_u = _dlogits_times_steps(dF, F, s, steps)
        first = (dl_u.reshape(B * M, A) @ ones).reshape(B, M)                 # S1
        second = ((dl_u * steps).reshape(B * M, A) @ ones).reshape(B, M)      # S2
        second += twice_gap * first
    inv_var = 1.0 / sigma2
    if sigma2.ndim == 1:
        dmu = first * inv_var[:, None]
        return dmu, (second @ _ones(xp, M, F.dtype)) * (0.5 * inv_var * inv_var)
    dmu = first * inv_var
    second *= 0.5 * inv_var * inv_var
    return dmu, second


# ---------------------------------------------------------------- a whole window

def windows_forward(p, height, width, Ns):
    """Attention parameters -> the filterbanks of one or more windows (eq 19-26).

    p: (B, 5k), the k windows' parameters side by side;  Ns: their sizes (k ints)
    -> [(Fy (B, N, H), Fx (B, N, W), gamma (B,)) for each window], cache

    The windows' filters come out of one softmax over all their rows (two when H != W,
    one per axis). The model uses two at once: the write window of a glimpse and the
    read window of the next, both driven by the same decoder state. Each window's
    filters are views of the shared array.
    """
    xp = get_array_module(p)
    Ns = _as_sizes(Ns)
    Mx = sum(Ns)
    values, pcache = _window_params(p, height, width, Ns)  # (gX, gY, sigma2, delta, gamma) each
    mu = values @ _centre_map(xp, Ns, p.dtype)                           # (B, 2 Mx), eq 19-20
    sigma2 = values[:, 2::5] @ _row_owners(xp, Ns, p.dtype)             # each row's window's
    if height == width:
        # One pixel grid for both axes: one (B, M, A) softmax for all rows.
        F, rows_cache = _gaussian_rows(mu, sigma2, width)
        Fx_all, Fy_all = F[:, :Mx], F[:, Mx:]
        rows_caches = (rows_cache,)
    else:
        Fx_all, x_cache = _gaussian_rows(mu[:, :Mx], sigma2[:, :Mx], width)
        Fy_all, y_cache = _gaussian_rows(mu[:, Mx:], sigma2[:, Mx:], height)
        rows_caches = (x_cache, y_cache)
    windows, start = [], 0
    for w, N in enumerate(Ns):
        windows.append((Fy_all[:, start:start + N], Fx_all[:, start:start + N],
                        values[:, 5 * w + 4]))
        start += N
    return windows, (pcache, rows_caches, Ns)


def windows_backward(dwindows, cache):
    """[(dFy (B, N, H), dFx (B, N, W), dgamma (B,)) for each window] -> dp (B, 5k)."""
    pcache, rows_caches, Ns = cache
    xp = get_array_module(dwindows[0][0])
    dFx = xp.concatenate([dw[1] for dw in dwindows], axis=1)
    dFy = xp.concatenate([dw[0] for dw in dwindows], axis=1)
    if len(rows_caches) == 1:
        dmu, dsigma2 = _gaussian_rows_backward(xp.concatenate([dFx, dFy], axis=1),
                                               rows_caches[0])
    else:
        dmu_x, dsigma2_x = _gaussian_rows_backward(dFx, rows_caches[0])
        dmu_y, dsigma2_y = _gaussian_rows_backward(dFy, rows_caches[1])
        dmu = xp.concatenate([dmu_x, dmu_y], axis=1)
        dsigma2 = xp.concatenate([dsigma2_x, dsigma2_y], axis=1)
    centre_map = _centre_map(xp, Ns, dmu.dtype)
    dvalues = dmu @ centre_map.T                     # (B, 5k); 0 in sigma^2 and gamma columns
    dvalues[:, 2::5] = dsigma2 @ _row_owners(xp, Ns, dmu.dtype).T
    dvalues[:, 4::5] = xp.stack([dw[2] for dw in dwindows], axis=1)
    return _window_params_backward(dvalues, pcache)


# ---------------------------------------------------------------- eq 27

def read_forward(images, Fy, Fx, gamma):
    """Glimpse gamma * Fy img Fx^T for every plane (eq 27).

    images: (B, G, H, W)   Fy: (B, N, H)   Fx: (B, N, W)   gamma: (B,)
    -> glimpse (B, G, N, N), cache
    The images are not cached: by backward they are long out of the CPU caches, so
    their two products with the filters (small, and needed there) are cached instead.
    """
    B, G, H, W = images.shape
    N = Fy.shape[1]
    # rows[b, (j, k), y] = (img_k Fx^T)[y, j]: per filter j, one matrix-vector product over
    # all G*H image rows, which BLAS does faster than a product with only N columns.
    rows = (images.reshape(B, 1, G * H, W) @ Fx[:, :, :, None]).reshape(B, N * G, H)
    cols = (Fy[:, None] @ images).reshape(B, G * N, W)                     # Fy img_k
    unscaled = (Fy @ rows.transpose(0, 2, 1)).reshape(B, N, N, G).transpose(0, 3, 1, 2)
    return gamma[:, None, None, None] * unscaled, (Fy, Fx, gamma, rows, cols, unscaled)


def read_backward(dglimpse, cache, need_images=True, first_plane=0):
    """dglimpse: (B, G, N, N) -> (dimages (B, G - first_plane, H, W) or None, dFy, dFx, dgamma).

    The image gradient is computed for planes first_plane.. only, or not at all with
    need_images=False: the model needs it for x_hat, never for x.
    """
    Fy, Fx, gamma, rows, cols, unscaled = cache
    B, G, N, _ = dglimpse.shape
    H = Fy.shape[2]
    dgamma = _batch_dot(dglimpse, unscaled)
    dunscaled = gamma[:, None, None, None] * dglimpse
    # dFy[i, y] = sum over planes k and columns j of dunscaled[k, i, j] rows[(j, k), y]
    dFy = dunscaled.transpose(0, 2, 3, 1).reshape(B, N, N * G) @ rows            # (B, N, H)
    # dFx[j, x] = sum over planes k and rows i of dunscaled[k, i, j] cols[(k, i), x]
    dFx = dunscaled.transpose(0, 3, 1, 2).reshape(B, N, G * N) @ cols            # (B, N, W)
    dimages = None
    if need_images:
        planes = G - first_plane
        drows = (Fy.transpose(0, 2, 1)[:, None] @ dunscaled[:, first_plane:])    # Fy^T dU_k
        dimages = (drows.reshape(B, planes * H, N) @ Fx).reshape(B, planes, H, Fx.shape[2])
    return dimages, dFy, dFx, dgamma


# ---------------------------------------------------------------- eq 29

def write_forward(patch, Fy, Fx, gamma):
    """Write (1/gamma) * Fy^T w Fx for every plane (eq 29).

    patch: (B, G, N, N)   Fy: (B, N, H)   Fx: (B, N, W)   gamma: (B,)
    -> image (B, G, H, W), cache.
    The full-size image is not cached: backward needs only patch and filters.
    """
    B, G, N, _ = patch.shape
    W = Fx.shape[2]
    scaled = patch * (1.0 / gamma)[:, None, None, None]    # 1/gamma on the patch, not the image
    cols = (scaled.reshape(B, G * N, N) @ Fx).reshape(B, G, N, W)          # (w/gamma) Fx
    image = Fy.transpose(0, 2, 1)[:, None] @ cols                          # (B, G, H, W)
    return image, (patch, Fy, Fx, gamma, scaled)


def write_backward(dimage, cache):
    """dimage: (B, G, H, W) -> (dpatch (B, G, N, N), dFy, dFx, dgamma)."""
    patch, Fy, Fx, gamma, scaled = cache
    B, G, H, W = dimage.shape
    N = Fy.shape[1]
    # image_k = Fy^T S_k Fx with S = w/gamma. dimage meets Fx (over x) and Fy (over y)
    # once each, in the two full-size products; every gradient is small after them.
    dimage_fx = (dimage.reshape(B, G * H, W) @ Fx.transpose(0, 2, 1)).reshape(B, G, H, N)
    fy_dimage = (Fy[:, None] @ dimage).reshape(B, G * N, W)                # Fy dimage_k
    dpatch = (Fy[:, None] @ dimage_fx) * (1.0 / gamma)[:, None, None, None]
    # dFy[i, y] = sum over k, j of S_k[i, j] dimage_fx[k, y, j]
    dFy = (scaled.transpose(0, 2, 1, 3).reshape(B, N, G * N)
           @ dimage_fx.transpose(0, 1, 3, 2).reshape(B, G * N, H))
    # dFx[j, x] = sum over k, i of S_k[i, j] fy_dimage[(k, i), x]
    dFx = scaled.reshape(B, G * N, N).transpose(0, 2, 1) @ fy_dimage
    # image = U/gamma with U linear in patch, so <dimage, U>/gamma^2 = <dpatch, patch>/gamma
    dgamma = -_batch_dot(dpatch, patch) / gamma
    return dpatch, dFy, dFx, dgamma


def _batch_dot(a, b):
    """(B, ...) x (B, ...) -> (B,): sum of a * b over everything but the batch axis."""
    B = a.shape[0]
    return (a.reshape(B, 1, -1) @ b.reshape(B, -1, 1)).reshape(B)
