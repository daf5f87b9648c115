"""NumPy versus CuPy: the same functions must agree on a GPU.

These are the project's only skips: they run where CuPy and a CUDA GPU are present.
"""
import dataclasses

import numpy as np
import pytest

import npdraw
from npdraw import backend
from npdraw.optim import adam_init, adam_step, ema_init, ema_update

pytestmark = [
    pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a CUDA GPU"),
    # backend.fuse falls back to the unfused body with a warning; on a GPU that is a failure
    pytest.mark.filterwarnings("error:cupy.fuse failed"),
]

CONFIGS = [
    npdraw.DrawConfig(height=5, width=6, channels=1, T=3, read_n=2, write_n=3, enc_dim=6,
                      dec_dim=5, z_dim=3),
    npdraw.DrawConfig(height=4, width=5, channels=3, T=4, read_n=1, write_n=2, enc_dim=8,
                      dec_dim=7, z_dim=2),
    npdraw.DrawConfig(height=3, width=4, channels=3, T=3, enc_dim=5, dec_dim=4, z_dim=2,
                      attention=False),
    npdraw.DrawConfig(T=8),
]


def _point(cfg, dtype, B=5):
    """A generic, well-conditioned point: each weight matrix is moved by 0.3/sqrt(fan-in)
    so that pre-activations move by O(0.3) at any width. A flat 0.3 on the paper's
    256-wide layers saturates the gates and the attention's exp: there, on the CPU alone,
    a 1e-15 relative change of the parameters moves the float64 gradients by 3e-7 and
    float32 is 1.6% off float64, so no two devices could agree (seen on the first GPU run)."""
    rng = np.random.default_rng(0)
    params = npdraw.init_params(cfg, 0, dtype=dtype)
    for v in params.values():
        scale = 0.3 / np.sqrt(v.shape[0]) if v.ndim == 2 else 0.3
        v += (scale * rng.standard_normal(v.shape)).astype(dtype)
    x = rng.random((B, cfg.D)).astype(dtype)
    eps = rng.standard_normal((cfg.T, B, cfg.z_dim)).astype(dtype)
    return params, x, eps


def _gpu(tree):
    return {k: backend.to_device(v, "gpu") for k, v in tree.items()}


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 2e-3)])
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_loss_and_grads_agree(index, dtype, rtol):
    _check_agreement(CONFIGS[index], dtype, rtol)


def _check_agreement(cfg, dtype, rtol):
    params, x, eps = _point(cfg, dtype)
    loss, grads, stats = npdraw.loss_and_grads(params, cfg, x, eps)
    gloss, ggrads, gstats = npdraw.loss_and_grads(
        _gpu(params), cfg, backend.to_device(x, "gpu"), backend.to_device(eps, "gpu"))
    assert gloss == pytest.approx(loss, rel=rtol)
    np.testing.assert_allclose(gstats["kl"], stats["kl"], rtol=rtol, atol=1e-6)
    for name in grads:
        assert backend.is_gpu_array(ggrads[name])
        assert ggrads[name].dtype == grads[name].dtype
        scale = np.abs(grads[name]).max() + 1e-12
        np.testing.assert_allclose(backend.to_numpy(ggrads[name]) / scale, grads[name] / scale,
                                   atol=rtol * 10, err_msg=name)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 2e-3)])
@pytest.mark.parametrize("index", [0, 2, 3])
def test_loss_and_grads_agree_with_peepholes(index, dtype, rtol):
    """The fused peephole cell (its (H, 1) peepholes broadcast over the batch in the
    kernel) and d enc_peep, d dec_peep on the device equal NumPy's."""
    _check_agreement(dataclasses.replace(CONFIGS[index], peepholes=True), dtype, rtol)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_loss_only_and_importance_weights_agree(index):
    """The forward-only path of evaluate and the IWAE estimate (float64)."""
    cfg = CONFIGS[index]
    params, x, eps = _point(cfg, "float64")
    per_example, stats = npdraw.loss_only(params, cfg, x, eps, return_terms=True)
    gper_example, gstats = npdraw.loss_only(_gpu(params), cfg, backend.to_device(x, "gpu"),
                                            backend.to_device(eps, "gpu"), return_terms=True)
    assert backend.is_gpu_array(gper_example)
    np.testing.assert_allclose(backend.to_numpy(gper_example), per_example, rtol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(gstats["log_weight"]), stats["log_weight"],
                               rtol=1e-10)
    assert gstats["loss"] == pytest.approx(stats["loss"], rel=1e-10)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_generate_agrees(index):
    cfg = CONFIGS[index]
    params, _, eps = _point(cfg, "float64")
    canvases, windows = npdraw.generate(params, cfg, eps)
    gcanvases, gwindows = npdraw.generate(_gpu(params), cfg, backend.to_device(eps, "gpu"))
    np.testing.assert_allclose(backend.to_numpy(gcanvases), canvases, rtol=1e-10, atol=1e-12)
    if windows is not None:
        for key in ("cx", "cy", "stride", "sigma", "gamma"):
            np.testing.assert_allclose(backend.to_numpy(gwindows[key]), windows[key], rtol=1e-10)


def test_adam_step_agrees():
    cfg = CONFIGS[0]
    params, x, eps = _point(cfg, "float64")
    _, grads, _ = npdraw.loss_and_grads(params, cfg, x, eps)
    new, _, norm = adam_step(params, grads, adam_init(params), 1e-3)
    gnew, _, gnorm = adam_step(_gpu(params), _gpu(grads), adam_init(_gpu(params)), 1e-3)
    assert gnorm == pytest.approx(norm, rel=1e-10)
    for name in new:
        np.testing.assert_allclose(backend.to_numpy(gnew[name]), new[name], rtol=1e-10)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ema_update_agrees_in_place_on_the_device(dtype):
    """The same arithmetic elementwise on both devices: equal bit for bit; the average
    stays a CuPy array of its dtype, updated in place."""
    cfg = CONFIGS[0]
    start, _, _ = _point(cfg, dtype)
    steps = [{k: v + np.asarray(0.1 * (i + 1), dtype=dtype) for k, v in start.items()}
             for i in range(3)]
    ema, gema = ema_init(start), ema_init(_gpu(start))
    arrays = dict(gema)
    for p in steps:
        ema_update(ema, p, 0.9)
        ema_update(gema, _gpu(p), 0.9)
    for name in ema:
        assert gema[name] is arrays[name] and backend.is_gpu_array(gema[name])
        assert gema[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(backend.to_numpy(gema[name]), ema[name])


def test_fused_kernels_match_their_numpy_form():
    """Each backend.fuse kernel is compiled by CuPy (no fallback to the unfused body)
    and equals its plain NumPy body."""
    from npdraw import engine, engine_attention, layers
    rng = np.random.default_rng(1)
    kernels = [(layers._lstm_cell_kernel, 5), (layers._lstm_cell_backward_kernel, 8),
               (layers._peephole_lstm_cell_kernel, 8),
               (layers._peephole_lstm_cell_backward_kernel, 11),
               (layers._reparam_kernel, 3), (layers._kl_terms_kernel, 2),
               (layers._bce_kernel, 2), (layers._bce_backward_kernel, 3),
               (engine._glimpse_error, 2), (engine._glimpse_error_backward_kernel, 3),
               (engine_attention._window_params_kernel, 4),
               (engine_attention._window_params_kernel_backward, 4),
               (engine_attention._gaussian_exp, 3), (engine_attention._dlogits_times_steps, 4)]
    for kernel, n_args in kernels:
        args = [rng.uniform(0.05, 0.95, (4, 6)) for _ in range(n_args)]
        expected = kernel(*args)
        got = kernel(*[backend.to_device(a, "gpu") for a in args])
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        for e, g in zip(expected, got):
            np.testing.assert_allclose(backend.to_numpy(g), e, rtol=1e-12, err_msg=kernel.__name__)
        assert backend._FUSED[kernel.unfused] is not kernel.unfused, \
            f"cupy.fuse fell back to the unfused body of {kernel.__name__}"


def test_device_resolution():
    assert backend.resolve_device("auto") == "gpu"
    assert backend.xp_for("gpu") is not np


def test_nccl_all_reduce_of_one_rank_on_the_device():
    """The data-parallel ranks' NCCL call (backend.nccl_allreduce_sum), on one GPU: a
    communicator of one rank sums to the buffer itself, in place, on the device."""
    try:
        backend._nccl()
    except ImportError:
        pytest.skip("CuPy here has no NCCL (multi-GPU data parallelism needs it)")
    communicator = backend.nccl_communicator(1, backend.nccl_unique_id(), 0)
    for dtype in ("float32", "float64"):
        host = np.arange(1000, dtype=dtype) / 7
        device = backend.to_device(host, "gpu")
        backend.nccl_allreduce_sum(communicator, device)
        assert backend.is_gpu_array(device)
        np.testing.assert_array_equal(backend.to_numpy(device), host)
