"""npdraw.engine_attention: the tuned attention against the plain one of npdraw.reference,
and its own gradient checks."""
import numpy as np
import pytest

from npdraw import engine_attention as att
from npdraw import reference
from gradcheck import numeric_grad, rel_err

TOL = 1e-6  # finite differences: these checks land below about 1e-8
# Tuned and plain attention in float64: a few roundings apart per value (eq 22-24 as
# scale * (1 + p) against scale + scale * p; a softmax shifted by the analytic maximum
# against the reduced one, whose logits are ~A^2/sigma^2 ~ 100 here, so ~100 eps).
SAME = 1e-12


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def one_window(p, H, W, N):
    (window,), cache = att.windows_forward(p, H, W, (N,))
    return window, cache


@pytest.mark.parametrize("H,W", [(6, 6), (5, 7)])
@pytest.mark.parametrize("Ns", [(1,), (3,), (4, 2)])
def test_windows_equal_the_reference_filterbanks(rng, H, W, Ns):
    """One softmax for both axes (H == W) or one per axis, for one window or several at
    once (the engine's write window and next read window): each is the reference's."""
    B = 3
    p = 0.5 * rng.standard_normal((B, 5 * len(Ns)))
    windows, _ = att.windows_forward(p, H, W, Ns)
    for w, N in enumerate(Ns):
        (Fy, Fx, gamma), _ = reference.window_forward(p[:, 5 * w:5 * w + 5], H, W, N)
        for got, want in zip(windows[w], (Fy, Fx, gamma)):
            assert rel_err(got, want) < SAME


@pytest.mark.parametrize("H,W", [(6, 6), (5, 7)])
@pytest.mark.parametrize("Ns", [(1,), (3,), (4, 2)])
def test_windows_gradients(rng, H, W, Ns):
    B = 3
    p = 0.5 * rng.standard_normal((B, 5 * len(Ns)))
    projections = [(rng.standard_normal((B, N, H)), rng.standard_normal((B, N, W)),
                    rng.standard_normal(B)) for N in Ns]

    def f():
        out, _ = att.windows_forward(p, H, W, Ns)
        return float(sum((Fy * py).sum() + (Fx * px).sum() + (g * pg).sum()
                         for (Fy, Fx, g), (py, px, pg) in zip(out, projections)))

    _, cache = att.windows_forward(p, H, W, Ns)
    dp = att.windows_backward(projections, cache)
    assert dp.shape == p.shape
    assert rel_err(dp.ravel(), numeric_grad(f, p)) < TOL
    for w, N in enumerate(Ns):     # each window's gradient is the reference's
        _, ref_cache = reference.window_forward(p[:, 5 * w:5 * w + 5], H, W, N)
        assert rel_err(dp[:, 5 * w:5 * w + 5],
                       reference.window_backward(*projections[w], ref_cache)) < SAME


def test_read_equals_the_reference_and_gradients(rng):
    B, K, H, W, N = 2, 3, 5, 4, 3
    images = rng.random((B, K, H, W))
    (Fy, Fx, gamma), _ = one_window(0.3 * rng.standard_normal((B, 5)), H, W, N)
    out, cache = att.read_forward(images, Fy, Fx, gamma)
    want, ref_cache = reference.read_forward(images, Fy, Fx, gamma)
    assert rel_err(out, want) < SAME
    proj = rng.standard_normal(out.shape)
    grads = att.read_backward(proj, cache)
    for got, ref in zip(grads, reference.read_backward(proj, ref_cache)):
        assert rel_err(got, ref) < SAME

    def f():
        return float((att.read_forward(images, Fy, Fx, gamma)[0] * proj).sum())

    for analytic, array in zip(grads, (images, Fy, Fx, gamma)):
        assert rel_err(analytic.ravel(), numeric_grad(f, array)) < TOL
    assert att.read_backward(proj, cache, need_images=False)[0] is None
    np.testing.assert_allclose(att.read_backward(proj, cache, first_plane=1)[0], grads[0][:, 1:],
                               rtol=1e-12)


def test_write_equals_the_reference_and_gradients(rng):
    B, K, H, W, N = 2, 3, 6, 5, 4
    patch = rng.standard_normal((B, K, N, N))
    (Fy, Fx, gamma), _ = one_window(0.3 * rng.standard_normal((B, 5)), H, W, N)
    out, cache = att.write_forward(patch, Fy, Fx, gamma)
    want, ref_cache = reference.write_forward(patch, Fy, Fx, gamma)
    assert rel_err(out, want) < SAME
    proj = rng.standard_normal(out.shape)
    grads = att.write_backward(proj, cache)
    for got, ref in zip(grads, reference.write_backward(proj, ref_cache)):
        assert rel_err(got, ref) < SAME

    def f():
        return float((att.write_forward(patch, Fy, Fx, gamma)[0] * proj).sum())

    for analytic, array in zip(grads, (patch, Fy, Fx, gamma)):
        assert rel_err(analytic.ravel(), numeric_grad(f, array)) < TOL


def test_attention_keeps_float32(rng):
    p = rng.standard_normal((2, 5)).astype(np.float32)
    (Fy, Fx, gamma), wcache = one_window(p, 6, 5, 3)
    img = rng.random((2, 2, 6, 5)).astype(np.float32)
    out, rcache = att.read_forward(img, Fy, Fx, gamma)
    dimg, dFy, dFx, dgamma = att.read_backward(out, rcache)
    dp = att.windows_backward([(dFy, dFx, dgamma)], wcache)
    assert {a.dtype for a in (Fy, Fx, gamma, out, dimg, dp)} == {np.dtype(np.float32)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_window_survives_tiny_sigma_far_outside(dtype):
    """The analytic row maximum keeps rows finite and normalised on both sides of the
    image, however small sigma is."""
    # g~ = -40 and +70 put the centres far left and right; log sigma^2 = log 1e-6
    p = np.array([[-40.0, 0.0, np.log(1e-6), 0.0, 0.0],
                  [70.0, 0.0, np.log(1e-6), 0.0, 0.0]], dtype)
    (Fy, Fx, gamma), cache = one_window(p, 10, 10, 3)
    assert Fx.dtype == dtype and np.isfinite(Fx).all()
    np.testing.assert_allclose(Fx.sum(axis=2), 1.0, rtol=1e-6)
    assert Fx[0, :, 0].min() > 0.999 and Fx[1, :, -1].min() > 0.999
    dp = att.windows_backward([(np.ones_like(Fy), np.ones_like(Fx), np.ones_like(gamma))], cache)
    assert np.isfinite(dp).all()


def test_nan_window_gives_nan_filters():
    """A NaN parameter propagates as NaN into its own batch item, as it always did,
    rather than raising (the nearest-pixel index is computed from it)."""
    p = np.zeros((2, 5))
    p[0, 0] = np.nan
    (Fy, Fx, gamma), cache = one_window(p, 8, 8, 3)
    assert np.isnan(Fx[0]).all()
    assert np.isfinite(Fx[1]).all() and np.isfinite(Fy[1]).all()
    dp = att.windows_backward([(np.ones_like(Fy), np.ones_like(Fx), np.ones(2))], cache)
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
        (Fy, Fx, gamma), wcache = one_window(p.astype(dtype), H, W, N)
        _, rcache = att.read_forward(images.astype(dtype), Fy, Fx, gamma)
        _, dFy, dFx, dgamma = att.read_backward(dglimpse.astype(dtype), rcache)
        return att.windows_backward([(dFy, dFx, dgamma)], wcache)

    dp32, dp64 = dp(np.float32), dp(np.float64)
    assert dp32.dtype == np.float32
    for column in range(5):
        assert rel_err(dp32[:, column], dp64[:, column]) < 1e-4
