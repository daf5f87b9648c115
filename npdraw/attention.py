"""Selective attention (paper section 3.2, eq 19-29), as paired forward/backward.

Dimension legend
    B  batch               K  image planes read or written at once (C, or 2C for [x, x_hat])
    H  image height        W  image width
    A  one image axis (H or W)
    N  attention window size (read_n or write_n)
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
"""
from __future__ import annotations

from .backend import get_array_module

P_ATTENTION = 5


# ---------------------------------------------------------------- eq 21-24

def attn_params_forward(p, height, width, N):
    """Map a linear layer's output to window parameters (eq 21-24).

    p: (B, 5) = (g~X, g~Y, log sigma^2, log delta~, log gamma)
    -> (gx, gy, delta, sigma2, gamma), each (B,); cache
    """
    xp = get_array_module(p)
    gx = 0.5 * (width + 1) * (p[:, 0] + 1.0)
    gy = 0.5 * (height + 1) * (p[:, 1] + 1.0)
    sigma2 = xp.exp(p[:, 2])
    delta = (max(height, width) - 1) / max(N - 1, 1) * xp.exp(p[:, 3])
    gamma = xp.exp(p[:, 4])
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


# ---------------------------------------------------------------- eq 19-20, 25-26

def filterbank_forward(g, delta, sigma2, N, A):
    """One axis of the filterbank.

    g, delta, sigma2: (B,) centre, stride, variance;  N, A: ints
    -> F (B, N, A) with F[b, i, a] = exp(-(a - mu_i)^2 / (2 sigma^2)) / Z_i,
       mu_i = g + (i - N/2 - 0.5) delta  (eq 19-20), rows summing to 1 (eq 25-26).
    """
    xp = get_array_module(g)
    dtype = g.dtype
    offsets = xp.arange(1, N + 1, dtype=dtype) - (N / 2 + 0.5)           # (N,)
    pixels = xp.arange(1, A + 1, dtype=dtype)                             # (A,)
    mu = g[:, None] + offsets[None, :] * delta[:, None]                   # (B, N)
    diff = pixels[None, None, :] - mu[:, :, None]                         # (B, N, A)
    inv_two_var = 0.5 / sigma2
    logits = -(diff * diff) * inv_two_var[:, None, None]
    logits = logits - logits.max(axis=-1, keepdims=True)
    F = xp.exp(logits)
    F /= F.sum(axis=-1, keepdims=True)
    return F, (F, diff, sigma2, offsets)


def filterbank_backward(dF, cache):
    """dF: (B, N, A) -> (dg, ddelta, dsigma2), each (B,)."""
    F, diff, sigma2, offsets = cache
    dlogits = F * (dF - (dF * F).sum(axis=-1, keepdims=True))          # softmax backward
    inv_var = 1.0 / sigma2
    dmu = (dlogits * diff).sum(axis=-1) * inv_var[:, None]              # (B, N)
    dsigma2 = (dlogits * diff * diff).sum(axis=(1, 2)) * (0.5 * inv_var * inv_var)
    return dmu.sum(axis=1), dmu @ offsets, dsigma2


# ---------------------------------------------------------------- a whole window

def window_forward(p, height, width, N):
    """Attention parameters -> both filterbanks (eq 19-26).

    p: (B, 5) -> (Fy (B, N, H), Fx (B, N, W), gamma (B,)), cache
    """
    (gx, gy, delta, sigma2, gamma), pcache = attn_params_forward(p, height, width, N)
    Fx, xcache = filterbank_forward(gx, delta, sigma2, N, width)
    Fy, ycache = filterbank_forward(gy, delta, sigma2, N, height)
    return (Fy, Fx, gamma), (pcache, xcache, ycache)


def window_backward(dFy, dFx, dgamma, cache):
    """dFy (B, N, H), dFx (B, N, W), dgamma (B,) -> dp (B, 5)."""
    pcache, xcache, ycache = cache
    dgx, ddelta_x, dsigma2_x = filterbank_backward(dFx, xcache)
    dgy, ddelta_y, dsigma2_y = filterbank_backward(dFy, ycache)
    return attn_params_backward(dgx, dgy, ddelta_x + ddelta_y, dsigma2_x + dsigma2_y,
                                dgamma, pcache)


# ---------------------------------------------------------------- eq 27

def read_forward(images, Fy, Fx, gamma):
    """Glimpse gamma * Fy img Fx^T for every plane (eq 27).

    images: (B, K, H, W)   Fy: (B, N, H)   Fx: (B, N, W)   gamma: (B,)
    -> glimpse (B, K, N, N), cache
    """
    rows = images @ Fx.transpose(0, 2, 1)[:, None]          # (B, K, H, N)
    unscaled = Fy[:, None] @ rows                             # (B, K, N, N)
    return gamma[:, None, None, None] * unscaled, (images, Fy, Fx, gamma, rows, unscaled)


def read_backward(dglimpse, cache, need_images=True):
    """dglimpse: (B, K, N, N) -> (dimages (B, K, H, W) or None, dFy, dFx, dgamma).

    need_images=False skips the image gradient, which the model never needs for x.
    """
    images, Fy, Fx, gamma, rows, unscaled = cache
    dgamma = (dglimpse * unscaled).sum(axis=(1, 2, 3))
    dunscaled = gamma[:, None, None, None] * dglimpse
    dFy = (dunscaled @ rows.transpose(0, 1, 3, 2)).sum(axis=1)                  # (B, N, H)
    drows = Fy.transpose(0, 2, 1)[:, None] @ dunscaled                          # (B, K, H, N)
    dFx = (drows.transpose(0, 1, 3, 2) @ images).sum(axis=1)                    # (B, N, W)
    dimages = drows @ Fx[:, None] if need_images else None
    return dimages, dFy, dFx, dgamma


# ---------------------------------------------------------------- eq 29

def write_forward(patch, Fy, Fx, gamma):
    """Write (1/gamma) * Fy^T w Fx for every plane (eq 29).

    patch: (B, K, N, N)   Fy: (B, N, H)   Fx: (B, N, W)   gamma: (B,)
    -> image (B, K, H, W), cache.
    The full-size image is not cached: backward needs only patch and filters.
    """
    cols = Fy.transpose(0, 2, 1)[:, None] @ patch          # (B, K, H, N)
    image = (cols @ Fx[:, None]) / gamma[:, None, None, None]
    return image, (patch, Fy, Fx, gamma, cols)


def write_backward(dimage, cache):
    """dimage: (B, K, H, W) -> (dpatch (B, K, N, N), dFy, dFx, dgamma)."""
    patch, Fy, Fx, gamma, cols = cache
    inv_gamma = (1.0 / gamma)[:, None, None, None]
    dunscaled = dimage * inv_gamma
    dFx = (cols.transpose(0, 1, 3, 2) @ dunscaled).sum(axis=1)                 # (B, N, W)
    dcols = dunscaled @ Fx.transpose(0, 2, 1)[:, None]                          # (B, K, H, N)
    dpatch = Fy[:, None] @ dcols                                                # (B, K, N, N)
    dFy = (dcols @ patch.transpose(0, 1, 3, 2)).sum(axis=1).transpose(0, 2, 1)  # (B, N, H)
    # image = U/gamma with U linear in patch, so <dimage, U>/gamma^2 = <dpatch, patch>/gamma
    dgamma = -(dpatch * patch).sum(axis=(1, 2, 3)) / gamma
    return dpatch, dFy, dFx, dgamma
