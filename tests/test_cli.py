"""npdraw/cli.py (and the cli.py shim): every command on real binarized MNIST with a tiny
model, and its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from click.testing import CliRunner

import npdraw
from npdraw import checkpoint as ckpt_lib
from npdraw import cli as cli_mod
from npdraw import model as model_lib
from npdraw.config import DrawConfig

REPO = Path(__file__).resolve().parents[1]
cli = cli_mod.cli

T = 3
TINY_ARGS = ["--niter", str(T), "--attention", "2,3", "--enc-dim", "16", "--dec-dim", "16",
             "--z-dim", "4", "--bs", "50", "--subset", "200", "--eval-subset", "200",
             "--device", "cpu", "--no-progress"]


@pytest.fixture
def data_args(bmnist_data_dir, bmnist_mirror):
    return ["--data-dir", str(bmnist_data_dir), "--mirror", str(bmnist_mirror)]


def invoke(args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def trained(bmnist_data_dir, bmnist_mirror, tmp_path_factory):
    """One tiny epoch through `cli.py train`; the run dir."""
    out = tmp_path_factory.mktemp("runs")
    result = invoke(["train", *TINY_ARGS, "--epochs", "1", "--name", "tiny", "--out", out,
                     "--data-dir", bmnist_data_dir, "--mirror", bmnist_mirror])
    assert result.exit_code == 0, result.output
    return out / "tiny", result.output


# ----------------------------------------------------------------------------- train

def test_colour_non_square_folder_end_to_end(tmp_path):
    """C = 3 and H != W through train, sample and evaluate, from an image folder."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(12):
        iio.imwrite(folder / f"p{i:02d}.png", rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
    out = tmp_path / "runs"
    result = invoke(["train", "--dataset", "folder", "--folder", folder, "--niter", 2,
                     "--attention", "2,3", "--enc-dim", 8, "--dec-dim", 8, "--z-dim", 2,
                     "--bs", 4, "--epochs", 1, "--name", "colour", "--out", out,
                     "--data-dir", tmp_path / "data", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    ckpt = ckpt_lib.load_checkpoint(out / "colour" / "best.h5")
    assert (ckpt.cfg.channels, ckpt.cfg.height, ckpt.cfg.width) == (3, 10, 14)
    sampled = invoke(["sample", out / "colour" / "best.h5", "--rows", 2, "--cols", 2, "--boxes",
                      "--scale", 1, "--out", tmp_path / "samples", "--device", "cpu"])
    assert sampled.exit_code == 0, sampled.output
    frame = iio.imread(tmp_path / "samples" / "frame_001.png")
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.shape[1] > frame.shape[0]
    evaluated = invoke(["evaluate", out / "colour" / "best.h5", "--json", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    assert np.isfinite(json.loads(evaluated.output)["nll_bound"])


def test_train_writes_the_run_dir(trained):
    run, output = trained
    for name in ("config.json", "log.jsonl", "checkpoint.h5", "best.h5", "samples.png",
                 "samples.gif"):
        assert (run / name).is_file(), name
    cfg = DrawConfig.from_dict(json.loads((run / "config.json").read_text())["model"])
    got = (cfg.T, cfg.read_n, cfg.write_n, cfg.z_dim, cfg.height, cfg.channels)
    assert got == (T, 2, 3, 4, 28, 1)
    row = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 1 and len(row["kl"]) == T
    assert "epoch 1/1" in output and "train config" in output
    assert len(iio.imread(run / "samples.gif", index=None)) == T


def test_train_without_attention_and_resume_through_the_cli(data_args, tmp_path, monkeypatch):
    args = ["train", *TINY_ARGS, "--attention", "", "--epochs", "1", "--name", "plain",
            "--out", tmp_path, *data_args]
    assert invoke(args).exit_code == 0
    run = tmp_path / "plain"
    assert json.loads((run / "config.json").read_text())["model"]["attention"] is False
    # Resume finds the data where the run recorded it (no --data-dir/--mirror needed).
    monkeypatch.delenv("NPDRAW_DATA", raising=False)
    monkeypatch.delenv("NPDRAW_MIRROR", raising=False)
    monkeypatch.chdir(tmp_path)
    result = invoke(["train", "--resume", run, "--epochs", "2", "--seed", "7", "--lr", "0.002",
                     "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "ignoring seed" in result.output           # the model and data settings stay
    assert "resuming with lr 0.002 (was 0.001)" in result.output   # a new phase's rate
    assert "resuming with epochs 2 (was 1)" in result.output       # --epochs: the new total
    assert not (tmp_path / "data").exists()           # the recorded data dir was used
    rows = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["lr"] for r in rows] == [1e-3, 2e-3]
    assert ckpt_lib.load_checkpoint(run / "checkpoint.h5").epoch == 2


def test_peepholes_on_train_and_on_resume_through_the_cli(data_args, tmp_path):
    base = ["train", *TINY_ARGS, "--epochs", "1", "--out", tmp_path, *data_args]
    assert invoke([*base, "--name", "peep", "--peepholes"]).exit_code == 0
    assert json.loads((tmp_path / "peep" / "config.json").read_text())["model"]["peepholes"]
    assert invoke([*base, "--name", "plain"]).exit_code == 0
    run = tmp_path / "plain"
    result = invoke(["train", "--resume", run, "--epochs", "2", "--peepholes", "--no-progress",
                     "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "note: resuming with peepholes True (was False)" in result.output
    ckpt = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    assert ckpt.cfg.peepholes and "enc_peep" in ckpt.params and ckpt.epoch == 2


def test_nan_loss_exits_non_zero_with_a_message(data_args, tmp_path, monkeypatch):
    real = model_lib.loss_and_grads

    def nan_loss(params, cfg, x, eps):
        loss, grads, stats = real(params, cfg, x, eps)
        return float("nan"), grads, stats

    monkeypatch.setattr(model_lib, "loss_and_grads", nan_loss)
    result = invoke(["train", *TINY_ARGS, "--epochs", "1", "--name", "nan", "--out", tmp_path,
                     *data_args])
    assert result.exit_code == 1
    assert "loss is nan at epoch 1, iteration 1/4" in result.output
    assert "Traceback" not in result.output
    assert ckpt_lib.load_checkpoint(tmp_path / "nan" / "checkpoint.h5").epoch == 0


def test_oldmodel_from_another_config_is_a_clear_error(data_args, tmp_path):
    other = DrawConfig(T=3, read_n=3, write_n=3, enc_dim=16, dec_dim=16, z_dim=4)
    path = tmp_path / "other.h5"
    ckpt_lib.save_checkpoint(path, other, model_lib.init_params(other, 0))
    result = invoke(["train", *TINY_ARGS, "--oldmodel", path, "--out", tmp_path, *data_args])
    assert result.exit_code == 1
    assert "Error: --oldmodel" in result.output and "does not fit" in result.output
    assert "enc_W" in result.output          # names the mismatching parameter


@pytest.mark.parametrize("args, text", [
    (["--attention", "2,x"], "'--attention'"),
    (["--attention", "2"], "'--attention'"),
    (["--niter", "0"], "'--niter'"),
    (["--bs", "0"], "'--bs'"),
    (["--batch-size", "-3"], "'--bs'"),
    (["--dataset", "nope"], "'--dataset'"),
    (["--lr", "0"], "'--lr'"),
    (["--device", "tpu"], "'--device'"),
])
def test_bad_train_options_are_usage_errors(args, text, tmp_path):
    result = invoke(["train", *args, "--out", tmp_path])
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output and "Invalid value" in result.output
    assert text in result.output
    assert not any(tmp_path.iterdir())       # nothing was started


def _float_options():
    import click
    return [(name, param) for name, command in sorted(cli.commands.items())
            for param in command.params if isinstance(param.type, click.types.FloatParamType)]


def test_every_float_option_refuses_inf_and_nan_in_one_sentence():
    import click
    options = _float_options()
    names = {f"{name} {param.opts[0]}" for name, param in options}
    assert {"train --lr", "train --clip", "classify --lr", "classify --clip", "sample --fps",
            "sample --hold", "reconstruct --hold", "attention-demo --cx"} <= names
    for name, param in options:
        for value in ("inf", "-inf", "nan", "1e999"):
            with pytest.raises(click.BadParameter) as err:
                param.type.convert(value, param, None)
            assert err.value.message == f"{value!r} is not a finite number", (name, param.name)
        if param.default is not None:                    # a finite value still passes
            assert param.type.convert(str(param.default), param, None) == param.default


@pytest.mark.parametrize("command,option", [("train", "--lr"), ("train", "--clip"),
                                            ("classify", "--clip"), ("train", "--lr-min")])
def test_an_infinite_float_stops_the_command_before_it_writes(command, option, tmp_path):
    result = invoke([command, option, "inf", "--out", tmp_path, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': 'inf' is not a finite number\n" in result.output
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- sample

def test_sample_writes_one_frame_per_glimpse_and_a_gif(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "s"
    result = invoke(["sample", run / "checkpoint.h5", "--rows", 2, "--cols", 3, "--out", out,
                     "--scale", 2, "--boxes", "--seed", 1])
    assert result.exit_code == 0, result.output
    frames = sorted(out.glob("frame_*.png"))
    assert [f.name for f in frames] == [f"frame_{t:03d}.png" for t in range(T)]
    gif = iio.imread(out / "samples.gif", index=None)
    assert len(gif) == T
    first = iio.imread(frames[-1])
    assert np.array_equal(iio.imread(out / "samples.png"), first)    # the final canvases
    assert first.shape[:2] == (2 * 57 + 1, 3 * 57 + 1)     # 56-pixel tiles, 1-pixel gaps
    red = (first[..., 0] > 200) & (first[..., 1] < 60) & (first[..., 2] < 60)
    assert red.any()                                        # write windows drawn
    assert str(out) in result.output


def test_sample_defaults_next_to_the_checkpoint_and_is_seeded(trained):
    run, _ = trained
    assert invoke(["sample", run, "--rows", 1, "--cols", 2, "--no-boxes"]).exit_code == 0
    first = iio.imread(run / "samples" / "frame_002.png")
    assert invoke(["sample", run, "--rows", 1, "--cols", 2]).exit_code == 0
    assert np.array_equal(first, iio.imread(run / "samples" / "frame_002.png"))
    assert invoke(["sample", run, "--rows", 1, "--cols", 2, "--seed", 5]).exit_code == 0
    assert not np.array_equal(first, iio.imread(run / "samples" / "frame_002.png"))


# ----------------------------------------------------------------------------- reconstruct

def test_reconstruct_draws_each_glimpse_and_ends_on_the_models_reconstruction(trained, bmnist,
                                                                            data_args, tmp_path):
    from npdraw import data as data_lib
    from npdraw import images as images_lib
    from npdraw import runs as runs_lib
    from npdraw import evaluate as evaluate_lib
    from npdraw import frames as frames_lib
    run, _ = trained
    out = tmp_path / "r"
    result = invoke(["reconstruct", run / "best.h5", "--n", 3, "--cols", 2, "--scale", 1,
                     "--seed", 4, "--kl", "--out", out, "--device", "cpu", *data_args])
    assert result.exit_code == 0, result.output
    frames = sorted(out.glob("frame_*.png"))
    assert [f.name for f in frames] == [f"frame_{t:03d}.png" for t in range(T)]
    assert len(iio.imread(out / "reconstruct.gif", index=None)) == T
    last = iio.imread(out / "reconstruct.png")
    assert np.array_equal(last, iio.imread(frames[-1]))
    assert last.shape == (2 * 29 + 1, 4 * 29 + 1, 3)      # 2 rows of 2 (image, canvas) pairs
    chosen = data_lib.spread_subset(len(bmnist.test), 3, 4)
    record = json.loads((out / "kl.json").read_text())
    assert record["test_indices"] == chosen.tolist()
    kl = np.array(record["kl"])
    assert kl.shape == (3, T) and (kl >= 0).all() and "KL of each glimpse" in result.output
    # the canvas tiles are the model's final reconstruction of the chosen images, the image
    # tiles those images (the red windows aside)
    ckpt = ckpt_lib.load_checkpoint(run / "best.h5")
    params = runs_lib.model_params(ckpt)[0]
    canvases, _, kl_lib = frames_lib.reconstruct_images(params, ckpt.cfg, bmnist.test[chosen],
                                                       evaluate_lib.derived_rng(4, 3))
    np.testing.assert_allclose(kl, kl_lib.T, rtol=1e-5, atol=1e-6)
    eps = evaluate_lib.derived_rng(4, 3).standard_normal((T, 3, ckpt.cfg.z_dim), dtype=np.float32)
    _, stats = model_lib.loss_only(params, ckpt.cfg, bmnist.test[chosen], eps, return_terms=True)
    final = canvases[-1].astype(np.float64)
    x = bmnist.test[chosen]
    recon = -(x * np.log(final) + (1 - x) * np.log(1 - final)).sum(axis=1)
    np.testing.assert_allclose(recon, stats["recon_per_example"], rtol=1e-4)
    red = (last[..., 0] == 255) & (last[..., 1] == 0) & (last[..., 2] == 0)
    for i in range(3):
        r, c = divmod(i, 2)
        y = 1 + 29 * r
        for x0, want in ((1 + 58 * c, x[i]), (30 + 58 * c, canvases[-1, i])):
            tile, keep = last[y:y + 28, x0:x0 + 28, 1], ~red[y:y + 28, x0:x0 + 28]
            assert keep.mean() > 0.5
            assert np.array_equal(tile[keep], images_lib.to_uint8(want.reshape(28, 28))[keep])
    assert red.any()                                       # the windows are drawn
    again = invoke(["reconstruct", run / "best.h5", "--n", 2, "--scale", 1, "--out", out,
                    "--device", "cpu", *data_args])
    assert again.exit_code == 0, again.output
    assert not (out / "kl.json").exists()                   # no stale KL of other images


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_subset_is_spread_over_the_split_and_says_so(trained, bmnist, data_args):
    from npdraw import data as data_lib
    from npdraw import runs as runs_lib
    from npdraw import evaluate as evaluate_lib
    run, _ = trained
    result = invoke(["evaluate", run / "best.h5", "--json", "--subset", 40, "--seed", 3,
                     "--device", "cpu", "--ranks", 1, *data_args])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output)
    assert (scored["n"], scored["of"], scored["subset"]) == (40, len(bmnist.test), "spread")
    ckpt = ckpt_lib.load_checkpoint(run / "best.h5")
    params = runs_lib.model_params(ckpt)[0]
    chosen = data_lib.spread_subset(len(bmnist.test), 40, 3)
    assert chosen[-1] > len(bmnist.test) * 0.9                 # not the first 40
    _, bound = evaluate_lib.evaluate_iwae_and_bound(params, ckpt.cfg, bmnist.test[chosen], 1, 500,
                                                 np.random.default_rng(3))
    assert scored["nll_bound"] == pytest.approx(bound, rel=1e-6)
    text = invoke(["evaluate", run / "best.h5", "--subset", 40, "--device", "cpu", "--ranks", 1,
                   *data_args])
    assert "a spread subset of its 10000, drawn with seed 0" in text.output
    assert "spread over the split" in invoke(["evaluate", "--help"]).output


def test_evaluate_bound_and_iwae(trained, data_args):
    run, _ = trained
    ckpt = run / "checkpoint.h5"
    one = invoke(["evaluate", ckpt, "--json", "--subset", 300, "--device", "cpu", *data_args])
    assert one.exit_code == 0, one.output
    r1 = json.loads(one.output)
    assert r1["n"] == 300 and r1["k"] == 1 and r1["split"] == "test" and r1["epoch"] == 1
    assert 50 < r1["nll_bound"] < 500
    many = invoke(["evaluate", ckpt, "--json", "--subset", 300, "--k", 10, "--device", "cpu",
                   *data_args])
    assert many.exit_code == 0, many.output
    rk = json.loads(many.output)
    assert rk["k"] == 10
    assert -rk["nll_iwae"] >= -rk["nll_bound"] - 0.2       # IWAE: log p(x) >= ELBO
    assert -rk["nll_iwae"] >= -r1["nll_bound"] - 1.0
    text = invoke(["evaluate", ckpt, "--subset", 100, "--k", 2, *data_args])
    assert text.exit_code == 0 and "NLL bound" in text.output and "IWAE, K=2" in text.output


def test_evaluate_says_whether_the_file_carries_a_digest(trained, data_args, tmp_path):
    """A file saved before checkpoints carried a digest loads, and evaluate says that a
    change to it could not be detected (issue 25); a new one says nothing of the kind."""
    import shutil

    import h5py
    run, _ = trained
    old = tmp_path / "old.h5"
    shutil.copy(run / "best.h5", old)
    with h5py.File(old, "r+") as f:
        del f.attrs["digest"]
    args = ["--subset", 20, "--device", "cpu", "--ranks", 1, *data_args]
    for path, has_digest in ((run / "best.h5", True), (old, False)):
        scored = invoke(["evaluate", path, "--json", *args])
        assert scored.exit_code == 0, scored.output
        assert json.loads(scored.output)["digest"] is has_digest
        text = invoke(["evaluate", path, *args]).output
        assert ("has no digest" in text) is not has_digest, text


def test_evaluate_uses_the_recorded_data_settings(trained, monkeypatch):
    run, _ = trained
    monkeypatch.delenv("NPDRAW_DATA", raising=False)
    monkeypatch.delenv("NPDRAW_MIRROR", raising=False)
    result = invoke(["evaluate", run, "--json", "--subset", 50, "--split", "valid"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["split"] == "valid"


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_damaged_checkpoints_are_clear_errors(trained, tmp_path, command):
    run, _ = trained
    data = (run / "checkpoint.h5").read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 3])
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not a checkpoint at all\n" * 10)
    for path in (truncated, junk):
        result = invoke([command, path])
        assert result.exit_code == 2, result.output
        assert "Invalid value for 'CHECKPOINT'" in result.output and str(path) in result.output
        assert "Traceback" not in result.output
    missing = invoke([command, tmp_path / "nope.h5"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


# ----------------------------------------------------------------------------- plot

def test_plot_writes_the_figures_as_png_and_pdf(trained, tmp_path):
    run, _ = trained
    result = invoke(["plot", run, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    for name in ("learning_curves", "learning_curves_hours", "kl_per_glimpse", "optimizer"):
        img = iio.imread(tmp_path / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, name
        assert (tmp_path / f"{name}.pdf").read_bytes().startswith(b"%PDF"), name
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(["plot", empty])
    assert result.exit_code == 2 and "no training log" in result.output


def test_plot_from_epoch_draws_only_the_late_epochs(trained, tmp_path, monkeypatch):
    """--from-epoch keeps the epochs from N on; their hours still count from the start;
    the figures hold the log's values, the references for bmnist, the KL as a heat map."""
    from npdraw import pictures
    run, _ = trained
    row = json.loads((Path(run) / "log.jsonl").read_text().splitlines()[0])
    long_run = tmp_path / "long"
    long_run.mkdir()
    (long_run / "config.json").write_text(json.dumps({"train": {"dataset": "bmnist"}}))
    with open(long_run / "log.jsonl", "w") as f:
        for epoch, bound in ((1, 200.0), (2, 90.0), (3, 89.0), (4, 88.5)):
            f.write(json.dumps({**row, "epoch": epoch, "wall_s": 360.0, "train_bound": bound,
                                "valid_bound": bound + 0.5, "test_bound": bound + 0.2,
                                "ema": True, "lr": 1e-3 / epoch,
                                "kl": [epoch, 2.0 * epoch]}) + "\n")
    drawn = {}
    save_figure = pictures.save_figure
    def recording_save_figure(fig, path):
        drawn[Path(path).name] = fig
        return save_figure(fig, path)
    monkeypatch.setattr(pictures, "save_figure", recording_save_figure)
    result = invoke(["plot", long_run, "--out", tmp_path / "late", "--from-epoch", 2])
    assert result.exit_code == 0, result.output
    assert "(3 epochs from epoch 2)" in result.output

    def lines(name, panel=0):
        return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
                for ln in drawn[name].axes[panel].get_lines()}
    curves = lines("learning_curves.png")
    valid = curves["valid (moving average of the parameters)"]
    assert valid == ([2, 3, 4], [90.5, 89.5, 89.0])
    assert curves["DRAW paper: 80.97"][1] == [80.97, 80.97]
    assert "best public: 81.9" in curves
    # 88.5-90.7 nats is under a factor 1.5: a linear axis (a log one would have no label)
    assert drawn["learning_curves.png"].axes[0].get_yscale() == "linear"
    assert drawn["learning_curves.png"].axes[1].get_ylim()[0] < 80.97
    hours = lines("learning_curves_hours.png")["valid (moving average of the parameters)"][0]
    assert np.allclose(hours, [0.2, 0.3, 0.4])                       # 360 s an epoch
    heat = drawn["kl_per_glimpse.png"].axes[0].get_images()[0].get_array()
    assert np.array_equal(heat, [[2, 3, 4], [4, 6, 8]])              # glimpse x epoch
    assert lines("optimizer.png")["learning rate"][1] == [1e-3 / 2, 1e-3 / 3, 1e-3 / 4]
    assert iio.imread(tmp_path / "late" / "learning_curves.png").ndim == 3
    result = invoke(["plot", long_run, "--out", tmp_path / "late", "--from-epoch", 5])
    assert result.exit_code == 2 and "last epoch is 4" in result.output
    whole = invoke(["plot", long_run, "--out", tmp_path / "whole"])
    assert whole.exit_code == 0, whole.output
    assert drawn["learning_curves.png"].axes[0].get_yscale() == "log"   # 88.5-200 nats


# ----------------------------------------------------------------------------- attention-demo

@pytest.mark.parametrize("kind", ["grey", "colour"])
def test_attention_demo_on_grey_and_colour_images(tmp_path, kind):
    h, w = 40, 52
    yy, xx = np.mgrid[0:h, 0:w]
    img = ((xx > 15) & (xx < 35) & (yy > 10) & (yy < 30)).astype(np.uint8) * 255
    if kind == "colour":
        img = np.stack([img, np.uint8(255) - img, (xx * 4).astype(np.uint8)], axis=-1)
    path = tmp_path / f"{kind}.png"
    iio.imwrite(path, img)
    out = tmp_path / "out"
    result = invoke(["attention-demo", path, "--n", 8, "--out", out])
    assert result.exit_code == 0, result.output
    original = iio.imread(out / f"{kind}_original.png")
    read = iio.imread(out / f"{kind}_read.png")
    write = iio.imread(out / f"{kind}_write.png")
    assert original.shape[:2] == write.shape[:2] == (h, w)
    view = round(max(h, w) / 8)
    assert read.shape[:2] == (8 * view, 8 * view)
    assert write.astype(float).std() > 10          # the write shows the square, not a blank
    # the written square is bright where the original is bright (red plane for colour,
    # whose green plane is the inverse)
    plane = write[..., 0].astype(float) if write.ndim == 3 else write.astype(float)
    assert plane[20, 25] > plane[5, 5] + 50
    if kind == "colour":
        assert write[20, 25, 1] < write[5, 5, 1] - 50
    for name in ("original", "read", "write"):
        assert str(out / f"{kind}_{name}.png") in result.output


def test_attention_demo_bad_images_are_usage_errors(tmp_path):
    missing = invoke(["attention-demo", tmp_path / "missing.png"])
    assert missing.exit_code == 2 and "Invalid value for 'IMG'" in missing.output
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    bad = invoke(["attention-demo", text])
    assert bad.exit_code == 2 and "Invalid value for 'IMG'" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.parametrize("flag", ["--stride", "--sigma", "--cx"])
def test_attention_demo_refuses_a_window_beyond_any_image_in_one_sentence(tmp_path, flag):
    """--stride 1e300 (or --sigma) overflowed the filterbank (OverflowError, issue 25)."""
    path = tmp_path / "grey.png"
    iio.imwrite(path, np.zeros((20, 30), np.uint8))
    result = invoke(["attention-demo", path, flag, "1e300", "--out", tmp_path / "out"])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}': 1e+300 is beyond 3e+07 pixels" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_attention_demo_pictures_round_as_every_picture_does():
    """pictures.attention_demo makes the pictures with images.to_uint8 (half up; cli.py's
    own copy rounded half to even): 2.5/255 is 3, not 2."""
    from npdraw import images as images_lib
    from npdraw import pictures
    image = np.full((1, 6, 8), 2.5 / 255)
    demo = pictures.attention_demo(image, 3)
    assert demo["original"].shape == (6, 8, 3) and (demo["original"] == 3).all()
    assert np.array_equal(demo["original"], images_lib.to_uint8(np.repeat(image, 3, 0)
                                                                .transpose(1, 2, 0)))
    assert demo["window"] == (4.5, 3.5, 0.9 * 7 / 2, 0.9 * 7 / 4) and demo["view"] == 3


def test_attention_demo_divides_the_write_by_its_coverage():
    """A flat image reads flat and, divided by the write of an all-ones patch, writes
    back flat wherever the window sees it (the raw write is far dimmer), black elsewhere."""
    from npdraw import pictures
    image = np.full((3, 30, 40), 0.6)
    demo = pictures.attention_demo(image, 4, cx=10, cy=12, stride=2.0, sigma=1.0)
    assert demo["read"].shape == (4 * 10, 4 * 10, 3) and (demo["read"] == 153).all()
    write = demo["write"]
    assert write[12 - 1, 10 - 1].tolist() == [153, 153, 153]      # the window's centre
    assert (write[:, 30:] == 0).all()                          # far right of the window


def test_a_ctrl_c_before_the_run_starts_exits_130(monkeypatch, tmp_path, data_args):
    """Ctrl-C in the first half second (while NumPy and the data load) gave click's
    "Aborted!" and status 1 (issue 25); it is 130, as later in the run."""
    from npdraw import runs as runs_lib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(runs_lib, "load_data", interrupted)
    result = invoke(["train", "--niter", 2, "--subset", 20, "--out", tmp_path, "--ranks", 1,
                     "--device", "cpu", *data_args])
    assert result.exit_code == 130, result.output
    assert "Aborted!" not in result.output and "interrupted" in result.output


@pytest.mark.parametrize("program", [["cli.py"], ["-m", "npdraw"]])
def test_a_ctrl_c_while_python_loads_the_command_line_exits_130(program, tmp_path):
    """Ctrl-C while click and NumPy load, before any command runs, printed a traceback
    (issue 25): a click whose import is interrupted stands in for it."""
    (tmp_path / "click").mkdir()
    (tmp_path / "click" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run([sys.executable, *program, "train", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert result.stderr == "interrupted\n" and result.stdout == ""


# ----------------------------------------------------------------------------- misc

def test_bench_command_exists_exactly_when_bench_run_does():
    assert ("bench" in cli.commands) == (REPO / "bench" / "run.py").is_file()


def test_the_shim_and_python_m_npdraw_are_the_package_cli(tmp_path):
    """`python cli.py` and `python -m npdraw` run npdraw/cli.py: the same commands,
    version, usage errors and exit codes; each starts itself again as MPI ranks."""
    assert cli_mod.__file__ == str(REPO / "npdraw" / "cli.py")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for program in ([str(REPO / "cli.py")], ["-m", "npdraw"]):
        version = subprocess.run([sys.executable, *program, "--version"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=60)
        assert version.returncode == 0
        assert version.stdout == f"npdraw, version {npdraw.__version__}\n"
        missing = subprocess.run([sys.executable, *program, "evaluate", "missing.h5"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert missing.returncode == 2 and "Invalid value for 'CHECKPOINT'" in missing.stderr
    script = ("import sys; from npdraw import cli; sys.argv[0] = 'x/cli.py'; "
              "print(cli._own_program())")
    ran = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert ran.stdout.strip() == repr([os.path.abspath(os.path.join(REPO, "x/cli.py"))])
    assert cli_mod._PROGRAM is None          # called from Python: --ranks never re-executes


def test_version_option():
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.output == f"npdraw, version {npdraw.__version__}\n"


def test_load_gives_the_model_that_sample_and_evaluate_use(trained):
    """npdraw.load: a run dir (its best.h5), a checkpoint and the shipped model."""
    run, _ = trained
    cfg, params = npdraw.load(run / "checkpoint.h5")
    ckpt = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    assert cfg == ckpt.cfg and sorted(params) == sorted(ckpt.params)
    assert all(isinstance(v, np.ndarray) for v in params.values())
    np.testing.assert_array_equal(params["c0"], ckpt.params["c0"])
    assert npdraw.load(run)[0] == cfg
    cfg, params = npdraw.load(REPO / "pretrained" / "bmnist_r2w5_t64.h5")
    assert (cfg.T, cfg.read_n, cfg.write_n) == (64, 2, 5)
    eps = np.random.default_rng(0).standard_normal((cfg.T, 2, cfg.z_dim)).astype(np.float32)
    canvases, _ = npdraw.generate(params, cfg, eps)
    assert canvases.shape == (cfg.T, 2, cfg.height * cfg.width)
    with pytest.raises(ValueError, match="does not exist"):
        npdraw.load(run / "missing.h5")


def test_cli_script_help_runs_from_elsewhere(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("train", "sample", "evaluate", "plot", "attention-demo"):
        assert command in result.stdout


def test_ctrl_c_exits_130_and_keeps_the_epoch_0_checkpoint(data_args, tmp_path, monkeypatch):
    def interrupt(params, cfg, x, eps):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_lib, "loss_and_grads", interrupt)
    result = invoke(["train", *TINY_ARGS, "--epochs", "1", "--name", "stop", "--out", tmp_path,
                     *data_args])
    assert result.exit_code == 130
    assert "interrupted in epoch 1" in result.output and "--resume" in result.output
    ckpt = ckpt_lib.load_checkpoint(tmp_path / "stop" / "checkpoint.h5")
    assert ckpt.epoch == 0 and ckpt.opt_state["step"] == 0


def test_ranks_on_one_machine_share_its_cores_between_their_blas_threads():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {"PMI_SIZE": "4", "MPI_LOCALNRANKS": "4"}
    cli_mod._share_cores_between_ranks(env)
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == str(max(1, cores // 4))
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OPENBLAS_NUM_THREADS": "3"}
    cli_mod._share_cores_between_ranks(env)
    assert env["OPENBLAS_NUM_THREADS"] == "3"               # the user's choice stands
    env = {"SLURM_STEP_ID": "0", "SLURM_CPUS_PER_TASK": "6"}
    cli_mod._share_cores_between_ranks(env)
    assert env["MKL_NUM_THREADS"] == "6"
    env = {}
    cli_mod._share_cores_between_ranks(env)                 # one process: nothing set
    assert env == {}


@pytest.fixture
def without_mpi(monkeypatch):
    """A four-core machine where the MPI extra is not installed."""
    from npdraw import distributed
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_ID",
                 distributed.LAUNCHED_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "usable_cores", lambda: 4)
    monkeypatch.setattr(distributed, "mpi_available", lambda: False)


def test_without_mpi_train_says_once_how_to_use_every_core(without_mpi, capsys):
    cli_mod._run_as_ranks(0, "cpu", lambda: 128, "training")      # returns: one process
    assert capsys.readouterr().err == (
        "note: training in one process on 4 cores; for one MPI rank per core install mpi4py "
        "and MPICH's mpiexec: pip install -e \".[mpi]\"\n")
    cli_mod._run_as_ranks(0, "cpu", lambda: 50, "training")       # one rank is all it wants
    cli_mod._run_as_ranks(1, "cpu", lambda: 128, "training")
    assert capsys.readouterr().err == ""


def test_ranks_that_cannot_be_started_are_one_error_line(without_mpi, tmp_path):
    result = invoke(["train", "--ranks", 2, "--device", "cpu", "--out", tmp_path])
    assert result.exit_code == 1
    assert result.output == ("Error: ranks = 2 needs mpi4py and MPICH's mpiexec; install them "
                             "with: pip install -e \".[mpi]\" (or use --ranks 1)\n")


def test_export_writes_a_params_only_model_that_sample_and_evaluate_read(trained, data_args,
                                                                         tmp_path):
    run, _ = trained
    out = tmp_path / "model.h5"
    result = invoke(["export", run, out, "--check-n", "10", *data_args])
    assert result.exit_code == 0, result.output
    shipped = ckpt_lib.load_checkpoint(out)
    assert shipped.opt_state is None and shipped.extra["check"]["n"] == 10
    assert shipped.extra["epoch"] == 1 and shipped.extra["valid_bound"] is not None
    assert invoke(["sample", out, "--rows", "1", "--cols", "2"]).exit_code == 0
    result = invoke(["evaluate", out, "--subset", "20", "--json", *data_args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["n"] == 20
