"""The whole DRAW model through the public API: gradient checks, loss at init, bad input.
(tests/test_reference.py checks the engine against the plain reference model.)"""
import math

import numpy as np
import pytest

import npdraw
from gradcheck import numeric_grad, rel_err, sample_indices

TOL = 1e-6  # reached: the worst whole-model tensor is about 3e-7 (the N=1 read), most below 5e-8

CONFIGS = {
    "attn_grey_nonsquare": npdraw.DrawConfig(height=5, width=6, channels=1, T=3, read_n=2,
                                             write_n=3, enc_dim=6, dec_dim=5, z_dim=3),
    "noattn_colour": npdraw.DrawConfig(height=3, width=4, channels=3, T=3, enc_dim=5, dec_dim=4,
                                       z_dim=2, attention=False),
    "attn_colour_read_n1": npdraw.DrawConfig(height=4, width=5, channels=3, T=4, read_n=1,
                                             write_n=2, enc_dim=4, dec_dim=5, z_dim=2),
    "attn_write_n1": npdraw.DrawConfig(height=6, width=4, channels=1, T=3, read_n=3, write_n=1,
                                       enc_dim=5, dec_dim=4, z_dim=3),
}


def generic_point(cfg, seed=0, B=3):
    """Float64 params moved off their special initial values, data, and noise."""
    rng = np.random.default_rng(seed)
    params = npdraw.init_params(cfg, seed, dtype="float64")
    for value in params.values():
        value += 0.3 * rng.standard_normal(value.shape)
    x = rng.random((B, cfg.D))
    eps = rng.standard_normal((cfg.T, B, cfg.z_dim))
    return params, x, eps


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_whole_model_gradients(name):
    cfg = CONFIGS[name]
    params, x, eps = generic_point(cfg)
    loss, grads, stats = npdraw.loss_and_grads(params, cfg, x, eps)
    assert set(grads) == set(params)

    def f():
        return float(npdraw.loss_only(params, cfg, x, eps)[0].mean())

    assert f() == pytest.approx(loss, rel=1e-12)
    rng = np.random.default_rng(1)
    for pname, value in params.items():
        assert grads[pname].shape == value.shape, pname
        idx = sample_indices(value.size, 12, rng)
        numeric = numeric_grad(f, value, idx)
        err = rel_err(grads[pname].reshape(-1)[idx], numeric)
        assert err < TOL, f"{name}: {pname} rel_err {err:.2e}"


def test_stats_are_consistent():
    cfg = CONFIGS["attn_grey_nonsquare"]
    params, x, eps = generic_point(cfg)
    loss, _, stats = npdraw.loss_and_grads(params, cfg, x, eps)
    assert stats["kl"].shape == (cfg.T,)
    assert (stats["kl"] >= 0).all()
    assert loss == pytest.approx(stats["recon"] + stats["kl"].sum(), rel=1e-12)
    assert stats["activation_bytes"] > 0


def test_activation_bytes_grow_linearly_in_T():
    """Kept activations are per glimpse: twice the glimpses, about twice the bytes (a
    buffer shared by all glimpses but counted once per glimpse would make it T^2)."""
    def act(T):
        cfg = npdraw.DrawConfig(height=8, width=8, T=T, read_n=2, write_n=3, enc_dim=16,
                                dec_dim=16, z_dim=4)
        params, x, eps = generic_point(cfg)
        return npdraw.loss_and_grads(params, cfg, x, eps)[2]["activation_bytes"]
    ratio = act(16) / act(8)
    assert 1.8 < ratio < 2.05, ratio


def test_loss_at_init_is_analytic():
    """Zeroed output layers make the loss exact: BCE against sigmoid(c0) plus T*KL(q_b)."""
    cfg = npdraw.DrawConfig(T=5, enc_dim=16, dec_dim=16, z_dim=4)
    params = npdraw.init_params(cfg, 0, dtype="float64")
    rng = np.random.default_rng(0)
    x = (rng.random((8, cfg.D)) < 0.3).astype(np.float64)
    eps = rng.standard_normal((cfg.T, 8, cfg.z_dim))
    for name in ("q_W", "write_W", "write_b"):
        params[name][...] = 0.0
    p = 0.2
    params["c0"][...] = math.log(p / (1 - p))
    mu0, log_sigma0 = 0.5, -0.3
    params["q_b"][:cfg.z_dim], params["q_b"][cfg.z_dim:] = mu0, log_sigma0
    loss, _, stats = npdraw.loss_and_grads(params, cfg, x, eps)
    recon = -(x * math.log(p) + (1 - x) * math.log(1 - p)).sum(axis=1).mean()
    kl = cfg.T * cfg.z_dim * 0.5 * (mu0 ** 2 + math.exp(2 * log_sigma0) - 2 * log_sigma0 - 1)
    assert stats["recon"] == pytest.approx(recon, rel=1e-12)
    assert loss == pytest.approx(recon + kl, rel=1e-12)


@pytest.mark.parametrize("attention", [True, False])
def test_default_init_starts_near_uniform_canvas(attention):
    """With the shipped init, c0 = 0, small output layers: L ~ D log 2 and KL ~ 0."""
    cfg = npdraw.DrawConfig(attention=attention, T=8)
    params = npdraw.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    x = (rng.random((20, cfg.D)) < 0.15).astype(np.float32)
    eps = rng.standard_normal((cfg.T, 20, cfg.z_dim)).astype(np.float32)
    loss, _, stats = npdraw.loss_and_grads(params, cfg, x, eps)
    assert stats["recon"] == pytest.approx(cfg.D * math.log(2), rel=0.02)
    assert 0 <= stats["kl_total"] < 0.01 * cfg.D


def test_float32_by_default_and_float64_on_request():
    cfg = CONFIGS["attn_colour_read_n1"]
    p32 = npdraw.init_params(cfg, 0)
    assert all(v.dtype == np.float32 for v in p32.values())
    x = np.random.default_rng(0).random((2, cfg.D)).astype(np.float32)
    eps = np.zeros((cfg.T, 2, cfg.z_dim), np.float32)
    _, grads, _ = npdraw.loss_and_grads(p32, cfg, x, eps)
    assert all(g.dtype == np.float32 for g in grads.values())
    p64 = npdraw.init_params(cfg, 0, dtype="float64")
    _, grads64, _ = npdraw.loss_and_grads(p64, cfg, x.astype(np.float64), eps)
    assert all(g.dtype == np.float64 for g in grads64.values())
    for name in grads:
        np.testing.assert_allclose(grads[name], grads64[name], rtol=2e-3, atol=2e-5)


def test_inputs_are_not_modified():
    cfg = CONFIGS["attn_grey_nonsquare"]
    params, x, eps = generic_point(cfg)
    before = {k: v.copy() for k, v in params.items()}, x.copy(), eps.copy()
    npdraw.loss_and_grads(params, cfg, x, eps)
    npdraw.generate(params, cfg, eps)
    for k in params:
        np.testing.assert_array_equal(params[k], before[0][k])
    np.testing.assert_array_equal(x, before[1])
    np.testing.assert_array_equal(eps, before[2])


# ---------------------------------------------------------------- bad input

@pytest.fixture
def small():
    cfg = CONFIGS["attn_grey_nonsquare"]
    params, x, eps = generic_point(cfg)
    return cfg, params, x, eps


@pytest.mark.parametrize("change,message", [
    (lambda c, p, x, e: (p, x[:, :-1], e), "x must have shape"),
    (lambda c, p, x, e: (p, x[0], e), "x must have shape"),
    (lambda c, p, x, e: (p, x, e[:-1]), "eps must have shape"),
    (lambda c, p, x, e: (p, x, e[:, :-1]), "eps must have shape"),
    (lambda c, p, x, e: (p, x + 1.0, e), r"values in \[0, 1\]"),
    (lambda c, p, x, e: (p, x - 0.5, e), r"values in \[0, 1\]"),
    (lambda c, p, x, e: (p, np.where(x > 0.5, np.nan, x), e), "NaN"),
    (lambda c, p, x, e: (p, x, e * np.inf), "eps contains NaN"),
    (lambda c, p, x, e: ({k: v for k, v in p.items() if k != "q_W"}, x, e), "missing"),
    (lambda c, p, x, e: ({**p, "q_W": p["q_W"][:, :1]}, x, e), "param q_W has shape"),
    (lambda c, p, x, e: (p, "not an array", e), "x must be an array"),
])
def test_bad_input_names_the_problem(small, change, message):
    cfg, params, x, eps = small
    p2, x2, e2 = change(cfg, params, x, eps)
    with pytest.raises(ValueError, match=message):
        npdraw.loss_and_grads(p2, cfg, x2, e2)


@pytest.mark.parametrize("field", ["height", "width", "channels", "T", "read_n", "write_n",
                                   "enc_dim", "dec_dim", "z_dim"])
def test_impossible_config_is_rejected(field):
    with pytest.raises(ValueError, match=field):
        npdraw.DrawConfig(**{field: 0})


def test_config_defaults_are_the_papers_mnist_model():
    cfg = npdraw.DrawConfig()
    assert (cfg.height, cfg.width, cfg.channels, cfg.T, cfg.read_n, cfg.write_n, cfg.enc_dim,
            cfg.dec_dim, cfg.z_dim, cfg.attention) == (28, 28, 1, 64, 2, 5, 256, 256, 100, True)
    assert npdraw.DrawConfig.from_dict(cfg.to_dict()) == cfg


def test_generate_shapes_and_windows():
    cfg = CONFIGS["attn_colour_read_n1"]
    params, _, eps = generic_point(cfg, B=4)
    canvases, windows = npdraw.generate(params, cfg, eps)
    assert canvases.shape == (cfg.T, 4, cfg.D) and canvases.dtype == np.float64
    for key in ("cx", "cy", "stride", "sigma", "gamma"):
        assert windows[key].shape == (cfg.T, 4)
    assert (windows["sigma"] > 0).all() and (windows["gamma"] > 0).all()
    cfg2 = CONFIGS["noattn_colour"]
    p2, _, e2 = generic_point(cfg2)
    assert npdraw.generate(p2, cfg2, e2)[1] is None


@pytest.mark.parametrize("name", ["attn_grey_nonsquare", "noattn_colour"])
def test_reconstruct_ends_on_the_canvas_that_the_loss_scores(name):
    """reconstruct's last canvas is the engine's: its L^x and the KL of every glimpse are
    loss_only's with the same noise; the windows are the read and the write ones."""
    cfg = CONFIGS[name]
    params, x, eps = generic_point(cfg, B=4)
    canvases, windows, kl = npdraw.reconstruct(params, cfg, x, eps)
    assert canvases.shape == (cfg.T, 4, cfg.D) and kl.shape == (cfg.T, 4)
    _, stats = npdraw.loss_only(params, cfg, x, eps, return_terms=True)
    last = canvases[-1]
    recon = -(x * np.log(last) + (1 - x) * np.log(1 - last)).sum(axis=1)
    np.testing.assert_allclose(recon, stats["recon_per_example"], rtol=1e-9)
    np.testing.assert_allclose(kl.mean(axis=1), stats["kl"], rtol=1e-9)
    if not cfg.attention:
        assert windows is None
        return
    assert (windows["read"]["N"], windows["write"]["N"]) == (cfg.read_n, cfg.write_n)
    for key in ("cx", "cy", "stride", "sigma", "gamma"):
        assert windows["read"][key].shape == windows["write"][key].shape == (cfg.T, 4)
    assert not np.allclose(windows["read"]["cx"], windows["write"]["cx"])


def test_generate_rejects_bad_eps(small):
    cfg, params, _, eps = small
    with pytest.raises(ValueError, match="eps must have shape"):
        npdraw.generate(params, cfg, eps[:, :, :-1])


def test_glimpse_error_in_place_equals_the_fused_kernel():
    """Eq 3 written into preallocated arrays (the NumPy path) equals the GPU kernel's body."""
    from npdraw.engine import _glimpse_error, _glimpse_error_into
    rng = np.random.default_rng(5)
    x = (rng.random((3, 7)) < 0.5).astype(np.float64)
    canvas = rng.standard_normal((3, 7)) * 4
    sig, x_hat = np.empty_like(x), np.empty_like(x)
    _glimpse_error_into(x, canvas, sig, x_hat)
    sig_ref, x_hat_ref = _glimpse_error.unfused(x, canvas)
    np.testing.assert_allclose(sig, sig_ref, rtol=1e-15)
    np.testing.assert_allclose(x_hat, x_hat_ref, rtol=1e-15)


@pytest.mark.parametrize("shape", [(13, 7), (3, 1024), (17, 1024), (1, 1)])
def test_blocked_transpose_is_the_transpose(shape):
    from npdraw.engine import _transpose
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t = _transpose(a)
    assert t.flags["C_CONTIGUOUS"] and t.dtype == a.dtype
    np.testing.assert_array_equal(t, a.T)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_array_module_generic_path_equals_the_numpy_one(name, request):
    """The branches a GPU takes (fused kernels, assignments into views, no in-place
    NumPy calls), run on NumPy arrays (conftest's as_if_on_gpu): the same loss and
    gradients as the NumPy fast paths."""
    cfg = CONFIGS[name]
    params, x, eps = generic_point(cfg, seed=5)
    loss, grads, _ = npdraw.loss_and_grads(params, cfg, x, eps)
    request.getfixturevalue("as_if_on_gpu")
    loss_g, grads_g, _ = npdraw.loss_and_grads(params, cfg, x, eps)
    assert loss_g == pytest.approx(loss, rel=1e-13)
    for key in grads:   # the same sums with other elementwise roundings: eps-scale per tensor
        assert rel_err(grads_g[key], grads[key]) < 1e-12, key


def test_peepholes_config_and_parameters():
    """peepholes: off by default and for configs saved before the field; on, two zero
    vectors [p_i, p_f, p_o] of 3H, and every other parameter as without them."""
    cfg = CONFIGS["attn_grey_nonsquare"]
    saved = {k: v for k, v in cfg.to_dict().items() if k != "peepholes"}
    assert npdraw.DrawConfig.from_dict(saved).peepholes is False
    peep = npdraw.DrawConfig.from_dict({**saved, "peepholes": np.bool_(True)})
    assert peep.peepholes is True
    with pytest.raises(ValueError, match="peepholes must be True or False"):
        npdraw.DrawConfig(peepholes=1)
    plain, with_peep = npdraw.init_params(cfg, 5), npdraw.init_params(peep, 5)
    assert set(with_peep) - set(plain) == {"enc_peep", "dec_peep"}
    assert with_peep["enc_peep"].shape == (3 * cfg.enc_dim,)
    assert with_peep["dec_peep"].shape == (3 * cfg.dec_dim,)
    assert not with_peep["enc_peep"].any() and not with_peep["dec_peep"].any()
    assert all(np.array_equal(plain[k], with_peep[k]) for k in plain)
