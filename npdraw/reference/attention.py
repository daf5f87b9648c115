"""DRAW's selective attention (paper section 3.2), plainly: the window that one linear map
of h_dec sets, the Gaussian filterbank, and the read and write through it.

Dimension legend
    B  batch
    H, W  image height and width
    A  one image axis (H or W)
    N  a window size (Nr read, Nw write)
    G  image planes read or written at once

Top-down, as the heads use it:
    window_forward (eq 21-26): p = (g~X, g~Y, log sigma^2, log delta~, log gamma)
        -> filterbanks Fy (B, N, H), Fx (B, N, W) and the intensity gamma
    read_forward (eq 27):   read(x) = gamma Fy x Fx^T, an N x N glimpse of every plane
    write_forward (eq 29):  write(w) = (1 / gamma) Fy^T w Fx, an N x N patch put back
    window_params_forward (eq 22-24) and filterbank_forward (eq 19-20, 25-26) below them.
Each `*_forward` returns (out, cache); its `*_backward(dout, cache)` returns the
gradients of its inputs.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_array_module


class WindowCache(NamedTuple):
    params: tuple       # window_params_forward's cache: ((gX, gY, sigma2, delta, gamma), H, W)
    y: tuple            # filterbank_forward's cache for the rows (Fy)
    x: tuple            # filterbank_forward's cache for the columns (Fx)


# ---------------------------------------------------------------- the window (eq 21-26)

def window_forward(p, height, width, N):
    """Eq 21-26, both axes' filters of one window.

    p (B, 5), the linear map of h_dec of eq 21 -> (Fy (B, N, H), Fx (B, N, W), gamma (B,)),
    cache. Both axes share the stride delta and the variance sigma^2.
    """
    (gX, gY, sigma2, delta, gamma), params_cache = window_params_forward(p, height, width, N)
    Fy, y_cache = filterbank_forward(gY, delta, sigma2, N, height)
    Fx, x_cache = filterbank_forward(gX, delta, sigma2, N, width)
    return (Fy, Fx, gamma), WindowCache(params_cache, y_cache, x_cache)


def window_backward(dFy, dFx, dgamma, cache):
    """dFy (B, N, H), dFx (B, N, W), dgamma (B,) -> dp (B, 5).
    delta and sigma^2 feed both axes, so their gradients are the sums of both."""
    dgY, ddelta_y, dsigma2_y = filterbank_backward(dFy, cache.y)
    dgX, ddelta_x, dsigma2_x = filterbank_backward(dFx, cache.x)
    return window_params_backward((dgX, dgY, dsigma2_x + dsigma2_y, ddelta_x + ddelta_y,
                                   dgamma), cache.params)


def window_values(cache):
    """(gX, gY, sigma2, delta, gamma), each (B,), from a window_forward cache."""
    return cache.params[0]


# ---------------------------------------------------------------- read (eq 27), write (eq 29)

def read_forward(images, Fy, Fx, gamma):
    """Eq 27, read = gamma Fy img Fx^T, of every plane.
    images (B, G, H, W)   Fy (B, N, H)   Fx (B, N, W)   gamma (B,) -> (B, G, N, N), cache"""
    unscaled = Fy[:, None] @ images @ Fx[:, None].transpose(0, 1, 3, 2)
    return gamma[:, None, None, None] * unscaled, (images, Fy, Fx, gamma, unscaled)


def read_backward(dglimpse, cache):
    """dglimpse (B, G, N, N) -> (dimages (B, G, H, W), dFy (B, N, H), dFx (B, N, W), dgamma (B,)).
    With U = Fy img Fx^T and dU = gamma dglimpse: dimg = Fy^T dU Fx, dFy = sum over planes of
    dU Fx img^T, dFx = sum of dU^T Fy img, dgamma = sum dglimpse * U."""
    images, Fy, Fx, gamma, unscaled = cache
    dunscaled = gamma[:, None, None, None] * dglimpse
    dimages = Fy[:, None].transpose(0, 1, 3, 2) @ dunscaled @ Fx[:, None]
    dFy = (dunscaled @ Fx[:, None] @ images.transpose(0, 1, 3, 2)).sum(axis=1)
    dFx = (dunscaled.transpose(0, 1, 3, 2) @ Fy[:, None] @ images).sum(axis=1)
    dgamma = (dglimpse * unscaled).sum(axis=(1, 2, 3))
    return dimages, dFy, dFx, dgamma


def write_forward(patch, Fy, Fx, gamma):
    """Eq 29, write = (1 / gamma) Fy^T w Fx, of every plane.
    patch (B, G, N, N)   Fy (B, N, H)   Fx (B, N, W)   gamma (B,) -> (B, G, H, W), cache"""
    image = Fy[:, None].transpose(0, 1, 3, 2) @ patch @ Fx[:, None] / gamma[:, None, None, None]
    return image, (patch, Fy, Fx, gamma, image)


def write_backward(dimage, cache):
    """dimage (B, G, H, W) -> (dpatch (B, G, N, N), dFy (B, N, H), dFx (B, N, W), dgamma (B,)).
    With dV = dimage / gamma: dw = Fy dV Fx^T, dFy = sum of w Fx dV^T, dFx = sum of
    w^T Fy dV, and d(1/gamma)/dgamma = -1/gamma^2 gives dgamma = -sum dimage * image / gamma."""
    patch, Fy, Fx, gamma, image = cache
    dunscaled = dimage / gamma[:, None, None, None]
    dpatch = Fy[:, None] @ dunscaled @ Fx[:, None].transpose(0, 1, 3, 2)
    dFy = (patch @ Fx[:, None] @ dunscaled.transpose(0, 1, 3, 2)).sum(axis=1)
    dFx = (patch.transpose(0, 1, 3, 2) @ Fy[:, None] @ dunscaled).sum(axis=1)
    dgamma = -(dimage * image).sum(axis=(1, 2, 3)) / gamma
    return dpatch, dFy, dFx, dgamma


# ---------------------------------------------------------------- window parameters (eq 22-24)

def window_params_forward(p, height, width, N):
    """The window's values from p (B, 5) = (g~X, g~Y, log sigma^2, log delta~, log gamma):

        gX = (W + 1)/2 (g~X + 1),   gY = (H + 1)/2 (g~Y + 1)          (eq 22-23)
        delta = (max(H, W) - 1)/(N - 1) exp(log delta~)               (eq 24)
        sigma^2 = exp(log sigma^2),  gamma = exp(log gamma)

    -> ((gX, gY, sigma2, delta, gamma), each (B,)), cache. N = 1 divides the stride by
    max(N - 1, 1): one filter sits at g whatever delta is.
    """
    xp = get_array_module(p)
    gX = (width + 1) / 2 * (p[:, 0] + 1)
    gY = (height + 1) / 2 * (p[:, 1] + 1)
    sigma2 = xp.exp(p[:, 2])
    delta = (max(height, width) - 1) / max(N - 1, 1) * xp.exp(p[:, 3])
    gamma = xp.exp(p[:, 4])
    values = (gX, gY, sigma2, delta, gamma)
    return values, (values, height, width)


def window_params_backward(dvalues, cache):
    """dvalues: (dgX, dgY, dsigma2, ddelta, dgamma), each (B,) -> dp (B, 5).
    Linear in g~ (slopes (W+1)/2, (H+1)/2); d exp(u)/du = exp(u) for the other three."""
    (_, _, sigma2, delta, gamma), height, width = cache
    dgX, dgY, dsigma2, ddelta, dgamma = dvalues
    xp = get_array_module(dgX)
    return xp.stack([(width + 1) / 2 * dgX, (height + 1) / 2 * dgY, dsigma2 * sigma2,
                     ddelta * delta, dgamma * gamma], axis=1)


# ---------------------------------------------------------------- the filterbank (eq 19-20, 25-26)

def filterbank_forward(g, delta, sigma2, N, A):
    """One axis of a window: g, delta, sigma2 (B,) -> F (B, N, A), cache.

        mu_i = g + (i - N/2 - 0.5) delta,  i = 1..N                    (eq 19-20)
        F[i, a] = exp(-(a - mu_i)^2 / (2 sigma^2)) / Z_i,  a = 1..A    (eq 25-26)

    with Z_i = sum_a exp(...), computed as a softmax over a (row maximum subtracted, so
    Z_i >= 1, never 0).
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
    """dF (B, N, A) -> (dg, ddelta, dsigma2), each (B,).
    Softmax backward dl = F (dF - sum_a dF F); l = -(a - mu)^2 / (2 sigma^2) gives
    dl/dmu = (a - mu) / sigma^2 and dl/dsigma^2 = (a - mu)^2 / (2 sigma^4); mu_i moves
    with g at slope 1 and with delta at slope offset_i."""
    F, diff, sigma2, offsets = cache
    dlogits = F * (dF - (dF * F).sum(axis=2, keepdims=True))            # softmax backward
    dmu = (dlogits * diff).sum(axis=2) / sigma2[:, None]                 # (B, N)
    dsigma2 = (dlogits * diff * diff).sum(axis=(1, 2)) / (2 * sigma2 * sigma2)
    return dmu.sum(axis=1), dmu @ offsets, dsigma2
