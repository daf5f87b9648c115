"""Selective attention (paper section 3.2, eq 19-29), as paired forward/backward.

Dimension legend
    B  batch               K  image planes read or written at once (C, or 2C for [x, x_hat])
    H  image height        W  image width
    A  one image axis (H or W)
    N  attention window size (read_n or write_n)
    M  filter rows handled together (N for one axis, 2N for both axes at once)
    P  = 5 attention parameters (g~X, g~Y, log sigma^2, log delta~, log gamma)

Coordinates are 1-based pixel indices a = 1..A, which is what makes the paper's
centre g = (A+1)/2 * (g~ + 1) (eq 22-23) put g~ = 0 exactly on the image centre.
The filterbank rows are normalised Gaussians (eq 25-26). They are computed as a
softmax over a, i.e. with the row maximum subtracted before exp, so the
normaliser is always >= 1 and can never be zero or underflow, however small
sigma is or however far the window lies outside the image.

Window size N = 1: eq 24's stride (max(A,B)-1)/(N-1) divides by zero. The only
filter then sits at the centre (eq 19-20 give mu = g for any delta), so the
stride has no effect; we divide by max(N-1, 1) and delta stays a harmless,
gradient-free parameter.

Speed. DRAW calls these functions T times per step on small arrays (B=100, N=2..5,
A=28), so what they cost is mostly per-call overhead and memory traffic, not
arithmetic: the number of array operations, broadcasts and reductions along short
rows (slow in NumPy), how each product suits BLAS, and how much a cache keeps until
backward (by then it has left the CPU caches). Hence, below: constants built once;
per-row maxima found analytically; both axes' filters computed as one array when
H == W; row sums taken as matrix-vector products; products merged over the planes
k; and caches that hold small arrays only (the read keeps its two products of
filters and images, not the images).
"""
from __future__ import annotations

import numpy as np

from .backend import fuse, get_array_module

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


_CENTRE_PARAMS = [0, 1, 3]   # the columns gX, gY, delta of q (see _window_params)


def _centre_map(xp, N, dtype):
    """(3, 2N): (gX, gY, delta) @ this = the 2N filter centres of eq 19-20.

    Columns 0..N-1 are the x centres gX + offset_i delta, columns N..2N-1 the y ones.
    """
    def build(N):
        offsets, zeros, ones = _offsets(N), np.zeros(N), np.ones(N)
        return np.array([np.concatenate([ones, zeros]),
                         np.concatenate([zeros, ones]),
                         np.concatenate([offsets, offsets])])
    return _constant(xp, "centre map", N, dtype, build)


def _centre_jacobian(xp, N, dtype):
    """(2N, 5): d(the 2N centres)/d(q); dq = dmu @ this. The centre map, transposed,
    in q's columns gX, gY, delta; zero in those of sigma^2 and gamma."""
    def build(N):
        jacobian = np.zeros((2 * N, 5))
        jacobian[:, _CENTRE_PARAMS] = _centre_map(np, N, np.float64).T
        return jacobian
    return _constant(xp, "centre jacobian", N, dtype, build)


def _param_constants(xp, B, height, width, N, dtype):
    """(3, B, 5): per column of p, eq 22-24's constant factor; 1 in the log columns
    (log sigma^2, log delta~, log gamma), else 0; the factor in the affine ones (g~X, g~Y):

        gX = (W+1)/2 (g~X + 1)      gY = (H+1)/2 (g~Y + 1)      sigma^2 = exp(log sigma^2)
        delta = (max(H,W)-1)/max(N-1,1) exp(log delta~)         gamma = exp(log gamma)

    Repeated for each of the B rows (one cached copy per batch size): on arrays this
    small, broadcasting a (5,) row costs more than the arithmetic.
    """
    def build(key):
        B, height, width, N = key
        scale = np.array([0.5 * (width + 1), 0.5 * (height + 1), 1.0,
                          (max(height, width) - 1) / max(N - 1, 1), 1.0])
        logs = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
        return np.repeat(np.stack([scale, logs, scale * (1.0 - logs)])[:, None], B, axis=1)
    return _constant(xp, "param constants", (B, height, width, N), dtype, build)


# ---------------------------------------------------------------- eq 21-24

@fuse
def _window_params_kernel(p, scale, logs, slope):
    """In the affine columns exp sees 0 (so cannot overflow) and gives the constant
    term; slope * p is the linear term there, and 0 in the log columns."""
    return np.exp(p * logs) * scale + p * slope


@fuse
def _window_params_kernel_backward(dq, q, logs, slope):
    """dq times dq/dp: q itself for the exponentials, the slope for the affine columns."""
    return dq * (q * logs + slope)


def _window_params(p, height, width, N):
    """p (B, 5) -> q (B, 5) = (gX, gY, sigma^2, delta, gamma), column by column (eq 21-24).

    All columns at once: on (B, 5) arrays an operation costs its call, and one on a
    column slice costs as much as one on the whole array.
    """
    xp = get_array_module(p)
    scale, logs, slope = _param_constants(xp, p.shape[0], height, width, N, p.dtype)
    q = _window_params_kernel(p, scale, logs, slope)
    return q, (q, logs, slope)


def _window_params_backward(dq, cache):
    """dq (B, 5) -> dp (B, 5). Each q column depends on its own p column only."""
    q, logs, slope = cache
    return _window_params_kernel_backward(dq, q, logs, slope)


def attn_params_forward(p, height, width, N):
    """Map a linear layer's output to window parameters (eq 21-24).

    p: (B, 5) = (g~X, g~Y, log sigma^2, log delta~, log gamma)
    -> (gx, gy, delta, sigma2, gamma), each (B,); cache
    """
    q, cache = _window_params(p, height, width, N)
    return (q[:, 0], q[:, 1], q[:, 3], q[:, 2], q[:, 4]), cache


def attn_params_backward(dgx, dgy, ddelta, dsigma2, dgamma, cache):
    """Each argument (B,) -> dp (B, 5)."""
    xp = get_array_module(dgx)
    return _window_params_backward(xp.stack([dgx, dgy, dsigma2, ddelta, dgamma], axis=1), cache)


# ---------------------------------------------------------------- eq 25-26, as a softmax

def _pixel_steps(xp, index, dtype, A):
    """u[b, m, a] = a - index[b, m] for a = 1..A, index in 1..A: (B, M, A).

    u depends on the index alone, so its rows are looked up in an (A + 1, A) table
    (row 0 unused) rather than computed by a broadcast subtraction.
    """
    table = _constant(xp, "pixel steps", A, dtype,
                      lambda A: np.arange(1, A + 1)[None, :] - np.arange(A + 1)[:, None])
    return xp.take(table, index, axis=0)


@fuse
def _gaussian_exp(steps, twice_gap, neg_inv_two_var):
    """exp of each logit minus its row's maximum, -u (u + 2d) / (2 sigma^2)."""
    return np.exp(neg_inv_two_var * steps * (steps + twice_gap))


def _gaussian_rows(mu, sigma2, A):
    """Rows of normalised Gaussians (eq 25-26) for any number of centres.

    mu: (B, M) centres;  sigma2: (B,);  A: int
    -> F (B, M, A), F[b, m, a] = softmax over a of -(a - mu[b, m])^2 / (2 sigma2[b]); cache

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
    # fmax/fmin rather than clip: a NaN centre still picks a valid row, and stays NaN below.
    nearest = xp.fmin(xp.fmax(xp.rint(mu), 1), A)
    twice_gap = 2 * (nearest - mu)                                        # 2d, (B, M)
    index = nearest.astype(np.intp)
    F = _gaussian_exp(_pixel_steps(xp, index, mu.dtype, A), twice_gap[:, :, None],
                      (-0.5 / sigma2)[:, None, None])
    Z = F.reshape(B * M, A) @ _ones(xp, A, mu.dtype)                      # (B*M,) row sums
    F *= (1.0 / Z).reshape(B, M, 1)
    # Only F is cached full-size: u is looked up again, cheaper than keeping it in memory.
    return F, (F, index, twice_gap, sigma2)


@fuse
def _dlogits_times_steps(dF, F, s, steps):
    """The softmax backward dl = F (dF - s), s = sum_a F dF, times u."""
    return (dF - s) * F * steps


def _gaussian_rows_backward(dF, cache):
    """dF (B, M, A) -> (dmu (B, M), dsigma2 (B,)), for _gaussian_rows' cache.

    With logits l = -(a - mu)^2 / (2 sigma^2) and the softmax backward dl:
        dmu     = sum_a dl (a - mu)   / sigma^2,
        dsigma2 = sum_a dl (a - mu)^2 / (2 sigma^4),  summed over a batch item's rows.
    Writing a - mu = u + d with u = a - a* as in the forward, and using sum_a dl = 0,
        sum_a dl (a - mu) = S1,   sum_a dl (a - mu)^2 = S2 + 2d S1,   Sk = sum_a dl u^k:
    u is small where F is not, so these sums lose nothing to cancellation.
    """
    F, index, twice_gap, sigma2 = cache
    xp = get_array_module(F)
    B, M, A = F.shape
    ones = _ones(xp, A, F.dtype)
    steps = _pixel_steps(xp, index, F.dtype, A)
    s = ((dF * F).reshape(B * M, A) @ ones).reshape(B, M, 1)
    dl_u = _dlogits_times_steps(dF, F, s, steps)
    first = (dl_u.reshape(B * M, A) @ ones).reshape(B, M)                 # S1
    second = ((dl_u * steps).reshape(B * M, A) @ ones).reshape(B, M)      # S2
    second += twice_gap * first
    inv_var = 1.0 / sigma2
    dmu = first * inv_var[:, None]
    dsigma2 = (second @ _ones(xp, M, F.dtype)) * (0.5 * inv_var * inv_var)
    return dmu, dsigma2


# ---------------------------------------------------------------- eq 19-20, 25-26

def filterbank_forward(g, delta, sigma2, N, A):
    """One axis of the filterbank.

    g, delta, sigma2: (B,) centre, stride, variance;  N, A: ints
    -> F (B, N, A) with F[b, i, a] = exp(-(a - mu_i)^2 / (2 sigma^2)) / Z_i,
       mu_i = g + (i - N/2 - 0.5) delta  (eq 19-20), rows summing to 1 (eq 25-26).
    """
    xp = get_array_module(g)
    offsets = _constant(xp, "offsets", N, g.dtype, _offsets)              # (N,)
    mu = g[:, None] + offsets * delta[:, None]                            # (B, N)
    F, rows_cache = _gaussian_rows(mu, sigma2, A)
    return F, (rows_cache, offsets)


def filterbank_backward(dF, cache):
    """dF: (B, N, A) -> (dg, ddelta, dsigma2), each (B,)."""
    rows_cache, offsets = cache
    dmu, dsigma2 = _gaussian_rows_backward(dF, rows_cache)
    return dmu.sum(axis=1), dmu @ offsets, dsigma2


# ---------------------------------------------------------------- a whole window

def window_forward(p, height, width, N):
    """Attention parameters -> both filterbanks (eq 19-26).

    p: (B, 5) -> (Fy (B, N, H), Fx (B, N, W), gamma (B,)), cache
    """
    xp = get_array_module(p)
    q, pcache = _window_params(p, height, width, N)       # (gX, gY, sigma2, delta, gamma)
    mu = q[:, _CENTRE_PARAMS] @ _centre_map(xp, N, p.dtype)              # (B, 2N), eq 19-20
    sigma2, gamma = q[:, 2], q[:, 4]
    if height == width:
        # One pixel grid for both axes: one (B, 2N, A) softmax instead of two halves.
        F, rows_cache = _gaussian_rows(mu, sigma2, width)
        Fx, Fy = F[:, :N], F[:, N:]
        rows_caches = (rows_cache,)
    else:
        Fx, x_cache = _gaussian_rows(mu[:, :N], sigma2, width)
        Fy, y_cache = _gaussian_rows(mu[:, N:], sigma2, height)
        rows_caches = (x_cache, y_cache)
    return (Fy, Fx, gamma), (pcache, rows_caches)


def window_backward(dFy, dFx, dgamma, cache):
    """dFy (B, N, H), dFx (B, N, W), dgamma (B,) -> dp (B, 5)."""
    pcache, rows_caches = cache
    xp = get_array_module(dFx)
    N = dFx.shape[1]
    if len(rows_caches) == 1:
        dmu, dsigma2 = _gaussian_rows_backward(xp.concatenate([dFx, dFy], axis=1),
                                               rows_caches[0])
    else:
        dmu_x, dsigma2_x = _gaussian_rows_backward(dFx, rows_caches[0])
        dmu_y, dsigma2_y = _gaussian_rows_backward(dFy, rows_caches[1])
        dmu, dsigma2 = xp.concatenate([dmu_x, dmu_y], axis=1), dsigma2_x + dsigma2_y
    dq = dmu @ _centre_jacobian(xp, N, dmu.dtype)                          # (B, 5)
    dq[:, 2] = dsigma2
    dq[:, 4] = dgamma
    return _window_params_backward(dq, pcache)


# ---------------------------------------------------------------- eq 27

def read_forward(images, Fy, Fx, gamma):
    """Glimpse gamma * Fy img Fx^T for every plane (eq 27).

    images: (B, K, H, W)   Fy: (B, N, H)   Fx: (B, N, W)   gamma: (B,)
    -> glimpse (B, K, N, N), cache
    The images are not cached: by backward they are long out of the CPU caches, so
    their two products with the filters (small, and needed there) are cached instead.
    """
    B, K, H, W = images.shape
    N = Fy.shape[1]
    # rows[b, (j, k), y] = (img_k Fx^T)[y, j]: per filter j, one matrix-vector product over
    # all K*H image rows, which BLAS does faster than a product with only N columns.
    rows = (images.reshape(B, 1, K * H, W) @ Fx[:, :, :, None]).reshape(B, N * K, H)
    cols = (Fy[:, None] @ images).reshape(B, K * N, W)                     # Fy img_k
    unscaled = (Fy @ rows.transpose(0, 2, 1)).reshape(B, N, N, K).transpose(0, 3, 1, 2)
    return gamma[:, None, None, None] * unscaled, (Fy, Fx, gamma, rows, cols, unscaled)


def read_backward(dglimpse, cache, need_images=True, first_plane=0):
    """dglimpse: (B, K, N, N) -> (dimages (B, K - first_plane, H, W) or None, dFy, dFx, dgamma).

    The image gradient is computed for planes first_plane.. only, or not at all with
    need_images=False: the model needs it for x_hat, never for x.
    """
    Fy, Fx, gamma, rows, cols, unscaled = cache
    B, K, N, _ = dglimpse.shape
    H = Fy.shape[2]
    dgamma = _batch_dot(dglimpse, unscaled)
    dunscaled = gamma[:, None, None, None] * dglimpse
    # dFy[i, y] = sum over planes k and columns j of dunscaled[k, i, j] rows[(j, k), y]
    dFy = dunscaled.transpose(0, 2, 3, 1).reshape(B, N, N * K) @ rows            # (B, N, H)
    # dFx[j, x] = sum over planes k and rows i of dunscaled[k, i, j] cols[(k, i), x]
    dFx = dunscaled.transpose(0, 3, 1, 2).reshape(B, N, K * N) @ cols            # (B, N, W)
    dimages = None
    if need_images:
        planes = K - first_plane
        drows = (Fy.transpose(0, 2, 1)[:, None] @ dunscaled[:, first_plane:])    # Fy^T dU_k
        dimages = (drows.reshape(B, planes * H, N) @ Fx).reshape(B, planes, H, Fx.shape[2])
    return dimages, dFy, dFx, dgamma


# ---------------------------------------------------------------- eq 29

def write_forward(patch, Fy, Fx, gamma):
    """Write (1/gamma) * Fy^T w Fx for every plane (eq 29).

    patch: (B, K, N, N)   Fy: (B, N, H)   Fx: (B, N, W)   gamma: (B,)
    -> image (B, K, H, W), cache.
    The full-size image is not cached: backward needs only patch and filters.
    """
    B, K, N, _ = patch.shape
    W = Fx.shape[2]
    scaled = patch * (1.0 / gamma)[:, None, None, None]    # 1/gamma on the patch, not the image
    cols = (scaled.reshape(B, K * N, N) @ Fx).reshape(B, K, N, W)          # (w/gamma) Fx
    image = Fy.transpose(0, 2, 1)[:, None] @ cols                          # (B, K, H, W)
    return image, (patch, Fy, Fx, gamma, scaled)


def write_backward(dimage, cache):
    """dimage: (B, K, H, W) -> (dpatch (B, K, N, N), dFy, dFx, dgamma)."""
    patch, Fy, Fx, gamma, scaled = cache
    B, K, H, W = dimage.shape
    N = Fy.shape[1]
    # image_k = Fy^T S_k Fx with S = w/gamma. dimage meets Fx (over x) and Fy (over y)
    # once each, in the two full-size products; every gradient is small after them.
    dimage_fx = (dimage.reshape(B, K * H, W) @ Fx.transpose(0, 2, 1)).reshape(B, K, H, N)
    fy_dimage = (Fy[:, None] @ dimage).reshape(B, K * N, W)                # Fy dimage_k
    dpatch = (Fy[:, None] @ dimage_fx) * (1.0 / gamma)[:, None, None, None]
    # dFy[i, y] = sum over k, j of S_k[i, j] dimage_fx[k, y, j]
    dFy = (scaled.transpose(0, 2, 1, 3).reshape(B, N, K * N)
           @ dimage_fx.transpose(0, 1, 3, 2).reshape(B, K * N, H))
    # dFx[j, x] = sum over k, i of S_k[i, j] fy_dimage[(k, i), x]
    dFx = scaled.reshape(B, K * N, N).transpose(0, 2, 1) @ fy_dimage
    # image = U/gamma with U linear in patch, so <dimage, U>/gamma^2 = <dpatch, patch>/gamma
    dgamma = -_batch_dot(dpatch, patch) / gamma
    return dpatch, dFy, dFx, dgamma


def _batch_dot(a, b):
    """(B, ...) x (B, ...) -> (B,): sum of a * b over everything but the batch axis."""
    B = a.shape[0]
    return (a.reshape(B, 1, -1) @ b.reshape(B, -1, 1)).reshape(B)
