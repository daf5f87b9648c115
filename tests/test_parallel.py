"""The data-parallel engine: worker processes agree with the in-process model."""
import os
import signal

import numpy as np
import pytest

from gradcheck import rel_err
from npdraw import model
from npdraw.config import DrawConfig, TrainConfig
from npdraw.parallel import (DataParallel, WorkerError, _shared_dir, auto_workers,
                             resolve_workers, usable_cores)

ATT = DrawConfig(height=6, width=7, T=3, read_n=2, write_n=3, enc_dim=8, dec_dim=9, z_dim=4)
NOATT = DrawConfig(height=5, width=4, T=3, enc_dim=6, dec_dim=7, z_dim=3, attention=False)


def _batch(cfg, B, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((B, cfg.D)) < 0.4).astype(dtype)
    eps = rng.standard_normal((cfg.T, B, cfg.z_dim)).astype(dtype)
    return x, eps


# A slice's GEMMs may round differently from the whole batch's (BLAS kernels pick their
# blocking by shape), so float64 results agree to rounding, not bit for bit. Gradients: a
# sum over the batch of T glimpses' products, rounded at about n eps of its magnitudes
# (n ~ T * B * 10 here, so ~1e-13), compared against each tensor's largest magnitude.
SAME_SUMS = 1e-12


def _kl_atol(cfg):
    """Near the prior a glimpse's KL, sum_j (mu^2 + sigma^2 - 1)/2 - log sigma, is a small
    difference of Z + 1 terms of size about 1 (init_params gives ~1e-4 from terms near
    1/2): rounding leaves it an absolute error of up to (Z + 1) eps per term summed,
    whatever its size. Compared absolutely at that bound, with a factor 2."""
    return 2 * (cfg.z_dim + 1) ** 2 * np.finfo(np.float64).eps


def _our_files():
    return {f for f in os.listdir(_shared_dir()) if f.startswith("npdraw-")}


@pytest.fixture(scope="module")
def engine64():
    with DataParallel(ATT, 2, "float64") as engine:
        yield engine


@pytest.mark.parametrize("cfg", [ATT, NOATT], ids=["attention", "no-attention"])
def test_split_batch_matches_the_whole_batch_in_float64(cfg):
    params = model.init_params(cfg, seed=1, dtype="float64")
    x, eps = _batch(cfg, 7, np.float64)            # 7 over 3 workers: an uneven split
    loss, grads, stats = model.loss_and_grads(params, cfg, x, eps)
    with DataParallel(cfg, 3, "float64") as engine:
        loss_p, grads_p, stats_p = engine.loss_and_grads(params, x, eps)
    assert loss_p == pytest.approx(loss, rel=1e-13)
    assert stats_p["recon"] == pytest.approx(stats["recon"], rel=1e-13)
    kl_atol = _kl_atol(cfg)
    np.testing.assert_allclose(stats_p["kl"], stats["kl"], rtol=1e-12, atol=kl_atol)
    assert stats_p["kl_total"] == pytest.approx(stats["kl_total"], rel=1e-12,
                                                abs=cfg.T * kl_atol)
    assert set(grads_p) == set(grads)
    for name in grads:
        assert grads_p[name].dtype == np.float64 and grads_p[name].shape == grads[name].shape
        assert rel_err(grads_p[name], grads[name]) < SAME_SUMS, name


def test_float32_agrees_to_float32_precision():
    params = model.init_params(ATT, seed=2, dtype="float32")
    x, eps = _batch(ATT, 6, np.float32)
    loss, grads, _ = model.loss_and_grads(params, ATT, x, eps)
    with DataParallel(ATT, 2, "float32") as engine:
        loss_p, grads_p, _ = engine.loss_and_grads(params, x, eps)
    assert loss_p == pytest.approx(loss, rel=1e-5)
    for name in grads:
        assert grads_p[name].dtype == np.float32
        np.testing.assert_allclose(grads_p[name], grads[name], rtol=1e-3,
                                   atol=1e-5 * float(np.abs(grads[name]).max()))


def test_batches_of_any_size_and_new_params_each_call(engine64):
    """Growing, shrinking and a batch smaller than the worker count; params change."""
    for B, seed in ((2, 0), (9, 1), (1, 2), (4, 3)):
        params = model.init_params(ATT, seed=seed, dtype="float64")
        x, eps = _batch(ATT, B, np.float64, seed)
        loss, grads, _ = model.loss_and_grads(params, ATT, x, eps)
        loss_p, grads_p, _ = engine64.loss_and_grads(params, x, eps)
        assert loss_p == pytest.approx(loss, rel=1e-13), B
        for name in grads:
            assert rel_err(grads_p[name], grads[name]) < SAME_SUMS, (B, name)


@pytest.mark.parametrize("return_terms", [False, True])
def test_loss_only_matches_the_model(engine64, return_terms):
    params = model.init_params(ATT, seed=3, dtype="float64")
    x, eps = _batch(ATT, 5, np.float64, seed=4)
    per_example, stats = model.loss_only(params, ATT, x, eps, return_terms=return_terms)
    per_p, stats_p = engine64.loss_only(params, x, eps, return_terms=return_terms)
    np.testing.assert_allclose(per_p, per_example, rtol=1e-13)
    for key in ("recon", "kl_total", "loss"):
        assert stats_p[key] == pytest.approx(stats[key], rel=1e-13), key
    np.testing.assert_allclose(stats_p["kl"], stats["kl"], rtol=1e-12, atol=_kl_atol(ATT))
    assert ("log_weight" in stats_p) == return_terms
    if return_terms:
        np.testing.assert_allclose(stats_p["log_weight"], stats["log_weight"], rtol=1e-12)
        np.testing.assert_allclose(stats_p["recon_per_example"], stats["recon_per_example"],
                                   rtol=1e-13)


def test_evaluation_with_an_engine_gives_the_same_estimates(engine64):
    from npdraw import train as train_lib
    params = model.init_params(ATT, seed=1, dtype="float64")
    x = (np.random.default_rng(7).random((11, ATT.D)) < 0.4).astype(np.float64)
    plain = train_lib.evaluate_iwae_and_bound(params, ATT, x, 3, 4, np.random.default_rng(2))
    split = train_lib.evaluate_iwae_and_bound(params, ATT, x, 3, 4, np.random.default_rng(2),
                                              engine64)
    assert split == pytest.approx(plain, rel=1e-12)
    bound = train_lib.evaluate_bound(params, ATT, x, 4, np.random.default_rng(3))
    assert train_lib.evaluate_bound(params, ATT, x, 4, np.random.default_rng(3),
                                    engine64) == pytest.approx(bound, rel=1e-12)


def test_inputs_are_checked_before_anything_is_sent(engine64):
    params = model.init_params(ATT, seed=0, dtype="float64")
    x, eps = _batch(ATT, 4, np.float64)
    with pytest.raises(ValueError, match=r"x must hold values in \[0, 1\]"):
        engine64.loss_and_grads(params, x * 3.0, eps)
    with pytest.raises(ValueError, match="eps must have shape"):
        engine64.loss_and_grads(params, x, eps[:, :2])
    with pytest.raises(ValueError, match="built for float64"):
        engine64.loss_and_grads(model.init_params(ATT, seed=0, dtype="float32"),
                                x.astype(np.float32), eps.astype(np.float32))
    # the engine still works after refusing bad input
    loss, _, _ = engine64.loss_and_grads(params, x, eps)
    assert np.isfinite(loss)


def test_inputs_are_not_modified(engine64):
    params = model.init_params(ATT, seed=0, dtype="float64")
    x, eps = _batch(ATT, 5, np.float64)
    before = ({k: v.copy() for k, v in params.items()}, x.copy(), eps.copy())
    engine64.loss_and_grads(params, x, eps)
    for name in params:
        assert np.array_equal(params[name], before[0][name])
    assert np.array_equal(x, before[1]) and np.array_equal(eps, before[2])


def test_a_dead_worker_is_a_clear_error_and_nothing_is_left_behind():
    params = model.init_params(NOATT, seed=0, dtype="float32")
    x, eps = _batch(NOATT, 4, np.float32)
    engine = DataParallel(NOATT, 2, "float32")
    engine.loss_and_grads(params, x, eps)
    assert not _our_files()                       # unlinked once mapped
    os.kill(engine._procs[1].pid, signal.SIGKILL)
    engine._procs[1].wait()
    with pytest.raises(WorkerError, match="parallel worker 1 exited unexpectedly"):
        engine.loss_and_grads(params, x, eps)
    with pytest.raises(WorkerError, match="closed"):
        engine.loss_and_grads(params, x, eps)
    engine.close()                                # closing twice is harmless
    assert all(p.poll() is not None for p in engine._procs)


def test_a_worker_error_and_an_interrupted_wait_close_the_engine(monkeypatch):
    engine = DataParallel(NOATT, 2, "float32")
    engine._send(0, {"cmd": "nope"})
    with pytest.raises(WorkerError, match="parallel worker 0 failed: unknown command 'nope'"):
        engine._receive(0)
    assert engine._closed and all(p.poll() is not None for p in engine._procs)

    engine = DataParallel(NOATT, 2, "float32")
    params = model.init_params(NOATT, seed=0, dtype="float32")
    x, eps = _batch(NOATT, 4, np.float32)

    def interrupted(k):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "_receive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.loss_and_grads(params, x, eps)
    assert engine._closed and all(p.poll() is not None for p in engine._procs)


def test_stray_output_on_a_workers_stdout_is_ignored(tmp_path, monkeypatch):
    """Something printing at interpreter start-up (here a sitecustomize) must not
    break the protocol on the workers' stdout."""
    (tmp_path / "sitecustomize.py").write_text("print('hello from start-up')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    params = model.init_params(NOATT, seed=0, dtype="float64")
    x, eps = _batch(NOATT, 4, np.float64)
    loss, _, _ = model.loss_and_grads(params, NOATT, x, eps)
    with DataParallel(NOATT, 2, "float64") as engine:
        assert engine.loss_and_grads(params, x, eps)[0] == pytest.approx(loss, rel=1e-13)


def test_close_stops_the_workers():
    engine = DataParallel(NOATT, 2, "float32")
    procs = list(engine._procs)
    engine.close()
    assert all(p.poll() is not None for p in procs)
    assert not _our_files()


def test_bad_engine_arguments():
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        DataParallel(ATT, 0)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        DataParallel(ATT, 2, "float16")
    with pytest.raises(ValueError, match="cfg must be a DrawConfig"):
        DataParallel({"T": 3}, 2)


def test_worker_count_resolution():
    assert auto_workers(1) == 1
    assert auto_workers(10 ** 6) == usable_cores()
    assert auto_workers(100) == max(1, min(usable_cores(), 100 // 32))
    assert resolve_workers(0, "cpu", 100) == auto_workers(100)
    assert resolve_workers(3, "cpu", 100) == 3
    assert resolve_workers(0, "gpu", 100) == 1
    with pytest.raises(ValueError, match="on the GPU use 0 or 1"):
        resolve_workers(2, "gpu", 100)
    with pytest.raises(ValueError, match="workers must be 0"):
        TrainConfig(workers=-1)


def test_workers_run_as_batch_jobs(engine64):
    """A woken worker must not preempt the parent while it is still handing out slices
    (Linux; elsewhere the workers keep the default policy, and still answer)."""
    if not hasattr(os, "sched_getscheduler"):
        assert all(proc.poll() is None for proc in engine64._procs)
        return
    for proc in engine64._procs:
        assert os.sched_getscheduler(proc.pid) == os.SCHED_BATCH
