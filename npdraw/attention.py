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
A=28), so their cost is per-call overhead, not arithmetic: the number of array
operations, reductions along short rows (slow in NumPy), and how each product is
laid out for BLAS. Hence, below: constants built once, both axes' filters computed
as one array when H == W, row sums and moments taken as matrix products, and
products arranged so that the full-size images are the right-hand operand.
"""
from __future__ import annotations

import numpy as np

from .backend import fuse, get_array_module

P_ATTENTION = 5


# ---------------------------------------------------------------- cached constants

_CONSTANTS = {}


def _constant(xp, name, size, dtype, build):
    """A small constant array, built once per (array module, device, name, size, dtype).

    build(size) returns it as a NumPy array; it is then moved to xp's device. These
    arrays are shared by every call, so they are only ever read, never written.
    """
    device = None if xp is np else xp.cuda.get_device_id()
    key = (xp.__name__, device, name, size, np.dtype(dtype).str)
    value = _CONSTANTS.get(key)
    if value is None:
        value = _CONSTANTS[key] = xp.asarray(build(size).astype(dtype))
    return value


def _pixels(xp, A, dtype):
    """(A,): the pixel coordinates a = 1..A."""
    return _constant(xp, "pixels", A, dtype, lambda A: np.arange(1, A + 1))


def _ones(xp, A, dtype):
    """(A,) ones: `rows @ ones` sums short rows far faster than .sum(axis=-1) on NumPy."""
    return _constant(xp, "ones", A, dtype, np.ones)


def _offsets(N):
    """(N,) NumPy: i - N/2 - 0.5 for i = 1..N, the filter offsets of eq 19-20."""
    return np.arange(1, N + 1) - (N / 2 + 0.5)


def _centre_map(xp, N, dtype):
    """(3, 2N): maps (gX, gY, delta) to the 2N filter centres of eq 19-20.

    mu = [gX, gY, delta] @ map puts the x centres gX + offset_i * delta in columns
    0..N-1 and the y centres in N..2N-1. Being linear, its backward is dmu @ map.T.
    """
    def build(N):
        offsets = _offsets(N)
        zeros, ones = np.zeros(N), np.ones(N)
        return np.stack([np.concatenate([ones, zeros]),
                         np.concatenate([zeros, ones]),
                         np.concatenate([offsets, offsets])])
    return _constant(xp, "centre map", N, dtype, build)


def _moment_basis(xp, A):
    """(A, 3) float64: columns 1, a, a^2, to take a row's moments with one product."""
    return _constant(xp, "moment basis", A, np.float64,
                     lambda A: np.arange(1, A + 1)[:, None] ** np.arange(3))


# ---------------------------------------------------------------- eq 21-24

def attn_params_forward(p, height, width, N):
    """Map a linear layer's output to window parameters (eq 21-24).

    p: (B, 5) = (g~X, g~Y, log sigma^2, log delta~, log gamma)
    -> (gx, gy, delta, sigma2, gamma), each (B,); cache
    """
    xp = get_array_module(p)
    gx = 0.5 * (width + 1) * (p[:, 0] + 1.0)
    gy = 0.5 * (height + 1) * (p[:, 1] + 1.0)
    positive = xp.exp(p[:, 2:])          # sigma^2, delta~, gamma: one exp for all three
    sigma2, gamma = positive[:, 0], positive[:, 2]
    delta = (max(height, width) - 1) / max(N - 1, 1) * positive[:, 1]
    return (gx, gy, delta, sigma2, gamma), (height, width, delta, sigma2, gamma)


def attn_params_backward(dgx, dgy, ddelta, dsigma2, dgamma, cache):
    """Each argument (B,) -> dp (B, 5)."""
    height, width, delta, sigma2, gamma = cache
    xp = get_array_module(delta)
    return xp.stack([0.5 * (width + 1) * dgx,
                     0.5 * (height + 1) * dgy,
                     sigma2 * dsigma2,
                     delta * ddelta,
                     gamma * dgamma], axis=1)


# ---------------------------------------------------------------- eq 25-26, as a softmax

@fuse
def _gaussian_logits_exp(pixels, nearest, twice_gap, neg_inv_two_var):
    """exp of each logit minus its row's maximum; see _gaussian_rows."""
    u = pixels - nearest
    return np.exp(neg_inv_two_var * u * (u + twice_gap))


def _gaussian_rows(mu, sigma2, A):
    """Rows of normalised Gaussians (eq 25-26) for any number of centres.

    mu: (B, M) centres;  sigma2: (B,);  A: int
    -> F (B, M, A), F[b, m, a] = softmax over a of -(a - mu[b, m])^2 / (2 sigma2[b]).

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
    dtype = mu.dtype
    nearest = xp.clip(xp.rint(mu), 1, A)
    F = _gaussian_logits_exp(_pixels(xp, A, dtype), nearest[:, :, None],
                             (2 * (nearest - mu))[:, :, None], (-0.5 / sigma2)[:, None, None])
    Z = F.reshape(B * M, A) @ _ones(xp, A, dtype)                         # (B*M,) row sums
    F *= (1.0 / Z).reshape(B, M, 1)
    return F


def _gaussian_rows_backward(dF, F, mu, sigma2):
    """dF: (B, M, A) -> (dmu (B, M), dsigma2 (B,)), for F = _gaussian_rows(mu, sigma2, A).

    With logits l_a = -(a - mu)^2 / (2 sigma^2), the softmax backward is
    dl = F (dF - s), s = sum_a F dF, and then
        dmu     = sum_a dl (a - mu)   / sigma^2
        dsigma2 = sum_a dl (a - mu)^2 / (2 sigma^4),  summed over the rows of a batch item.
    As sum_a dl = 0, both sums follow from the moments sum_a P a^k and sum_a F a^k
    (P = dF * F, k = 0, 1, 2), which one product with the basis (1, a, a^2) gives for
    every row at once. They are taken in float64: the a^k terms are large next to
    what is left after the cancellation, and float64 keeps that difference exact to
    float32 precision.
    """
    xp = get_array_module(F)
    B, M, A = F.shape
    weights = xp.empty((2, B * M, A), dtype=np.float64)
    xp.multiply(dF.reshape(B * M, A), F.reshape(B * M, A), out=weights[0])   # P
    weights[1] = F.reshape(B * M, A)
    moments = (weights.reshape(2 * B * M, A) @ _moment_basis(xp, A)).reshape(2, B, M, 3)
    P_moments, F_moments = moments[0], moments[1]
    s = P_moments[:, :, :1]
    F_means = F_moments[:, :, 1:] / F_moments[:, :, :1]    # E_F[a], E_F[a^2]: rows renormalised
    dl_moments = P_moments[:, :, 1:] - s * F_means          # sum_a dl a, sum_a dl a^2
    mu64 = mu.astype(np.float64)
    first = dl_moments[:, :, 0]                             # sum_a dl (a - mu)
    second = dl_moments[:, :, 1] - 2.0 * mu64 * first       # sum_a dl (a - mu)^2
    inv_var = 1.0 / sigma2.astype(np.float64)
    dmu = first * inv_var[:, None]
    dsigma2 = second.sum(axis=1) * (0.5 * inv_var * inv_var)
    return dmu.astype(F.dtype), dsigma2.astype(F.dtype)


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
    F = _gaussian_rows(mu, sigma2, A)
    return F, (F, mu, sigma2, offsets)


def filterbank_backward(dF, cache):
    """dF: (B, N, A) -> (dg, ddelta, dsigma2), each (B,)."""
    F, mu, sigma2, offsets = cache
    dmu, dsigma2 = _gaussian_rows_backward(dF, F, mu, sigma2)
    return dmu.sum(axis=1), dmu @ offsets, dsigma2


# ---------------------------------------------------------------- a whole window

def window_forward(p, height, width, N):
    """Attention parameters -> both filterbanks (eq 19-26).

    p: (B, 5) -> (Fy (B, N, H), Fx (B, N, W), gamma (B,)), cache
    """
    xp = get_array_module(p)
    (gx, gy, delta, sigma2, gamma), pcache = attn_params_forward(p, height, width, N)
    B = p.shape[0]
    mu = xp.stack([gx, gy, delta], axis=1) @ _centre_map(xp, N, p.dtype)   # (B, 2N), eq 19-20
    if height == width:
        # One pixel grid for both axes: one (B, 2N, A) softmax instead of two halves.
        F = _gaussian_rows(mu, sigma2, width)
        Fx, Fy = F[:, :N], F[:, N:]
        rows = ((F, mu),)
    else:
        Fx = _gaussian_rows(mu[:, :N], sigma2, width)
        Fy = _gaussian_rows(mu[:, N:], sigma2, height)
        rows = ((Fx, mu[:, :N]), (Fy, mu[:, N:]))
    return (Fy, Fx, gamma), (pcache, sigma2, rows)


def window_backward(dFy, dFx, dgamma, cache):
    """dFy (B, N, H), dFx (B, N, W), dgamma (B,) -> dp (B, 5)."""
    pcache, sigma2, rows = cache
    xp = get_array_module(dFx)
    N = dFx.shape[1]
    if len(rows) == 1:
        (F, mu), = rows
        dmu, dsigma2 = _gaussian_rows_backward(xp.concatenate([dFx, dFy], axis=1), F, mu, sigma2)
    else:
        (Fx, mu_x), (Fy, mu_y) = rows
        dmu_x, dsigma2_x = _gaussian_rows_backward(dFx, Fx, mu_x, sigma2)
        dmu_y, dsigma2_y = _gaussian_rows_backward(dFy, Fy, mu_y, sigma2)
        dmu, dsigma2 = xp.concatenate([dmu_x, dmu_y], axis=1), dsigma2_x + dsigma2_y
    dcentre = dmu @ _centre_map(xp, N, dmu.dtype).T                       # (B, 3): dgx, dgy, ddelta
    return attn_params_backward(dcentre[:, 0], dcentre[:, 1], dcentre[:, 2], dsigma2,
                                dgamma, pcache)


# ---------------------------------------------------------------- eq 27

def read_forward(images, Fy, Fx, gamma):
    """Glimpse gamma * Fy img Fx^T for every plane (eq 27).

    images: (B, K, H, W)   Fy: (B, N, H)   Fx: (B, N, W)   gamma: (B,)
    -> glimpse (B, K, N, N), cache
    """
    B, K, H, W = images.shape
    N = Fy.shape[1]
    # All K planes stacked as one (K*H, W) matrix per batch item: B products, not B*K.
    rows = (images.reshape(B, K * H, W) @ Fx.transpose(0, 2, 1)).reshape(B, K, H, N)
    unscaled = Fy[:, None] @ rows                                         # (B, K, N, N)
    return gamma[:, None, None, None] * unscaled, (images, Fy, Fx, gamma, rows, unscaled)


def read_backward(dglimpse, cache, need_images=True):
    """dglimpse: (B, K, N, N) -> (dimages (B, K, H, W) or None, dFy, dFx, dgamma).

    need_images=False skips the image gradient, which the model never needs for x.
    """
    images, Fy, Fx, gamma, rows, unscaled = cache
    B, K, H, W = images.shape
    N = Fy.shape[1]
    dgamma = _batch_dot(dglimpse, unscaled)
    dunscaled = gamma[:, None, None, None] * dglimpse
    # dFy[i, y] = sum over planes k and columns j of dunscaled[k, i, j] rows[k, y, j]:
    # with (k, j) brought together on both sides it is one product per batch item.
    dFy = (dunscaled.transpose(0, 2, 1, 3).reshape(B, N, K * N)
           @ rows.transpose(0, 1, 3, 2).reshape(B, K * N, H))                 # (B, N, H)
    drows = (Fy.transpose(0, 2, 1)[:, None] @ dunscaled).reshape(B, K * H, N)
    dFx = drows.transpose(0, 2, 1) @ images.reshape(B, K * H, W)              # (B, N, W), summed over k
    dimages = (drows @ Fx).reshape(B, K, H, W) if need_images else None
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
    # 1/gamma scales the small patch, not the full-size image.
    scaled = patch * (1.0 / gamma)[:, None, None, None]
    cols = (scaled.reshape(B, K * N, N) @ Fx).reshape(B, K, N, W)          # (w/gamma) Fx
    image = Fy.transpose(0, 2, 1)[:, None] @ cols                          # (B, K, H, W)
    return image, (patch, Fy, Fx, gamma, scaled, cols)


def write_backward(dimage, cache):
    """dimage: (B, K, H, W) -> (dpatch (B, K, N, N), dFy, dFx, dgamma)."""
    patch, Fy, Fx, gamma, scaled, cols = cache
    B, K, N, _ = patch.shape
    W = Fx.shape[2]
    # Every gradient goes through Fy dimage_k (small) or contracts dimage with cols.
    fy_dimage = Fy[:, None] @ dimage                                       # (B, K, N, W)
    dpatch = (fy_dimage @ Fx.transpose(0, 2, 1)[:, None]) * (1.0 / gamma)[:, None, None, None]
    dFx = scaled.reshape(B, K * N, N).transpose(0, 2, 1) @ fy_dimage.reshape(B, K * N, W)
    dFy = (cols @ dimage.transpose(0, 1, 3, 2)).sum(axis=1)                 # (B, N, H)
    # image = U/gamma with U linear in patch, so <dimage, U>/gamma^2 = <dpatch, patch>/gamma
    dgamma = -_batch_dot(dpatch, patch) / gamma
    return dpatch, dFy, dFx, dgamma


def _batch_dot(a, b):
    """(B, ...) x (B, ...) -> (B,): sum of a * b over everything but the batch axis."""
    B = a.shape[0]
    return (a.reshape(B, 1, -1) @ b.reshape(B, -1, 1)).reshape(B)
