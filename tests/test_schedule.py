"""Learning-rate schedules, evaluation every K epochs, resuming into a new phase, and the
export of a model to ship (issue: reproducing the paper's binarized-MNIST result)."""
import json
import math

import numpy as np
import pytest

from npdraw import checkpoint as ckpt_lib
from npdraw import model as model_lib
from npdraw import optim
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw import evaluate as evaluate_lib
from npdraw.cli import cli
from npdraw.config import DrawConfig, TrainConfig

TINY = DrawConfig(T=3, read_n=2, write_n=3, enc_dim=16, dec_dim=16, z_dim=4)


def _tcfg(tmp_path, **kw):
    base = dict(epochs=1, batch_size=50, subset=200, eval_subset=100, seed=3, device="cpu",
                out=str(tmp_path), name="run")
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg, tcfg, bmnist, **kw):
    return train_lib.train(cfg, tcfg, log=lambda *a: None, data=bmnist, progress=False, **kw)


# ----------------------------------------------------------------------------- schedules

def test_constant_and_the_hold_keep_the_base_rate():
    for t in (0.0, 0.5, 3.0, 1e6):
        assert optim.scheduled_lr("constant", 1e-3, t, lr_min=1e-5, gamma=0.5) == 1e-3
    for schedule in ("exponential", "cosine"):
        assert optim.scheduled_lr(schedule, 1e-3, 4.0, hold=4.0, gamma=0.5,
                                  decay_epochs=10) == 1e-3


def test_exponential_decays_by_gamma_per_epoch_down_to_its_floor():
    kw = dict(lr_min=1e-4, hold=2.0, gamma=0.5)
    assert optim.scheduled_lr("exponential", 1e-3, 3.0, **kw) == pytest.approx(5e-4, rel=1e-15)
    assert optim.scheduled_lr("exponential", 1e-3, 4.5, **kw) == pytest.approx(
        1e-3 * 0.5 ** 2.5, rel=1e-15)
    assert optim.scheduled_lr("exponential", 1e-3, 50.0, **kw) == 1e-4


def test_cosine_goes_from_lr_to_lr_min_over_its_decay_epochs():
    kw = dict(lr_min=1e-5, hold=1.0, decay_epochs=10.0)
    assert optim.scheduled_lr("cosine", 1e-3, 6.0, **kw) == pytest.approx(
        (1e-3 + 1e-5) / 2, rel=1e-15)
    assert optim.scheduled_lr("cosine", 1e-3, 11.0, **kw) == pytest.approx(1e-5, rel=1e-15)
    assert optim.scheduled_lr("cosine", 1e-3, 40.0, **kw) == pytest.approx(1e-5, rel=1e-15)
    rates = [optim.scheduled_lr("cosine", 1e-3, t, **kw) for t in np.linspace(0, 12, 97)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))       # never rises


def test_cosine_without_decay_epochs_runs_until_the_last_epoch():
    tcfg = TrainConfig(lr=1e-3, lr_schedule="cosine", lr_min=0.0, epochs=10)
    assert optim.learning_rate(tcfg, 5.0) == pytest.approx(5e-4, rel=1e-15)
    assert optim.learning_rate(tcfg, 10.0) == pytest.approx(0.0, abs=1e-18)


@pytest.mark.parametrize("field, value, text", [
    ("lr_schedule", "linear", "lr_schedule must be one of"),
    ("lr_min", 1.0, "lr_min must be between 0 and lr"),
    ("lr_min", float("nan"), "lr_min must be between 0 and lr"),
    ("lr_gamma", 0.0, "lr_gamma must be in (0, 1]"),
    ("lr_gamma", 1.5, "lr_gamma must be in (0, 1]"),
    ("lr_hold", -1.0, "lr_hold must be a finite number"),
    ("lr_decay_epochs", float("inf"), "lr_decay_epochs must be a finite number"),
    ("eval_every", 0, "eval_every must be at least 1"),
    ("eval_noise", "same", "eval_noise must be one of epoch, fixed"),
])
def test_bad_schedule_settings_are_named(field, value, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace("]", r"\]")):
        TrainConfig(**{field: value})


def test_each_step_uses_the_scheduled_rate(bmnist, tmp_path, monkeypatch):
    seen = []
    real = optim.adam_step

    def spy(params, grads, state, lr, *args, **kw):
        seen.append(lr)
        return real(params, grads, state, lr, *args, **kw)

    monkeypatch.setattr(optim, "adam_step", spy)
    tcfg = _tcfg(tmp_path, epochs=2, lr=1e-3, lr_schedule="exponential", lr_gamma=0.5,
                 lr_hold=0.5)
    run = _train(TINY, tcfg, bmnist)
    # 4 steps an epoch; step i (0-based) of the run sits at i/4 epochs.
    assert seen == [pytest.approx(1e-3 * 0.5 ** max(0.0, i / 4 - 0.5), rel=1e-15)
                    for i in range(8)]
    rows = runs_lib.read_log(run)
    assert rows[-1]["lr"] == seen[-1]


# ----------------------------------------------------------------------------- eval_every

def test_eval_every_evaluates_every_k_epochs_and_the_last(bmnist, tmp_path, monkeypatch):
    calls = []
    real = evaluate_lib.evaluate_bound

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(evaluate_lib, "evaluate_bound", counting)
    run = _train(TINY, _tcfg(tmp_path, epochs=5, eval_every=2), bmnist)
    rows = runs_lib.read_log(run)
    assert [r["evaluated"] for r in rows] == [False, True, False, True, True]
    assert len(calls) == 2 * 3                                 # valid and test, 3 times
    for r in rows:
        assert (r["valid_bound"] is None) == (not r["evaluated"])
        assert (r["test_bound"] is None) == (not r["evaluated"])
        assert not (r["best"] and not r["evaluated"])         # only evaluated epochs compete
    best = ckpt_lib.load_checkpoint(run / "best.h5")
    assert rows[best.epoch - 1]["evaluated"]


# ----------------------------------------------------------------------------- eval_noise

@pytest.mark.parametrize("eval_noise", ["epoch", "fixed"])
def test_eval_noise_fixed_scores_every_epoch_with_the_same_noise(bmnist, tmp_path, monkeypatch,
                                                                  eval_noise):
    """"fixed": each split's noise is the same at every epoch (and differs between the
    splits); "epoch": each epoch draws its own, the streams of every run before the field."""
    streams = []
    real = evaluate_lib.evaluate_bound

    def recording(params, cfg, x, batch_size, rng, *args, **kw):
        streams.append(rng.bit_generator.state["state"]["state"])
        return real(params, cfg, x, batch_size, rng, *args, **kw)

    monkeypatch.setattr(evaluate_lib, "evaluate_bound", recording)
    tcfg = _tcfg(tmp_path, epochs=2, eval_noise=eval_noise)
    run = _train(TINY, tcfg, bmnist)
    valid1, test1, valid2, test2 = streams
    assert valid1 != test1
    if eval_noise == "fixed":
        assert (valid1, test1) == (valid2, test2)
    else:
        assert valid1 != valid2 and test1 != test2
        old = [evaluate_lib.derived_rng(tcfg.seed, 1, epoch, split)
               .bit_generator.state["state"]["state"] for epoch in (1, 2) for split in (0, 1)]
        assert streams == old
    saved = runs_lib.train_config_of(ckpt_lib.load_checkpoint(run / "checkpoint.h5"))
    assert saved.eval_noise == eval_noise


def test_new_runs_score_with_fixed_noise_by_default():
    """The library's and the command line's defaults agree: fixed noise for new runs."""
    assert TrainConfig().eval_noise == "fixed"
    option = next(p for p in cli.commands["train"].params if p.name == "eval_noise")
    assert option.default == "fixed"


def test_an_old_config_loads_as_noise_of_each_epoch_and_a_resume_may_switch_to_fixed(bmnist,
                                                                                     tmp_path):
    """Old configs lack the field: they load as "epoch", so they resume as they ran; a
    resumed run may switch to "fixed" for its next phase."""
    run = _train(TINY, _tcfg(tmp_path, epochs=1, eval_noise="epoch"), bmnist)
    saved = json.loads((run / "config.json").read_text())
    del saved["train"]["eval_noise"]
    assert TrainConfig.from_dict(saved["train"]).eval_noise == "epoch"
    notes = []
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(run),
                                      eval_noise="fixed"),
                    log=notes.append, data=bmnist, progress=False,
                    resume_overrides=("eval_noise",))
    assert "note: resuming with eval_noise 'fixed' (was 'epoch')" in notes
    assert runs_lib.train_config_of(
        ckpt_lib.load_checkpoint(run / "checkpoint.h5")).eval_noise == "fixed"


# ----------------------------------------------------------------------------- resume

def test_a_resumed_schedule_continues_bit_for_bit(bmnist, tmp_path):
    kw = dict(lr=2e-3, lr_schedule="cosine", lr_min=1e-4, lr_decay_epochs=3.0)
    straight = _train(TINY, _tcfg(tmp_path, epochs=3, name="straight", **kw), bmnist)
    split = _train(TINY, _tcfg(tmp_path, epochs=1, name="split", **kw), bmnist)
    _train(None, TrainConfig(epochs=3, device="cpu", resume=str(split)), bmnist)
    a = ckpt_lib.load_checkpoint(straight / "checkpoint.h5")
    b = ckpt_lib.load_checkpoint(split / "checkpoint.h5")
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    assert [r["lr"] for r in runs_lib.read_log(straight)] == \
        [r["lr"] for r in runs_lib.read_log(split)]


def test_resume_can_start_a_new_phase_of_the_schedule(bmnist, tmp_path):
    run = _train(TINY, _tcfg(tmp_path, epochs=1, lr=1e-3), bmnist)
    notes = []
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(run),
                                      lr=2e-4, eval_every=3),
                    log=notes.append, data=bmnist, progress=False,
                    resume_overrides=("lr", "eval_every"))
    assert any("lr 0.0002 (was 0.001)" in n for n in notes)
    rows = runs_lib.read_log(run)
    assert [r["lr"] for r in rows] == [1e-3, 2e-4]
    assert runs_lib.train_config_of(ckpt_lib.load_checkpoint(run / "checkpoint.h5")).lr == 2e-4
    with pytest.raises(ValueError, match="a resumed run keeps its seed"):
        train_lib.train(None, TrainConfig(epochs=3, device="cpu", resume=str(run)),
                        log=notes.append, data=bmnist, progress=False,
                        resume_overrides=("seed",))


def test_resume_can_change_the_batch_size_for_a_new_phase(bmnist, tmp_path):
    """A larger batch late in training (issue 21's arm c): the note, the record in the
    checkpoint's config, and the steps of the new epoch (200 images / 100 = 2, not 4)."""
    run = _train(TINY, _tcfg(tmp_path, epochs=1, batch_size=50), bmnist)
    notes = []
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(run), batch_size=100),
                    log=notes.append, data=bmnist, progress=False,
                    resume_overrides=("batch_size",))
    assert "note: resuming with batch_size 100 (was 50)" in notes
    assert [r["step"] for r in runs_lib.read_log(run)] == [4, 6]
    assert runs_lib.train_config_of(
        ckpt_lib.load_checkpoint(run / "checkpoint.h5")).batch_size == 100


# ----------------------------------------------------------------------------- export

def test_export_keeps_the_parameters_and_a_checkable_bound(bmnist, tmp_path):
    run = _train(TINY, _tcfg(tmp_path, epochs=1), bmnist)
    out = tmp_path / "shipped.h5"
    info = runs_lib.export_model(run / "best.h5", out, bmnist.test, check_n=20, check_seed=5)
    shipped = ckpt_lib.load_checkpoint(out)
    source = ckpt_lib.load_checkpoint(run / "best.h5")
    assert shipped.opt_state is None
    assert shipped.cfg == TINY and shipped.epoch == 1
    for name, value in source.params.items():
        assert shipped.params[name].dtype == np.float32
        assert np.array_equal(shipped.params[name], value.astype(np.float32)), name
    row = runs_lib.read_log(run)[0]
    assert shipped.extra["valid_bound"] == row["valid_bound"]
    assert shipped.extra["test_bound"] == row["test_bound"]
    check = shipped.extra["check"]
    assert check == info["check"] and check["n"] == 20 and check["seed"] == 5
    # The recorded figure is the float64 bound of those images and that noise.
    params64 = {k: v.astype(np.float64) for k, v in shipped.params.items()}
    eps = np.random.default_rng(5).standard_normal((TINY.T, 20, TINY.z_dim))
    per_example, _ = model_lib.loss_only(params64, TINY, bmnist.test[:20].astype(np.float64),
                                         eps)
    assert math.isclose(check["bound"], float(np.mean(per_example)), rel_tol=1e-12)


def test_export_leaves_out_the_training_machines_folders(bmnist, tmp_path):
    """A shipped model must not name the machine it was trained on: a folder mirror and
    an absolute data folder are dropped from its recorded config; a URL mirror stays."""
    folders = dict(mirror=str(tmp_path / "mirror"), data_dir=str(tmp_path / "data"))
    run = _train(TINY, _tcfg(tmp_path, **folders), bmnist)
    assert runs_lib.train_config_of(ckpt_lib.load_checkpoint(run / "best.h5")).mirror
    runs_lib.export_model(run / "best.h5", tmp_path / "shipped.h5")
    shipped = runs_lib.train_config_of(ckpt_lib.load_checkpoint(tmp_path / "shipped.h5"))
    assert (shipped.mirror, shipped.data_dir) == ("", "data")
    assert shipped.batch_size == 50 and shipped.seed == 3           # the rest as trained
    url = TrainConfig(mirror="https://example.org/bmnist", data_dir="local")
    assert runs_lib._portable(url) == url
