"""npdraw.attention: gradient checks and comparison with plain nested loops."""
import math

import numpy as np
import pytest

from npdraw import attention as att
from gradcheck import numeric_grad, rel_err

TOL = 1e-6  # reached: these checks land below about 1e-8


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def naive_filterbank(g, delta, sigma2, N, A):
    """eq 19-20, 25-26 written as loops over the batch, filters and pixels."""
    B = len(g)
    F = np.zeros((B, N, A))
    for b in range(B):
        for i in range(1, N + 1):
            mu = g[b] + (i - N / 2 - 0.5) * delta[b]
            for a in range(1, A + 1):
                F[b, i - 1, a - 1] = math.exp(-(a - mu) ** 2 / (2 * sigma2[b]))
            F[b, i - 1] /= F[b, i - 1].sum()
    return F


def naive_read(images, Fy, Fx, gamma):
    B, K, H, W = images.shape
    N = Fy.shape[1]
    out = np.zeros((B, K, N, N))
    for b in range(B):
        for k in range(K):
            for i in range(N):
                for j in range(N):
                    total = 0.0
                    for y in range(H):
                        for x in range(W):
                            total += Fy[b, i, y] * images[b, k, y, x] * Fx[b, j, x]
                    out[b, k, i, j] = gamma[b] * total
    return out


def naive_write(patch, Fy, Fx, gamma):
    B, K, N, _ = patch.shape
    H, W = Fy.shape[2], Fx.shape[2]
    out = np.zeros((B, K, H, W))
    for b in range(B):
        for k in range(K):
            for y in range(H):
                for x in range(W):
                    total = 0.0
                    for i in range(N):
                        for j in range(N):
                            total += Fy[b, i, y] * patch[b, k, i, j] * Fx[b, j, x]
                    out[b, k, y, x] = total / gamma[b]
    return out


def random_window(rng, B, H, W, N):
    p = 0.3 * rng.standard_normal((B, 5))
    (Fy, Fx, gamma), _ = att.window_forward(p, H, W, N)
    return Fy, Fx, gamma


@pytest.mark.parametrize("N,A", [(1, 5), (2, 7), (5, 6)])
def test_filterbank_matches_loops(rng, N, A):
    B = 3
    g = rng.uniform(0, A + 1, B)
    delta = rng.uniform(0.2, 2.0, B)
    sigma2 = rng.uniform(0.3, 3.0, B)
    F, _ = att.filterbank_forward(g, delta, sigma2, N, A)
    np.testing.assert_allclose(F, naive_filterbank(g, delta, sigma2, N, A), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(F.sum(axis=2), 1.0, rtol=1e-12)


def test_filterbank_survives_tiny_sigma_far_outside():
    """The normaliser is guarded: a window far off the image still gives finite rows."""
    F, _ = att.filterbank_forward(np.array([-500.0]), np.array([1.0]), np.array([1e-6]), 3, 10)
    assert np.isfinite(F).all()
    np.testing.assert_allclose(F.sum(axis=2), 1.0)
    assert F[0, :, 0].min() > 0.999  # all the mass on the nearest pixel


def test_attention_params_mapping(rng):
    """eq 22-24: centre of the image at g~=0, stride (max(H,W)-1)/(N-1) at delta~=1."""
    H, W, N = 6, 9, 4
    p = np.zeros((1, 5))
    (gx, gy, delta, sigma2, gamma), _ = att.attn_params_forward(p, H, W, N)
    assert (gx[0], gy[0]) == ((W + 1) / 2, (H + 1) / 2)
    assert delta[0] == pytest.approx((max(H, W) - 1) / (N - 1))
    assert sigma2[0] == gamma[0] == 1.0
    (_, _, delta1, _, _), _ = att.attn_params_forward(p, H, W, 1)
    assert np.isfinite(delta1).all()


def test_attention_params_gradients(rng):
    p = rng.standard_normal((3, 5))
    proj = rng.standard_normal((5, 3))

    def f():
        outs, _ = att.attn_params_forward(p, 7, 5, 3)
        return float(sum((o * w).sum() for o, w in zip(outs, proj)))

    _, cache = att.attn_params_forward(p, 7, 5, 3)
    dp = att.attn_params_backward(*proj, cache)
    assert rel_err(dp.ravel(), numeric_grad(f, p)) < TOL


@pytest.mark.parametrize("N", [1, 3])
def test_filterbank_gradients(rng, N):
    B, A = 3, 6
    g = rng.uniform(1, A, B)
    delta = rng.uniform(0.5, 1.5, B)
    sigma2 = rng.uniform(0.5, 2.0, B)
    proj = rng.standard_normal((B, N, A))

    def f():
        return float((att.filterbank_forward(g, delta, sigma2, N, A)[0] * proj).sum())

    _, cache = att.filterbank_forward(g, delta, sigma2, N, A)
    dg, ddelta, dsigma2 = att.filterbank_backward(proj, cache)
    assert rel_err(dg, numeric_grad(f, g)) < TOL
    assert rel_err(ddelta, numeric_grad(f, delta)) < TOL
    assert rel_err(dsigma2, numeric_grad(f, sigma2)) < TOL


def test_window_gradients(rng):
    B, H, W, N = 2, 5, 7, 3
    p = 0.5 * rng.standard_normal((B, 5))
    py, px, pg = rng.standard_normal((B, N, H)), rng.standard_normal((B, N, W)), rng.standard_normal(B)

    def f():
        (Fy, Fx, gamma), _ = att.window_forward(p, H, W, N)
        return float((Fy * py).sum() + (Fx * px).sum() + (gamma * pg).sum())

    _, cache = att.window_forward(p, H, W, N)
    assert rel_err(att.window_backward(py, px, pg, cache).ravel(), numeric_grad(f, p)) < TOL


@pytest.mark.parametrize("H, W", [(6, 6), (5, 7)])
def test_two_windows_at_once_equal_each_alone_and_gradients(rng, H, W):
    """windows_forward over (write, read) sizes gives each window's own filters, through
    one shared softmax (H == W) or one per axis; its backward is checked numerically."""
    B, Ns = 3, (4, 2)
    p = 0.5 * rng.standard_normal((B, 5 * len(Ns)))
    windows, cache = att.windows_forward(p, H, W, Ns)
    for w, N in enumerate(Ns):
        (Fy, Fx, gamma), _ = att.window_forward(p[:, 5 * w:5 * w + 5], H, W, N)
        np.testing.assert_allclose(windows[w][0], Fy, rtol=1e-14)
        np.testing.assert_allclose(windows[w][1], Fx, rtol=1e-14)
        np.testing.assert_allclose(windows[w][2], gamma, rtol=1e-14)
    projections = [(rng.standard_normal((B, N, H)), rng.standard_normal((B, N, W)),
                    rng.standard_normal(B)) for N in Ns]

    def f():
        out, _ = att.windows_forward(p, H, W, Ns)
        return float(sum((Fy * py).sum() + (Fx * px).sum() + (g * pg).sum()
                         for (Fy, Fx, g), (py, px, pg) in zip(out, projections)))

    dp = att.windows_backward(projections, cache)
    assert dp.shape == p.shape
    assert rel_err(dp.ravel(), numeric_grad(f, p)) < TOL


def test_read_matches_loops_and_gradients(rng):
    B, K, H, W, N = 2, 3, 5, 4, 3
    images = rng.random((B, K, H, W))
    Fy, Fx, gamma = random_window(rng, B, H, W, N)
    out, cache = att.read_forward(images, Fy, Fx, gamma)
    np.testing.assert_allclose(out, naive_read(images, Fy, Fx, gamma), rtol=1e-12)

    proj = rng.standard_normal(out.shape)

    def f():
        return float((att.read_forward(images, Fy, Fx, gamma)[0] * proj).sum())

    dimages, dFy, dFx, dgamma = att.read_backward(proj, cache)
    for analytic, array in ((dimages, images), (dFy, Fy), (dFx, Fx), (dgamma, gamma)):
        assert rel_err(analytic.ravel(), numeric_grad(f, array)) < TOL
    assert att.read_backward(proj, cache, need_images=False)[0] is None
    np.testing.assert_allclose(att.read_backward(proj, cache, first_plane=1)[0], dimages[:, 1:],
                               rtol=1e-12)


def test_write_matches_loops_and_gradients(rng):
    B, K, H, W, N = 2, 3, 6, 5, 4
    patch = rng.standard_normal((B, K, N, N))
    Fy, Fx, gamma = random_window(rng, B, H, W, N)
    out, cache = att.write_forward(patch, Fy, Fx, gamma)
    np.testing.assert_allclose(out, naive_write(patch, Fy, Fx, gamma), rtol=1e-12)

    proj = rng.standard_normal(out.shape)

    def f():
        return float((att.write_forward(patch, Fy, Fx, gamma)[0] * proj).sum())

    dpatch, dFy, dFx, dgamma = att.write_backward(proj, cache)
    for analytic, array in ((dpatch, patch), (dFy, Fy), (dFx, Fx), (dgamma, gamma)):
        assert rel_err(analytic.ravel(), numeric_grad(f, array)) < TOL


def test_full_window_over_image_reads_its_mean():
    """N=1, centred, huge sigma: the glimpse is gamma times the image mean."""
    rng = np.random.default_rng(0)
    H, W = 8, 6
    img = rng.random((1, 1, H, W))
    p = np.array([[0.0, 0.0, np.log(1e8), 0.0, np.log(2.0)]])
    (Fy, Fx, gamma), _ = att.window_forward(p, H, W, 1)
    out, _ = att.read_forward(img, Fy, Fx, gamma)
    assert out[0, 0, 0, 0] == pytest.approx(2.0 * img.mean(), rel=1e-6)


def test_attention_keeps_float32(rng):
    p = rng.standard_normal((2, 5)).astype(np.float32)
    (Fy, Fx, gamma), wcache = att.window_forward(p, 6, 5, 3)
    img = rng.random((2, 2, 6, 5)).astype(np.float32)
    out, rcache = att.read_forward(img, Fy, Fx, gamma)
    dimg, dFy, dFx, dgamma = att.read_backward(out, rcache)
    dp = att.window_backward(dFy, dFx, dgamma, wcache)
    assert {a.dtype for a in (Fy, Fx, gamma, out, dimg, dp)} == {np.dtype(np.float32)}


# ---------------------------------------------------------------- both window layouts, float32

@pytest.mark.parametrize("H,W", [(6, 6), (5, 7)])
@pytest.mark.parametrize("N", [1, 3])
def test_window_filters_match_loops(rng, H, W, N):
    """window_forward's filters, from one (B, 2N, A) softmax when H == W or one per axis
    otherwise, are eq 19-20 and 25-26 computed per axis."""
    p = 0.5 * rng.standard_normal((3, 5))
    (Fy, Fx, gamma), _ = att.window_forward(p, H, W, N)
    (gx, gy, delta, sigma2, gamma_p), _ = att.attn_params_forward(p, H, W, N)
    for F, g, A in ((Fx, gx, W), (Fy, gy, H)):
        np.testing.assert_allclose(F, naive_filterbank(g, delta, sigma2, N, A),
                                   rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(gamma, gamma_p)


@pytest.mark.parametrize("N", [1, 3])
def test_square_window_gradients(rng, N):
    """H == W takes the shared-softmax path of window_forward/backward."""
    B, H, W = 2, 6, 6
    p = 0.5 * rng.standard_normal((B, 5))
    py, px = rng.standard_normal((B, N, H)), rng.standard_normal((B, N, W))
    pg = rng.standard_normal(B)

    def f():
        (Fy, Fx, gamma), _ = att.window_forward(p, H, W, N)
        return float((Fy * py).sum() + (Fx * px).sum() + (gamma * pg).sum())

    _, cache = att.window_forward(p, H, W, N)
    assert rel_err(att.window_backward(py, px, pg, cache).ravel(), numeric_grad(f, p)) < TOL


def test_filterbank_float32_survives_tiny_sigma_far_outside():
    """The analytic row maximum keeps float32 rows finite and normalised on both sides."""
    g = np.array([-500.0, 900.0, 5.5], dtype=np.float32)
    delta = np.ones(3, dtype=np.float32)
    sigma2 = np.full(3, 1e-6, dtype=np.float32)
    F, cache = att.filterbank_forward(g, delta, sigma2, 3, 10)
    assert F.dtype == np.float32 and np.isfinite(F).all()
    np.testing.assert_allclose(F.sum(axis=2), 1.0, rtol=1e-6)
    assert F[0, :, 0].min() > 0.999 and F[1, :, -1].min() > 0.999
    grads = att.filterbank_backward(np.ones_like(F), cache)
    assert all(np.isfinite(d).all() for d in grads)


def test_nan_window_gives_nan_filters():
    """A NaN parameter propagates as NaN into its own batch item, as it always did,
    rather than raising (the nearest-pixel index is computed from it)."""
    p = np.zeros((2, 5))
    p[0, 0] = np.nan
    (Fy, Fx, gamma), cache = att.window_forward(p, 8, 8, 3)
    assert np.isnan(Fx[0]).all()
    assert np.isfinite(Fx[1]).all() and np.isfinite(Fy[1]).all()
    dp = att.window_backward(np.ones_like(Fy), np.ones_like(Fx), np.ones(2), cache)
    assert np.isfinite(dp[1]).all()


def test_float32_gradients_match_float64():
    """The float32 window gradients (read path, paper-sized images) stay within 1e-4 of
    float64, parameter by parameter: the backward sums avoid cancellation."""
    rng = np.random.default_rng(3)
    B, H, W, N = 16, 28, 28, 5
    p = 1.5 * rng.standard_normal((B, 5))
    images = rng.random((B, 2, H, W))
    dglimpse = rng.standard_normal((B, 2, N, N))

    def dp(dtype):
        (Fy, Fx, gamma), wcache = att.window_forward(p.astype(dtype), H, W, N)
        _, rcache = att.read_forward(images.astype(dtype), Fy, Fx, gamma)
        _, dFy, dFx, dgamma = att.read_backward(dglimpse.astype(dtype), rcache)
        return att.window_backward(dFy, dFx, dgamma, wcache)

    dp32, dp64 = dp(np.float32), dp(np.float64)
    assert dp32.dtype == np.float32
    for column in range(5):
        assert rel_err(dp32[:, column], dp64[:, column]) < 1e-4
