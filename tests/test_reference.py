"""npdraw.reference: the plain DRAW, checked by loops and finite differences, and the
fast engine checked against it."""
import dataclasses
import math

import numpy as np
import pytest

import npdraw
from npdraw import engine, reference
from npdraw.layers import bce_forward
from npdraw.reference import draw
from gradcheck import numeric_grad, rel_err, sample_indices
from test_model import CONFIGS, generic_point

TOL = 1e-6  # finite differences at STEP 1e-5: truncation ~1e-10 and roundoff ~1e-11 relative

# The engine and the reference compute the same float64 sums in other orders (stacked
# GEMMs over T*B columns against one per glimpse, an analytic row maximum against a
# reduction, eq 22-24 as one masked expression). Each value is a sum of at most
# n ~ T * B * 100 = 1200 products here, whose rounding is bounded by n * eps ~ 3e-13 of
# the sum of their magnitudes, carried through T gain-O(1) recurrences; typical errors
# are sqrt(n) times smaller (about 1e-15 is seen). rel_err divides by the tensor's
# largest magnitude, so elements that cancel to near 0 do not inflate it.
AGREE = 1e-12


# ---------------------------------------------------------------- plain attention vs loops

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
                    out[b, k, i, j] = gamma[b] * sum(
                        Fy[b, i, y] * images[b, k, y, x] * Fx[b, j, x]
                        for y in range(H) for x in range(W))
    return out


def naive_write(patch, Fy, Fx, gamma):
    B, K, N, _ = patch.shape
    H, W = Fy.shape[2], Fx.shape[2]
    out = np.zeros((B, K, H, W))
    for b in range(B):
        for k in range(K):
            for y in range(H):
                for x in range(W):
                    out[b, k, y, x] = sum(Fy[b, i, y] * patch[b, k, i, j] * Fx[b, j, x]
                                          for i in range(N) for j in range(N)) / gamma[b]
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def random_window(rng, B, H, W, N):
    (Fy, Fx, gamma), _ = reference.window_forward(0.3 * rng.standard_normal((B, 5)), H, W, N)
    return Fy, Fx, gamma


@pytest.mark.parametrize("N,A", [(1, 5), (2, 7), (5, 6)])
def test_filterbank_matches_loops(rng, N, A):
    B = 3
    g = rng.uniform(0, A + 1, B)
    delta = rng.uniform(0.2, 2.0, B)
    sigma2 = rng.uniform(0.3, 3.0, B)
    F, _ = reference.filterbank_forward(g, delta, sigma2, N, A)
    np.testing.assert_allclose(F, naive_filterbank(g, delta, sigma2, N, A), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(F.sum(axis=2), 1.0, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_filterbank_survives_tiny_sigma_far_outside(dtype):
    """The softmax form keeps the normaliser >= 1: a window far off the image still gives
    finite rows, all their mass on the nearest pixel."""
    g = np.array([-500.0, 900.0], dtype)
    F, cache = reference.filterbank_forward(g, np.ones(2, dtype), np.full(2, 1e-6, dtype), 3, 10)
    assert F.dtype == dtype and np.isfinite(F).all()
    np.testing.assert_allclose(F.sum(axis=2), 1.0, rtol=1e-6)
    assert F[0, :, 0].min() > 0.999 and F[1, :, -1].min() > 0.999
    assert all(np.isfinite(d).all() for d in reference.filterbank_backward(np.ones_like(F), cache))


def test_window_params_mapping():
    """eq 22-24: centre of the image at g~=0, stride (max(H,W)-1)/(N-1) at delta~=1."""
    H, W, N = 6, 9, 4
    (gx, gy, sigma2, delta, gamma), _ = reference.window_params_forward(np.zeros((1, 5)), H, W, N)
    assert (gx[0], gy[0]) == ((W + 1) / 2, (H + 1) / 2)
    assert delta[0] == pytest.approx((max(H, W) - 1) / (N - 1))
    assert sigma2[0] == gamma[0] == 1.0
    (_, _, _, delta1, _), _ = reference.window_params_forward(np.zeros((1, 5)), H, W, 1)
    assert np.isfinite(delta1).all()


def test_window_params_gradients(rng):
    p = rng.standard_normal((3, 5))
    proj = rng.standard_normal((5, 3))

    def f():
        values, _ = reference.window_params_forward(p, 7, 5, 3)
        return float(sum((v * w).sum() for v, w in zip(values, proj)))

    _, cache = reference.window_params_forward(p, 7, 5, 3)
    assert rel_err(reference.window_params_backward(tuple(proj), cache).ravel(),
                   numeric_grad(f, p)) < TOL


@pytest.mark.parametrize("N", [1, 3])
def test_filterbank_gradients(rng, N):
    B, A = 3, 6
    g, delta, sigma2 = rng.uniform(1, A, B), rng.uniform(0.5, 1.5, B), rng.uniform(0.5, 2.0, B)
    proj = rng.standard_normal((B, N, A))

    def f():
        return float((reference.filterbank_forward(g, delta, sigma2, N, A)[0] * proj).sum())

    _, cache = reference.filterbank_forward(g, delta, sigma2, N, A)
    dg, ddelta, dsigma2 = reference.filterbank_backward(proj, cache)
    for analytic, array in ((dg, g), (ddelta, delta), (dsigma2, sigma2)):
        assert rel_err(analytic, numeric_grad(f, array)) < TOL


def test_window_gradients(rng):
    B, H, W, N = 2, 5, 7, 3
    p = 0.5 * rng.standard_normal((B, 5))
    py, px = rng.standard_normal((B, N, H)), rng.standard_normal((B, N, W))
    pg = rng.standard_normal(B)

    def f():
        (Fy, Fx, gamma), _ = reference.window_forward(p, H, W, N)
        return float((Fy * py).sum() + (Fx * px).sum() + (gamma * pg).sum())

    _, cache = reference.window_forward(p, H, W, N)
    assert rel_err(reference.window_backward(py, px, pg, cache).ravel(), numeric_grad(f, p)) < TOL


def test_read_matches_loops_and_gradients(rng):
    B, K, H, W, N = 2, 3, 5, 4, 3
    images = rng.random((B, K, H, W))
    Fy, Fx, gamma = random_window(rng, B, H, W, N)
    out, cache = reference.read_forward(images, Fy, Fx, gamma)
    np.testing.assert_allclose(out, naive_read(images, Fy, Fx, gamma), rtol=1e-12)
    proj = rng.standard_normal(out.shape)

    def f():
        return float((reference.read_forward(images, Fy, Fx, gamma)[0] * proj).sum())

    for analytic, array in zip(reference.read_backward(proj, cache), (images, Fy, Fx, gamma)):
        assert rel_err(analytic.ravel(), numeric_grad(f, array)) < TOL


def test_write_matches_loops_and_gradients(rng):
    B, K, H, W, N = 2, 3, 6, 5, 4
    patch = rng.standard_normal((B, K, N, N))
    Fy, Fx, gamma = random_window(rng, B, H, W, N)
    out, cache = reference.write_forward(patch, Fy, Fx, gamma)
    np.testing.assert_allclose(out, naive_write(patch, Fy, Fx, gamma), rtol=1e-12)
    proj = rng.standard_normal(out.shape)

    def f():
        return float((reference.write_forward(patch, Fy, Fx, gamma)[0] * proj).sum())

    for analytic, array in zip(reference.write_backward(proj, cache), (patch, Fy, Fx, gamma)):
        assert rel_err(analytic.ravel(), numeric_grad(f, array)) < TOL


def test_full_window_over_image_reads_its_mean():
    """N=1, centred, huge sigma: the glimpse is gamma times the image mean."""
    img = np.random.default_rng(0).random((1, 1, 8, 6))
    p = np.array([[0.0, 0.0, np.log(1e8), 0.0, np.log(2.0)]])
    (Fy, Fx, gamma), _ = reference.window_forward(p, 8, 6, 1)
    out, _ = reference.read_forward(img, Fy, Fx, gamma)
    assert out[0, 0, 0, 0] == pytest.approx(2.0 * img.mean(), rel=1e-6)


# ---------------------------------------------------------------- the reference model

# Peephole LSTMs (Graves 2013 eq 7-11) on two of the model configs, with and without attention
PEEPHOLE_CONFIGS = {name + "_peepholes": dataclasses.replace(CONFIGS[name], peepholes=True)
                    for name in ("attn_grey_nonsquare", "noattn_colour")}
ALL_CONFIGS = {**CONFIGS, **PEEPHOLE_CONFIGS}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_gradients(name):
    """Every parameter's gradient of the reference, by centred differences of its loss."""
    _check_reference_gradients(name)


@pytest.mark.parametrize("name", sorted(PEEPHOLE_CONFIGS))
def test_reference_gradients_with_peepholes(name):
    """d enc_peep, d dec_peep (every element) and the other parameters' gradients through
    the whole model with peepholes, by centred differences."""
    _check_reference_gradients(name, every=("enc_peep", "dec_peep"))


def _check_reference_gradients(name, every=()):
    cfg = ALL_CONFIGS[name]
    params, x, eps = generic_point(cfg, seed=2)
    loss, grads, stats = reference.loss_and_grads(params, cfg, x, eps)
    assert set(grads) == set(params)
    assert loss == pytest.approx(stats["recon"] + stats["kl_total"], rel=1e-12)

    def f():
        return reference.loss_and_grads(params, cfg, x, eps)[0]

    rng = np.random.default_rng(1)
    for pname, value in params.items():
        assert grads[pname].shape == value.shape, pname
        idx = np.arange(value.size) if pname in every else sample_indices(value.size, 12, rng)
        err = rel_err(grads[pname].reshape(-1)[idx], numeric_grad(f, value, idx))
        assert err < TOL, f"{name}: {pname} rel_err {err:.2e}"


def test_step_backward_gives_the_input_state_gradients():
    """One glimpse's dstate_prev, by centred differences of a projection of its output."""
    cfg = CONFIGS["attn_grey_nonsquare"]
    params, x, eps = generic_point(cfg, seed=6)
    rng = np.random.default_rng(0)
    state = {k: v + 0.2 * rng.standard_normal(v.shape)
             for k, v in reference.initial_state(params, x.shape[0]).items()}
    proj = {k: rng.standard_normal(v.shape) for k, v in state.items()}
    kl_proj = rng.standard_normal(x.shape[0])

    def f():
        (out, kl), _ = reference.step_forward(params, cfg, x, state, eps[0])
        return float(sum((out[k] * proj[k]).sum() for k in out) + (kl * kl_proj).sum())

    _, cache = reference.step_forward(params, cfg, x, state, eps[0])
    dstate, _ = reference.step_backward(proj, kl_proj, cache)
    for key, value in state.items():
        assert rel_err(dstate[key].ravel(), numeric_grad(f, value)) < TOL, key


# ---------------------------------------------------------------- the engine against it

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_engine_matches_the_reference(name):
    """Loss, stats and every gradient of the fast engine (through the public API) equal
    the reference's in float64 (see AGREE)."""
    _check_engine_against_reference(name)


@pytest.mark.parametrize("name", sorted(PEEPHOLE_CONFIGS))
def test_engine_matches_the_reference_with_peepholes(name):
    """As above with peepholes, whose gradients are among those compared."""
    _check_engine_against_reference(name)


def test_zero_peepholes_compute_the_model_without_them():
    """A model given zero peepholes has its loss and the other gradients (the start of
    --oldmodel or --resume into --peepholes)."""
    cfg = CONFIGS["attn_grey_nonsquare"]
    params, x, eps = generic_point(cfg, seed=4)
    peep_cfg = dataclasses.replace(cfg, peepholes=True)
    peep_params = {**params, "enc_peep": np.zeros(3 * cfg.enc_dim),
                   "dec_peep": np.zeros(3 * cfg.dec_dim)}
    loss, grads, _ = npdraw.loss_and_grads(params, cfg, x, eps)
    loss_p, grads_p, _ = npdraw.loss_and_grads(peep_params, peep_cfg, x, eps)
    assert loss_p == pytest.approx(loss, rel=AGREE)
    for key in grads:
        assert rel_err(grads_p[key], grads[key]) < AGREE, key


def _check_engine_against_reference(name):
    cfg = ALL_CONFIGS[name]
    params, x, eps = generic_point(cfg, seed=3)
    loss, grads, stats = npdraw.loss_and_grads(params, cfg, x, eps)
    loss_r, grads_r, stats_r = reference.loss_and_grads(params, cfg, x, eps)
    assert loss == pytest.approx(loss_r, rel=AGREE)
    assert stats["recon"] == pytest.approx(stats_r["recon"], rel=AGREE)
    assert stats["kl_total"] == pytest.approx(stats_r["kl_total"], rel=AGREE)
    assert rel_err(stats["kl"], stats_r["kl"]) < AGREE
    assert set(grads) == set(grads_r)
    for key in grads:
        assert rel_err(grads[key], grads_r[key]) < AGREE, key
    per_example, only = npdraw.loss_only(params, cfg, x, eps)
    assert float(per_example.mean()) == pytest.approx(loss_r, rel=AGREE)
    assert rel_err(only["kl"], stats_r["kl"]) < AGREE


def test_engine_log_weight_matches_the_reference_steps():
    """loss_only's log-weight, log p(x|z) + log p(z) - log q(z|x), against the same sum
    built glimpse by glimpse from the reference's encoder states."""
    for cfg in CONFIGS.values():
        params, x, eps = generic_point(cfg, seed=4)
        _, stats = engine.loss_only(params, cfg, x, eps, return_terms=True)
        state = reference.initial_state(params, x.shape[0])
        log_ratio = np.zeros(x.shape[0])
        for t in range(cfg.T):
            (state, _), _ = reference.step_forward(params, cfg, x, state, eps[t])
            q = state["h_enc"] @ params["q_W"] + params["q_b"]
            mu, log_sigma = q[:, :cfg.z_dim], q[:, cfg.z_dim:]
            z = mu + np.exp(log_sigma) * eps[t]
            # log N(z; 0, 1) - log N(z; mu, sigma^2); the 2 pi terms cancel
            log_ratio += (-0.5 * z ** 2 + 0.5 * eps[t] ** 2 + log_sigma).sum(axis=1)
        recon, _ = bce_forward(state["canvas"], x)
        assert rel_err(stats["log_weight"], log_ratio - recon) < AGREE


def test_generate_replays_the_decoder():
    """generate's canvases and windows: the decoder and write head, glimpse by glimpse."""
    cfg = CONFIGS["attn_colour_read_n1"]
    params, _, eps = generic_point(cfg, B=4)
    canvases, windows = npdraw.generate(params, cfg, eps)
    assert canvases.shape == (cfg.T, 4, cfg.D)
    assert ((canvases > 0) & (canvases < 1)).all()
    Hd = cfg.dec_dim
    state = reference.initial_state(params, 4)
    h, c, canvas = state["h_dec"], state["c_dec"], state["canvas"]
    for t in range(cfg.T):
        a = np.concatenate([eps[t], h], 1) @ params["dec_W"] + params["dec_b"]
        i, f, o = (1 / (1 + np.exp(-a[:, k * Hd:(k + 1) * Hd])) for k in range(3))
        c = f * c + i * np.tanh(a[:, 3 * Hd:])                     # gates [i, f, o, g]
        h = o * np.tanh(c)
        canvas = canvas + draw.write_head_forward(params, cfg, h)[0]
        np.testing.assert_allclose(canvases[t], 1 / (1 + np.exp(-canvas)), rtol=1e-12)
    gx, gy, sigma2, delta, gamma = reference.window_params_forward(
        h @ params["write_att_W"] + params["write_att_b"], cfg.height, cfg.width, cfg.write_n)[0]
    for key, want in (("cx", gx), ("cy", gy), ("stride", delta), ("sigma", np.sqrt(sigma2)),
                      ("gamma", gamma)):
        np.testing.assert_allclose(windows[key][-1], want, rtol=1e-12, err_msg=key)
    assert windows["N"] == cfg.write_n


@pytest.mark.parametrize("name", ["attn_grey_nonsquare", "noattn_colour"])
def test_the_array_module_generic_path_equals_the_numpy_one(name, request):
    """The reference (and so generate) on the branches a GPU takes (conftest's
    as_if_on_gpu): the same loss, gradients and samples as on NumPy."""
    cfg = CONFIGS[name]
    params, x, eps = generic_point(cfg, seed=5)
    loss, grads, _ = reference.loss_and_grads(params, cfg, x, eps)
    canvases, _ = reference.generate(params, cfg, eps)
    request.getfixturevalue("as_if_on_gpu")
    loss_g, grads_g, _ = reference.loss_and_grads(params, cfg, x, eps)
    assert loss_g == pytest.approx(loss, rel=1e-13)
    for key in grads:
        assert rel_err(grads_g[key], grads[key]) < 1e-13, key
    assert rel_err(reference.generate(params, cfg, eps)[0], canvases) < 1e-13


def test_python_m_npdraw_reference_trains_and_the_bound_falls(bmnist_data_dir, bmnist_mirror):
    """`python -m npdraw.reference`, tiny: it trains the plain model on binarized MNIST and
    the printed bound of its last steps is below that of its first."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "npdraw.reference", "--steps", "60", "--every", "20",
         "--batch", "20", "--train", "500", "--T", "2", "--enc", "16", "--dec", "16", "--z", "4",
         "--lr", "1e-2", "--data-dir", str(bmnist_data_dir), "--mirror", str(bmnist_mirror)],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    bounds = [float(b) for b in re.findall(r"bound\s+([0-9.]+) nats", run.stdout)]
    assert len(bounds) == 3, run.stdout
    assert bounds[-1] < bounds[0] - 5, run.stdout
