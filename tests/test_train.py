"""npdraw.train: learning, exact resume, guards, checkpoints, evaluation, rendering.

Runs on the real binarized MNIST (the offline mirror of conftest.bmnist_mirror), with
tiny models so the whole file takes well under a minute on two cores.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npdraw import checkpoint as ckpt_lib
from npdraw import model as model_lib
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw import evaluate as evaluate_lib
from npdraw import frames as frames_lib
from npdraw.config import DrawConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = DrawConfig(T=3, read_n=2, write_n=3, enc_dim=16, dec_dim=16, z_dim=4)


def _tcfg(tmp_path, **kw):
    base = dict(epochs=1, batch_size=50, subset=200, eval_subset=200, seed=3, device="cpu", out=str(tmp_path),
                name="run")
    base.update(kw)
    return TrainConfig(**base)


def _quiet(lines):
    return lines.append


def _params(path):
    return ckpt_lib.load_checkpoint(path).params


# ----------------------------------------------------------------------------- learning

# One epoch on 2,000 images: the attention-free model sees the whole image at every
# glimpse and learns fastest.
LEARN = DrawConfig(T=8, enc_dim=64, dec_dim=64, z_dim=10, attention=False)
# The paper's attention model (read 2x2, write 5x5), scaled down in T and width: a 2x2
# read sees little per glimpse, so it needs a few passes over the same 2,000 images.
LEARN_ATTENTION = DrawConfig(T=8, enc_dim=64, dec_dim=64, z_dim=10, read_n=2, write_n=5)


# Run in a child process with one BLAS thread: these small matrix products gain
# nothing from threads, and OpenBLAS threads on a busy two-core machine can make the
# same epoch take many times longer.
_LEARN_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw import evaluate as evaluate_lib
from npdraw import frames as frames_lib
from npdraw.config import DrawConfig, TrainConfig
from npdraw.data import load_splits
data_dir, mirror, out, cfg_json, epochs, lr = sys.argv[2:8]
cfg = DrawConfig.from_dict(json.loads(cfg_json))
data = load_splits("bmnist", data_dir=data_dir, mirror=mirror, progress=False)
start = evaluate_lib.evaluate_bound(train_lib.init_model(cfg, 0, data.train[:2000]), cfg,
                                 data.valid[:2000], 500, np.random.default_rng(0))
tcfg = TrainConfig(epochs=int(epochs), batch_size=20, subset=2000, eval_subset=2000,
                   lr=float(lr), seed=0, device="cpu", out=out, name="learn",
                   data_dir=data_dir, mirror=mirror)
run = train_lib.train(cfg, tcfg, log=lambda *a: None, data=data, progress=False)
params = runs_lib.load_checkpoint(run / "checkpoint.h5").params
x = data.test[:200]
ev = {"bound": evaluate_lib.evaluate_bound(params, cfg, x, 100, np.random.default_rng(0)),
      "bound_b200": evaluate_lib.evaluate_bound(params, cfg, x, 200, np.random.default_rng(0))}
ev["iwae10"], ev["bound10"] = evaluate_lib.evaluate_iwae_and_bound(params, cfg, x, 10, 200,
                                                                np.random.default_rng(1))
ev["iwae1"] = evaluate_lib.evaluate_iwae(params, cfg, x, 1, 200, np.random.default_rng(2))
print(json.dumps({"start": start, "run": str(run), "eval": ev}))
"""


def _learn(cfg, epochs, lr, data_dir, mirror, out):
    """Train cfg for `epochs` on 2,000 real images in a child process, then evaluate
    it on 200 test images: (bound of the initial params, run dir, dict of estimates)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _LEARN_SCRIPT, str(REPO), str(data_dir),
                           str(mirror), str(out), json.dumps(cfg.to_dict()), str(epochs),
                           str(lr)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["start"], Path(result["run"]), result["eval"]


@pytest.fixture(scope="module")
def learned(bmnist_data_dir, bmnist_mirror, tmp_path_factory):
    """One epoch of LEARN on 2,000 real images (see _learn)."""
    return _learn(LEARN, 1, 5e-3, bmnist_data_dir, bmnist_mirror, tmp_path_factory.mktemp("learned"))


def test_attention_model_learns_on_real_images(bmnist_data_dir, bmnist_mirror, tmp_path):
    start, run, _ = _learn(LEARN_ATTENTION, 6, 3e-3, bmnist_data_dir, bmnist_mirror, tmp_path)
    rows = runs_lib.read_log(run)
    assert 195 < start < 215
    assert rows[-1]["valid_bound"] < 0.9 * start, (start, [r["valid_bound"] for r in rows])
    assert rows[-1]["train_kl"] > 1.0          # the encoder's reads reach the latents


def test_one_epoch_on_real_images_lowers_the_bound_clearly(learned):
    start, run, _ = learned
    assert 195 < start < 215          # about the entropy of the mean binarized-MNIST image
    row = runs_lib.read_log(run)[0]
    assert row["valid_bound"] < 0.9 * start, (start, row)
    assert row["test_bound"] < 0.9 * start
    assert len(row["kl"]) == LEARN.T and all(k >= 0 for k in row["kl"])
    assert row["train_kl"] > 1.0                        # the latents are in use
    assert row["train_kl"] == pytest.approx(sum(row["kl"]))
    assert row["grad_norm"] > 0 and row["step_norm"] > 0 and row["examples_per_s"] > 0
    assert row["step"] == 2000 // 20 and row["best"] is True


def test_c0_starts_at_the_logit_of_the_mean_image(bmnist):
    x = bmnist.train[:500]
    params = train_lib.init_model(TINY, 0, x)
    mean = np.clip(x.mean(axis=0), train_lib.C0_CLIP, 1 - train_lib.C0_CLIP)
    np.testing.assert_allclose(1 / (1 + np.exp(-params["c0"].astype(np.float64))), mean,
                               rtol=1e-4, atol=1e-7)
    assert np.isfinite(params["c0"]).all() and params["c0"].dtype == np.float32


# ----------------------------------------------------------------------------- run dir, log

def test_run_dir_layout_config_and_log(bmnist, tmp_path):
    lines = []
    run = train_lib.train(TINY, _tcfg(tmp_path, epochs=2), log=lines.append, data=bmnist,
                          progress=False)
    assert run == tmp_path / "run"
    for name in ("config.json", "log.jsonl", "checkpoint.h5", "best.h5", "samples.png",
                 "samples.gif"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "config.json").read_text())
    assert DrawConfig.from_dict(saved["model"]) == TINY
    assert TrainConfig.from_dict(saved["train"]).subset == 200
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["step"] == 2 * 200 // 50
    for key in ("train_bound", "valid_bound", "test_bound", "kl", "grad_norm", "step_norm",
                "train_time_s", "eval_time_s", "wall_s", "examples_per_s", "train_recon", "lr",
                "best", "time", "step", "train_kl"):
        assert key in rows[0], key
    assert any("model config" in l for l in lines) and any(l.startswith("epoch 2/2") for l in lines)
    ckpt = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    assert ckpt.epoch == 2 and ckpt.cfg == TINY and ckpt.opt_state["step"] == 8
    best = ckpt_lib.load_checkpoint(run / "best.h5")
    best_epoch = min(rows, key=lambda r: r["valid_bound"])["epoch"]
    assert best.epoch == best_epoch and best.extra["best_epoch"] == best_epoch

    # The same name again makes a new dir instead of clobbering this one.
    again = runs_lib.unique_run_dir(tmp_path, "run")
    assert again == tmp_path / "run-2" and again.is_dir()
    assert (run / "log.jsonl").read_text().count("\n") == 2


def test_noise_drawn_ahead_is_the_inline_sequence(bmnist, tmp_path, monkeypatch):
    """Each step's noise, drawn on a thread while the previous step's Adam runs, is what
    drawing it inline from the run's generator gives: the permutation, then eps per step."""
    seen = []
    real = train_lib.model_lib.loss_and_grads

    def recording(params, cfg, x, eps):
        seen.append(np.array(eps))
        return real(params, cfg, x, eps)

    monkeypatch.setattr(train_lib.model_lib, "loss_and_grads", recording)
    tcfg = _tcfg(tmp_path, epochs=2, subset=130, batch_size=50)   # 50, 50, 30
    train_lib.train(TINY, tcfg, log=_quiet([]), data=bmnist, progress=False)
    rng = runs_lib.new_rng(tcfg.seed)
    expected = []
    for _ in range(2):
        rng.permutation(130)
        expected += [rng.standard_normal((TINY.T, n, TINY.z_dim), dtype=np.float32)
                     for n in (50, 50, 30)]
    assert len(seen) == len(expected) == 6
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- resume

def test_resume_is_bitwise_identical_to_a_straight_run(bmnist, tmp_path):
    straight = train_lib.train(TINY, _tcfg(tmp_path, epochs=2, name="straight"), log=_quiet([]),
                               data=bmnist, progress=False)
    split = train_lib.train(TINY, _tcfg(tmp_path, epochs=1, name="split"), log=_quiet([]),
                            data=bmnist, progress=False)
    first_line = (split / "log.jsonl").read_text()
    # A line written after the last checkpoint (a crash before the save) is dropped.
    with open(split / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "train_bound": -1.0}) + "\n")
    resumed = train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(split)),
                              log=_quiet([]), data=bmnist, progress=False)
    assert resumed == split

    a = ckpt_lib.load_checkpoint(straight / "checkpoint.h5")
    b = ckpt_lib.load_checkpoint(split / "checkpoint.h5")
    assert a.epoch == b.epoch == 2
    assert set(a.params) == set(b.params)
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
        assert np.array_equal(a.opt_state["m"][name], b.opt_state["m"][name]), name
        assert np.array_equal(a.opt_state["v"][name], b.opt_state["v"][name]), name
    assert a.opt_state["step"] == b.opt_state["step"] == 8
    assert a.rng_state == b.rng_state
    log_text = (split / "log.jsonl").read_text()
    assert log_text.startswith(first_line)          # earlier lines kept
    rows_a, rows_b = runs_lib.read_log(straight), runs_lib.read_log(split)
    assert [r["epoch"] for r in rows_b] == [1, 2]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("train_bound", "valid_bound", "test_bound", "kl", "grad_norm", "step_norm"):
            assert ra[key] == rb[key], key

    # Resuming to a target already reached changes nothing.
    before = (split / "checkpoint.h5").read_bytes()
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(split)),
                    log=_quiet([]), data=bmnist, progress=False)
    assert (split / "checkpoint.h5").read_bytes() == before


def test_a_run_folder_saved_with_the_retired_workers_field_resumes(bmnist, tmp_path):
    """Runs and models of earlier versions saved `"workers": 0` (the worker processes that
    the MPI ranks replaced): their configs still load, the field dropped, and they resume."""
    import h5py
    run = train_lib.train(TINY, _tcfg(tmp_path, epochs=1), log=_quiet([]), data=bmnist,
                          progress=False)
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "ranks"}
    old.update(workers=0, epochs=1, batch_size=50, subset=200, eval_subset=200, seed=3,
               device="cpu", out=str(tmp_path), name="run")
    with h5py.File(run / "checkpoint.h5", "r+") as f:           # as an earlier version wrote it
        del f.attrs["digest"]
        f.attrs["train_config"] = json.dumps(old)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "train": old}))

    saved = runs_lib.train_config_of(ckpt_lib.load_checkpoint(run / "checkpoint.h5"))
    assert saved == TrainConfig.from_dict({**old, "workers": 2}) and saved.ranks == 0
    with pytest.raises(ValueError, match="unknown TrainConfig fields: .'threads'."):
        TrainConfig.from_dict({**old, "threads": 2})           # only retired names are dropped
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(run)),
                    log=_quiet([]), data=bmnist, progress=False)
    assert ckpt_lib.load_checkpoint(run / "checkpoint.h5").epoch == 2
    assert "workers" not in json.loads((run / "config.json").read_text())["train"]


# ----------------------------------------------------------------------------- guards

def _patched_loss(monkeypatch, fail_at_call, make_failure):
    """Wrap model.loss_and_grads; call number ``fail_at_call`` (1-based) fails."""
    real = model_lib.loss_and_grads
    calls = {"n": 0, "snapshots": []}

    def fake(params, cfg, x, eps):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            return make_failure(real, params, cfg, x, eps)
        return real(params, cfg, x, eps)

    monkeypatch.setattr(model_lib, "loss_and_grads", fake)
    return calls


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(
        bmnist, tmp_path, monkeypatch):
    per_epoch = 200 // 50
    seen = {}

    def nan_loss(real, params, cfg, x, eps):
        seen["ckpt"] = _params(tmp_path / "run" / "checkpoint.h5")
        loss, grads, stats = real(params, cfg, x, eps)
        return float("nan"), grads, stats

    _patched_loss(monkeypatch, per_epoch + 2, nan_loss)     # epoch 2, iteration 2
    lines = []
    with pytest.raises(runs_lib.NonFiniteLossError) as info:
        train_lib.train(TINY, _tcfg(tmp_path, epochs=3), log=lines.append, data=bmnist,
                        progress=False)
    message = str(info.value)
    assert "nan" in message and "epoch 2" in message and "iteration 2/4" in message
    assert info.value.run_dir == tmp_path / "run"
    assert any("epoch 2" in l and "nan" in l for l in lines)
    ckpt = ckpt_lib.load_checkpoint(tmp_path / "run" / "checkpoint.h5")
    assert ckpt.epoch == 1
    for name, value in seen["ckpt"].items():
        assert np.array_equal(ckpt.params[name], value), name
    assert all(np.isfinite(v).all() for v in ckpt.params.values())
    assert len(runs_lib.read_log(tmp_path / "run")) == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_infinite_gradient_norm_is_caught_too(bmnist, tmp_path, monkeypatch):
    def inf_grads(real, params, cfg, x, eps):
        loss, grads, stats = real(params, cfg, x, eps)
        grads = dict(grads)
        grads["c0"] = grads["c0"] * np.float32("inf")
        return loss, grads, stats

    _patched_loss(monkeypatch, 3, inf_grads)
    with pytest.raises(runs_lib.NonFiniteLossError,
                       match=r"gradient norm is (inf|nan) at epoch 1"):
        train_lib.train(TINY, _tcfg(tmp_path), log=_quiet([]), data=bmnist, progress=False)
    ckpt = ckpt_lib.load_checkpoint(tmp_path / "run" / "checkpoint.h5")
    assert ckpt.epoch == 0 and all(np.isfinite(v).all() for v in ckpt.params.values())


def test_ctrl_c_keeps_the_last_completed_epoch_and_resumes_exactly(bmnist, tmp_path, monkeypatch):
    straight = train_lib.train(TINY, _tcfg(tmp_path, epochs=2, name="straight"), log=_quiet([]),
                               data=bmnist, progress=False)

    def interrupt(real, params, cfg, x, eps):
        raise KeyboardInterrupt

    _patched_loss(monkeypatch, 200 // 50 + 3, interrupt)
    lines = []
    with pytest.raises(runs_lib.TrainingInterrupted) as info:
        train_lib.train(TINY, _tcfg(tmp_path, epochs=2, name="stopped"), log=lines.append,
                        data=bmnist, progress=False)
    run = tmp_path / "stopped"
    assert info.value.run_dir == run
    assert "interrupted in epoch 2" in lines[-1] and "--resume" in lines[-1]
    assert ckpt_lib.load_checkpoint(run / "checkpoint.h5").epoch == 1
    monkeypatch.undo()
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(run)), log=_quiet([]),
                    data=bmnist, progress=False)
    a, b = _params(straight / "checkpoint.h5"), _params(run / "checkpoint.h5")
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- oldmodel

def test_oldmodel_of_another_config_is_a_clear_error(bmnist, tmp_path):
    other = DrawConfig(T=3, read_n=2, write_n=3, enc_dim=16, dec_dim=16, z_dim=7)
    path = tmp_path / "other.h5"
    ckpt_lib.save_checkpoint(path, other, model_lib.init_params(other, 0))
    with pytest.raises(ValueError, match=r"--oldmodel .*does not fit.*(z|shape)"):
        train_lib.train(TINY, _tcfg(tmp_path, oldmodel=str(path)), log=_quiet([]), data=bmnist,
                        progress=False)


def test_oldmodel_initialises_the_parameters(bmnist, tmp_path, monkeypatch):
    old = model_lib.init_params(TINY, 123)
    path = tmp_path / "old.h5"
    ckpt_lib.save_checkpoint(path, TINY, old)
    first = {}

    def capture(real, params, cfg, x, eps):
        first.update({k: np.array(v) for k, v in params.items()})
        return real(params, cfg, x, eps)

    _patched_loss(monkeypatch, 1, capture)
    train_lib.train(TINY, _tcfg(tmp_path, oldmodel=str(path)), log=_quiet([]), data=bmnist,
                    progress=False)
    assert set(first) == set(old)
    assert all(np.array_equal(first[k], old[k]) for k in old)   # c0 not re-initialised


def test_corrupt_checkpoint_is_a_value_error(tmp_path):
    path = tmp_path / "bad.h5"
    ckpt_lib.save_checkpoint(path, TINY, model_lib.init_params(TINY, 0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged or truncated"):
        runs_lib.load_checkpoint(path)
    with pytest.raises(ValueError, match="does not exist"):
        runs_lib.load_checkpoint(tmp_path / "missing.h5")


# ----------------------------------------------------------------------------- evaluation

def test_iwae_is_at_least_as_tight_as_the_bound(learned):
    _, run, ev = learned
    bound, iwae, bound_k = ev["bound"], ev["iwae10"], ev["bound10"]
    assert math.isfinite(bound) and 100 < bound < 200
    assert bound_k == pytest.approx(bound, rel=0.01)        # the same bound, other noise
    assert iwae < bound_k - 0.5       # K=10 on a model that uses its latents: clearly tighter
    assert iwae > bound_k - 30
    assert ev["iwae1"] == pytest.approx(bound, rel=0.02)    # K=1: a single-sample bound
    # The batch size does not change the estimate beyond its noise.
    assert ev["bound_b200"] == pytest.approx(bound, rel=0.01)
    params = _params(run / "checkpoint.h5")
    x = np.zeros((0, LEARN.D), np.float32)
    assert math.isnan(evaluate_lib.evaluate_bound(params, LEARN, x, 10, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="at least 1"):
        evaluate_lib.evaluate_iwae(params, LEARN, x, 0, 10, np.random.default_rng(0))


# ----------------------------------------------------------------------------- rendering

def test_window_box_covers_the_filter_span():
    # centre of a 28-pixel image, stride 2, N=5: [14.5 - 5, 14.5 + 5] in 1-based coords,
    # i.e. 0-based continuous [9, 19] -> pixel columns 9..18.
    assert frames_lib.window_box(14.5, 14.5, 2.0, 5, 28, 28) == (9, 9, 18, 18)
    assert frames_lib.window_box(14.5, 14.5, 2.0, 5, 28, 28, scale=2) == (18, 18, 37, 37)
    assert frames_lib.window_box(1.0, 28.0, 100.0, 5, 28, 28) == (0, 0, 27, 27)   # clipped
    assert frames_lib.window_box(-50.0, 10.0, 1.0, 3, 28, 28) is None             # outside
    assert frames_lib.window_box(float("nan"), 10.0, 1.0, 3, 28, 28) is None


def test_render_frames_draws_red_write_windows():
    T, B = 4, 6
    rng = np.random.default_rng(0)
    canvases = rng.uniform(0, 1, (T, B, 28 * 28)).astype(np.float32) * 0.0   # black images
    windows = {"cx": np.full((T, B), 14.5), "cy": np.full((T, B), 14.5),
               "stride": np.full((T, B), 1.0), "sigma": np.ones((T, B)), "N": 5}
    frames = frames_lib.render_frames(canvases, windows, (1, 28, 28), 2, 3, boxes=True, scale=2)
    plain = frames_lib.render_frames(canvases, windows, (1, 28, 28), 2, 3, boxes=False, scale=2)
    assert len(frames) == T
    assert frames[0].ndim == 3 and frames[0].shape[2] == 3 and frames[0].dtype == np.uint8
    red = (frames[0][..., 0] > 200) & (frames[0][..., 1] < 50) & (frames[0][..., 2] < 50)
    # one 10x10 box outline (36 pixels) per tile, 6 tiles
    assert red.sum() == 6 * 36
    assert not ((plain[0][..., 0] > 200) & (plain[0][..., 1] < 50)).any()
    with pytest.raises(ValueError, match="needs 9 images"):
        frames_lib.render_frames(canvases, None, (1, 28, 28), 3, 3)


# ----------------------------------------------------------------------------- peepholes
# A model without peepholes continued with them (--oldmodel or --resume into --peepholes):
# the new vectors start at zero, so the first batch, with the same noise, has the same loss.

TINY_PEEP = DrawConfig(T=3, read_n=2, write_n=3, enc_dim=16, dec_dim=16, z_dim=4, peepholes=True)


def _first_loss(monkeypatch):
    """Record the params and loss of every training batch's loss_and_grads call."""
    real = model_lib.loss_and_grads
    seen = []

    def record(params, cfg, x, eps):
        out = real(params, cfg, x, eps)
        seen.append((cfg, {k: np.array(v) for k, v in params.items()}, out[0]))
        return out

    monkeypatch.setattr(model_lib, "loss_and_grads", record)
    return seen


def test_oldmodel_without_peepholes_starts_them_at_zero(bmnist, tmp_path, monkeypatch):
    path = tmp_path / "old.h5"
    ckpt_lib.save_checkpoint(path, TINY, model_lib.init_params(TINY, 123, dtype="float64"))
    seen = _first_loss(monkeypatch)
    for cfg, name in ((TINY, "plain"), (TINY_PEEP, "peep")):
        lines = []
        train_lib.train(cfg, _tcfg(tmp_path, oldmodel=str(path), name=name, dtype="float64"),
                        log=lines.append, data=bmnist, progress=False)
        seen.append(lines)
    plain, peep = seen[0], seen[5]              # 4 batches a run, then its log lines
    assert any("has no peepholes: they start at zero" in line for line in seen[9])
    assert peep[0].peepholes and not peep[1]["enc_peep"].any() and not peep[1]["dec_peep"].any()
    assert peep[2] == pytest.approx(plain[2], rel=1e-12)
    saved = ckpt_lib.load_checkpoint(tmp_path / "peep" / "checkpoint.h5")
    assert saved.cfg.peepholes and saved.params["enc_peep"].any()      # and they learn


def test_resume_into_peepholes_keeps_the_first_loss(bmnist, tmp_path, monkeypatch):
    import shutil
    run = train_lib.train(TINY, _tcfg(tmp_path, name="run", dtype="float64"), log=_quiet([]),
                          data=bmnist, progress=False)
    shutil.copytree(run, tmp_path / "copy")
    seen = _first_loss(monkeypatch)
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(run)),
                    log=_quiet([]), data=bmnist, progress=False)
    lines = []
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(tmp_path / "copy")),
                    log=lines.append, data=bmnist, progress=False, add_peepholes=True)
    plain, peep = seen[0], seen[4]
    assert "note: resuming with peepholes True (was False)" in lines
    assert peep[0].peepholes and not plain[0].peepholes
    assert peep[2] == pytest.approx(plain[2], rel=1e-12)
    saved = ckpt_lib.load_checkpoint(tmp_path / "copy" / "checkpoint.h5")
    assert saved.cfg.peepholes and saved.params["dec_peep"].any()
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["model"]["peepholes"] is True
    other = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    assert set(saved.opt_state["m"]) == set(other.opt_state["m"]) | {"enc_peep", "dec_peep"}
    assert saved.opt_state["step"] == other.opt_state["step"]


def test_resume_into_peepholes_starts_their_adam_moments_at_zero(bmnist, tmp_path, monkeypatch):
    from npdraw import optim
    run = train_lib.train(TINY, _tcfg(tmp_path, name="run"), log=_quiet([]), data=bmnist,
                          progress=False)
    real, first = optim.adam_step, []

    def capture(params, grads, state, *args, **kwargs):
        if not first:
            first.append({k: {n: np.array(a) for n, a in state[k].items()} for k in "mv"})
        return real(params, grads, state, *args, **kwargs)

    monkeypatch.setattr(optim, "adam_step", capture)
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(run)),
                    log=_quiet([]), data=bmnist, progress=False, add_peepholes=True)
    for k in "mv":
        assert list(first[0][k]) == list(model_lib.param_shapes(TINY_PEEP))
        assert not first[0][k]["enc_peep"].any() and not first[0][k]["dec_peep"].any()
        assert first[0][k]["enc_W"].any()                        # the others are continued


# ----------------------------------------------------------------------------- clipping

def test_one_step_with_a_small_clip_is_loss_and_grads_then_clipped_adam(bmnist, tmp_path):
    """One step with a small --clip: the parameters are Adam's step of the clipped
    gradients and the moments hold them, so a loop that stops clipping fails here."""
    from npdraw import optim
    tcfg = _tcfg(tmp_path, subset=50, eval_subset=10, clip=0.003)
    run = train_lib.train(TINY, tcfg, log=_quiet([]), data=bmnist, progress=False)
    x = np.asarray(bmnist.train[:50], np.float32)
    params = train_lib.init_model(TINY, tcfg.seed, x)
    rng = runs_lib.new_rng(tcfg.seed)
    perm = rng.permutation(50)
    eps = rng.standard_normal((TINY.T, 50, TINY.z_dim), dtype=np.float32)
    _, grads, _ = model_lib.loss_and_grads(params, TINY, x[perm], eps)
    norm = optim.global_norm(grads)
    scale = optim.clip_scale(norm, tcfg.clip)
    assert scale < 0.2, norm                            # clipping is far from a no-op
    want, _, _ = optim.adam_step(params, grads, optim.adam_init(params), tcfg.lr, tcfg.beta1,
                                 tcfg.beta2, tcfg.adam_eps, grad_scale=scale)
    got = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    assert got.opt_state["step"] == 1
    for name in want:
        np.testing.assert_array_equal(got.params[name], want[name], err_msg=name)
    # Adam's first step is lr*sign(g) whatever the scale; the moments show the clipping.
    for name in want:
        m = got.opt_state["m"][name]
        np.testing.assert_allclose(m, (1 - tcfg.beta1) * scale * grads[name], rtol=1e-6,
                                   atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got.opt_state["v"][name],
                                   (1 - tcfg.beta2) * (scale * grads[name]) ** 2,
                                   rtol=1e-5, atol=1e-30, err_msg=name)


def test_a_resume_keeps_the_runs_own_total_unless_a_new_one_is_given():
    """--resume without --epochs carries on to the total the run was started with (it took
    the option's default, 20, before); given (the CLI names it among the overrides), or a
    library caller's total other than the default, it is the new total. Both loops."""
    import types
    from npdraw.config import ClassifierConfig, ClassifyConfig
    saved = TrainConfig(epochs=300, lr=1e-3)
    ckpt = types.SimpleNamespace(cfg=DrawConfig(T=2), train_cfg=saved.to_dict())
    notes = []

    def total(tcfg, overrides=()):
        return runs_lib.resumed_configs(None, tcfg, ckpt, overrides, False, notes.append)[1].epochs
    assert total(TrainConfig(resume="run")) == 300
    assert total(TrainConfig(resume="run", epochs=20), ("epochs",)) == 20
    assert notes == ["note: resuming with epochs 20 (was 300)"]
    assert total(TrainConfig(resume="run", epochs=40)) == 40
    clf = types.SimpleNamespace(cfg=ClassifierConfig(), train_cfg=ClassifyConfig(epochs=7).to_dict())

    def clf_total(ccfg, overrides=()):
        return runs_lib.resumed_classify_config(None, ccfg, clf, overrides, notes.append)[1].epochs
    assert clf_total(ClassifyConfig(resume="run")) == 7
    assert clf_total(ClassifyConfig(resume="run", epochs=100), ("epochs",)) == 100
    assert clf_total(ClassifyConfig(resume="run", epochs=9)) == 9


def test_the_log_says_when_the_numba_kernels_run(bmnist, tmp_path, monkeypatch):
    """NPDRAW_KERNELS=numba (here set_kernels) is named on the device line; NumPy's, the
    default, is not."""
    from npdraw import engine_layers
    monkeypatch.setattr(engine_layers, "_numba", engine_layers._numba)
    for kernels in ("numpy", "numba"):
        engine_layers.set_kernels(kernels)
        lines = []
        train_lib.train(TINY, _tcfg(tmp_path, epochs=1, name=kernels), log=lines.append,
                        data=bmnist, progress=False)
        (device,) = [line for line in lines if line.startswith("device ")]
        assert ("Numba kernels" in device) == (kernels == "numba"), device


def test_a_resume_elsewhere_drops_a_mirror_folder_that_is_not_there(tmp_path):
    """A run's state moved to another machine (pretrained/*.run) records the training
    machine's mirror folder: absent here, the resume goes on without it, and says so; a
    folder that exists, or a mirror given anew, is kept."""
    import types
    notes = []

    def mirror_of(saved_mirror, given=""):
        saved = TrainConfig(mirror=saved_mirror)
        ckpt = types.SimpleNamespace(cfg=DrawConfig(T=2), train_cfg=saved.to_dict())
        tcfg = TrainConfig(resume="run", mirror=given)
        return runs_lib.resumed_configs(None, tcfg, ckpt, (), False, notes.append)[1].mirror
    gone = str(tmp_path / "elsewhere" / "binarized_mnist")
    assert mirror_of(gone) == ""
    assert notes == [f"note: the run's mirror folder {gone} is not on this machine; resuming "
                     "without it (give --mirror for another)"]
    assert mirror_of(str(tmp_path)) == str(tmp_path)
    assert mirror_of("https://example.org/data/") == "https://example.org/data/"
    assert mirror_of(gone, given=str(tmp_path)) == str(tmp_path)
    assert len(notes) == 1
