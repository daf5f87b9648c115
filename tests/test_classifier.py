"""The attentive classifier of cluttered MNIST (paper table 1): softmax cross-entropy and
BPTT gradient checks, the fast path against the plain reference, input checks, training
(learning, exact resume, the run dir) and the glimpse pictures."""
import json

import numpy as np
import pytest

from npdraw import checkpoint as ckpt_lib
from npdraw import classifier as clf
from npdraw.data import synthetic
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw import frames as frames_lib
from npdraw.config import ClassifierConfig, ClassifyConfig
from npdraw.layers import softmax_xent_backward, softmax_xent_forward
from npdraw.reference import classifier as ref
from gradcheck import numeric_grad, rel_err, sample_indices

TOL = 1e-6   # centred differences in float64 land near 1e-9 here
SMALL = ClassifierConfig(height=12, width=12, glimpses=3, read_n=3, hidden=5, classes=4)


def _perturbed_params(cfg, seed=1):
    """float64 params moved off their start, so that every path carries gradient."""
    rng = np.random.default_rng(seed)
    params = ref.init_params(cfg, seed, "float64")
    return {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}


# ----------------------------------------------------------------------------- softmax

def test_softmax_xent_values_and_gradients():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4)) * 3
    labels = np.array([0, 3, 1, 2, 3])
    (loss, probs), cache = softmax_xent_forward(logits, labels)
    direct = -np.log(np.exp(logits[np.arange(5), labels]) / np.exp(logits).sum(axis=1))
    np.testing.assert_allclose(loss, direct, rtol=1e-13)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-14)
    weights = rng.standard_normal(5)

    def f():
        return float((softmax_xent_forward(logits, labels)[0][0] * weights).sum())
    assert rel_err(softmax_xent_backward(weights, cache).ravel(), numeric_grad(f, logits)) < TOL
    kept = logits.copy()
    mean_grad = softmax_xent_backward(0.2, cache)       # a python-number upstream gradient
    np.testing.assert_allclose(mean_grad, softmax_xent_backward(np.full(5, 0.2), cache))
    np.testing.assert_array_equal(logits, kept)         # the inputs are not written into


def test_softmax_xent_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    (loss, probs), cache = softmax_xent_forward(logits, np.array([1]))
    assert np.isfinite(loss).all() and np.isfinite(probs).all()
    assert loss[0] == pytest.approx(1000.0)
    np.testing.assert_allclose(softmax_xent_backward(1.0, cache), [[1.0, -1.0, 0.0]], atol=1e-6)


# ----------------------------------------------------------------------------- BPTT

def test_reference_bptt_matches_finite_differences():
    params = _perturbed_params(SMALL)
    rng = np.random.default_rng(2)
    x, labels = rng.random((4, 144)), np.array([0, 3, 1, 2])
    _, cache = ref.forward(params, SMALL, x, labels)
    grads = ref.backward(params, SMALL, cache)

    def f():
        return float(ref.forward(params, SMALL, x, labels)[0][0].mean())
    for name, value in params.items():
        idx = sample_indices(value.size, 40, rng)
        assert rel_err(grads[name].ravel()[idx], numeric_grad(f, value, idx)) < TOL, name


def test_fast_path_matches_the_reference():
    cfg = ClassifierConfig(height=20, width=20, glimpses=4, read_n=4, hidden=7, classes=10)
    params = _perturbed_params(cfg)
    rng = np.random.default_rng(3)
    x, labels = rng.random((6, 400)), rng.integers(0, 10, 6)
    (loss_r, probs_r), cache_r = ref.forward(params, cfg, x, labels)
    (loss_f, probs_f), cache_f = clf.forward(params, cfg, x, labels)
    # The same equations; the fast path's attention (engine_attention) orders its sums
    # differently from the plain one (reference.draw), and sums the weight gradients in
    # one GEMM over T*B rows: float64 roundings (eps 1.1e-16) through sums of at most a
    # few hundred terms and 4 glimpses stay far below 1e-11 relative.
    np.testing.assert_allclose(loss_f, loss_r, rtol=1e-11)
    np.testing.assert_allclose(probs_f, probs_r, rtol=1e-11, atol=1e-14)
    grads_r = ref.backward(params, cfg, cache_r)
    grads_f = clf.backward(params, cfg, cache_f)
    assert set(grads_f) == set(params)
    for name in params:
        assert grads_f[name].shape == params[name].shape
        assert rel_err(grads_f[name], grads_r[name]) < 1e-11, name
    np.testing.assert_allclose(clf.predict(params, cfg, x), probs_r, rtol=1e-11, atol=1e-14)


def test_float32_fast_path_tracks_float64():
    cfg = ClassifierConfig(height=20, width=20, glimpses=4, read_n=4, hidden=7, classes=10)
    params = _perturbed_params(cfg)
    rng = np.random.default_rng(4)
    x, labels = rng.random((6, 400)), rng.integers(0, 10, 6)
    loss64, grads64, _ = clf.loss_and_grads(params, cfg, x, labels)
    params32 = {k: v.astype(np.float32) for k, v in params.items()}
    loss32, grads32, _ = clf.loss_and_grads(params32, cfg, x.astype(np.float32), labels)
    assert all(g.dtype == np.float32 for g in grads32.values())
    # float32 rounding (eps 6e-8) through 4 glimpses and a few hundred-term sums
    assert abs(loss32 - loss64) < 1e-4 * abs(loss64)
    for name in params:
        assert rel_err(grads32[name], grads64[name]) < 1e-3, name


def test_loss_and_grads_counts_errors():
    params = _perturbed_params(SMALL)
    x = np.random.default_rng(5).random((8, 144))
    probs = clf.predict(params, SMALL, x)
    labels = probs.argmax(axis=1)
    labels[:3] = (labels[:3] + 1) % SMALL.classes
    loss, _, stats = clf.loss_and_grads(params, SMALL, x, labels)
    assert stats["errors"] == 3
    assert loss == pytest.approx(float(-np.log(probs[np.arange(8), labels]).mean()))


@pytest.mark.parametrize("x, labels, text", [
    (np.zeros((2, 100)), np.zeros(2, int), "x must have shape"),
    (np.full((2, 144), 2.0), np.zeros(2, int), "values in [0, 1]"),
    (np.full((2, 144), np.nan), np.zeros(2, int), "values in [0, 1]"),
    (np.zeros((2, 144)), np.zeros(3, int), "labels must be 2 integers"),
    (np.zeros((2, 144)), np.zeros(2), "labels must be 2 integers"),
    (np.zeros((2, 144)), np.array([0, 4]), "labels must lie in 0..3"),
])
def test_bad_inputs_are_clear_errors(x, labels, text):
    with pytest.raises(ValueError, match=text.replace("[", r"\[").replace("]", r"\]")):
        clf.loss_and_grads(ref.init_params(SMALL), SMALL, x, labels)


def test_params_that_do_not_fit_are_clear_errors():
    params = ref.init_params(SMALL)
    params["out_b"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="param out_b"):
        clf.predict(params, SMALL, np.zeros((1, 144)))
    with pytest.raises(ValueError, match="classes must be an integer of at least 2"):
        ClassifierConfig(classes=1)


def test_the_first_window_tiles_the_image():
    """At the start every image is read through the same window, spread over the whole
    canvas (DRAW's read start), whatever the image holds."""
    cfg = ClassifierConfig()
    windows = clf.glimpse_windows(ref.init_params(cfg), cfg, np.random.default_rng(0).random((2, 10000)))
    assert windows["cx"][0] == pytest.approx([50.5, 50.5])
    assert windows["stride"][0] * cfg.read_n == pytest.approx([100.0, 100.0], rel=1e-5)


# ----------------------------------------------------------------------------- training

def _easy_digits(n=300, seed=0):
    """Two classes of 'digits' (a vertical and a horizontal bar) on a small canvas:
    learnable in a fraction of a second."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.float32)
    y = rng.integers(0, 2, n)
    x[y == 0, 4:24, 10:18] = 1.0            # a vertical bar
    x[y == 1, 10:18, 4:24] = 1.0            # a horizontal bar
    cut = n // 2
    return synthetic.LabelledDigits(x[:cut], y[:cut], x[cut:cut + 50], y[cut:cut + 50],
                                    x[cut + 50:], y[cut + 50:])


EASY = ClassifierConfig(height=36, width=36, glimpses=2, read_n=6, hidden=16, classes=2)


def _ccfg(tmp_path, **kw):
    base = dict(epochs=3, batch_size=25, distractors=2, crop=4, seed=1, device="cpu",
                out=str(tmp_path), name="run", lr=3e-3)
    base.update(kw)
    return ClassifyConfig(**base)


def test_training_learns_and_writes_the_run_dir(tmp_path):
    lines = []
    run = train_lib.train_classifier(EASY, _ccfg(tmp_path, epochs=8), log=lines.append,
                                     digits=_easy_digits(), progress=False)
    log = runs_lib.read_log(run)
    assert [r["epoch"] for r in log] == list(range(1, 9))
    # from chance (log 2 = 0.69) to a loss of about 0.08 in 8 epochs; the bars are easy
    assert log[0]["train_loss"] > 0.6 and log[-1]["train_loss"] < 0.25 * log[0]["train_loss"]
    assert log[-1]["valid_error"] <= 0.05 and log[-1]["train_error"] < log[0]["train_error"]
    assert all(r["train_digits"] == 150 for r in log)
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == EASY.to_dict() and config["classify"]["epochs"] == 8
    best = ckpt_lib.load_checkpoint(run / "best.h5")
    assert best.cfg == EASY and best.epoch == min(log, key=lambda r: r["valid_error"])["epoch"]
    assert any("the paper had 60,000" in line for line in lines)


def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path):
    digits = _easy_digits()
    straight = train_lib.train_classifier(EASY, _ccfg(tmp_path, name="a"), log=lambda s: None,
                                          digits=digits, progress=False)
    part = train_lib.train_classifier(EASY, _ccfg(tmp_path, name="b", epochs=1),
                                      log=lambda s: None, digits=digits, progress=False)
    train_lib.train_classifier(None, ClassifyConfig(epochs=3, resume=str(part), device="cpu"),
                               log=lambda s: None, digits=digits, progress=False)
    a = ckpt_lib.load_checkpoint(straight / "checkpoint.h5")
    b = ckpt_lib.load_checkpoint(part / "checkpoint.h5")
    assert a.epoch == b.epoch == 3
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert [r["test_error"] for r in runs_lib.read_log(straight)] == \
           [r["test_error"] for r in runs_lib.read_log(part)]


def test_resuming_a_draw_run_as_a_classifier_is_a_clear_error(tmp_path):
    from npdraw.config import DrawConfig
    from npdraw.model import init_params
    (tmp_path / "run").mkdir()
    ckpt_lib.save_checkpoint(tmp_path / "run" / "checkpoint.h5", DrawConfig(T=2, enc_dim=4, dec_dim=4,
                             z_dim=2), init_params(DrawConfig(T=2, enc_dim=4, dec_dim=4, z_dim=2)))
    with pytest.raises(ValueError, match="not a classifier run"):
        train_lib.train_classifier(None, ClassifyConfig(resume=str(tmp_path / "run")),
                                   digits=_easy_digits(), progress=False)


def test_classifier_checkpoints_round_trip(tmp_path):
    params = ref.init_params(SMALL)
    ckpt_lib.save_checkpoint(tmp_path / "c.h5", SMALL, params, epoch=2,
                             train_cfg=ClassifyConfig(epochs=7))
    back = ckpt_lib.load_checkpoint(tmp_path / "c.h5")
    assert back.cfg == SMALL and back.epoch == 2
    assert runs_lib.classify_config_of(back) == ClassifyConfig(epochs=7)
    for name in params:
        np.testing.assert_array_equal(back.params[name], params[name])


def test_glimpse_pictures_show_every_window_in_its_colour():
    cfg = ClassifierConfig(height=30, width=30, glimpses=3, read_n=3, hidden=4)
    x = np.zeros((4, 900), np.float32)
    windows = {"cx": np.array([[8.0] * 4, [15.5] * 4, [22.0] * 4]),
               "cy": np.full((3, 4), 15.5), "stride": np.full((3, 4), 2.0), "N": 3}
    frames = frames_lib.render_glimpse_frames(x, windows, (1, 30, 30), 2, 2, scale=2)
    assert len(frames) == cfg.glimpses
    colours = [tuple(int(v) for v in c) for c in
               __import__("npdraw.images", fromlist=["x"]).series_colors(3)]
    tile = frames[-1][1:61, 1:61]                     # the first image of the grid
    present = {tuple(int(v) for v in px) for px in tile.reshape(-1, 3)}
    assert set(colours) <= present
    first = {tuple(int(v) for v in px) for px in frames[0][1:61, 1:61].reshape(-1, 3)}
    assert colours[0] in first and colours[2] not in first


def test_ctrl_c_keeps_the_last_completed_epoch_and_resumes_exactly(tmp_path, monkeypatch):
    digits = _easy_digits()
    straight = train_lib.train_classifier(EASY, _ccfg(tmp_path, name="a"), log=lambda s: None,
                                          digits=digits, progress=False)
    real, calls = clf.loss_and_grads, []

    def interrupted_in_epoch_2(*args):
        calls.append(1)
        if len(calls) == 8:                  # epoch 2 (6 batches an epoch), second step
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(clf, "loss_and_grads", interrupted_in_epoch_2)
    lines = []
    with pytest.raises(runs_lib.TrainingInterrupted) as stopped:
        train_lib.train_classifier(EASY, _ccfg(tmp_path, name="b"), log=lines.append,
                                   digits=digits, progress=False)
    run = stopped.value.run_dir
    assert ckpt_lib.load_checkpoint(run / "checkpoint.h5").epoch == 1
    assert "Continue with: --resume" in lines[-1]
    monkeypatch.setattr(clf, "loss_and_grads", real)
    train_lib.train_classifier(None, ClassifyConfig(epochs=3, resume=str(run), device="cpu"),
                               log=lambda s: None, digits=digits, progress=False)
    a = ckpt_lib.load_checkpoint(straight / "checkpoint.h5")
    b = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
