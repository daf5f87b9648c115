"""npdraw/cli.py classify and classify-eval on the real labelled MNIST with a tiny classifier,
the glimpse pictures, plot of a classifier run, and the errors between the two kinds of
checkpoint."""
import json
from pathlib import Path

import imageio.v3 as iio
import pytest
from click.testing import CliRunner

from npdraw import checkpoint as ckpt_lib
from npdraw import cli as cli_mod
from npdraw.config import ClassifierConfig

REPO = Path(__file__).resolve().parents[1]
cli = cli_mod.cli

TINY = ["--glimpses", 2, "--read", 4, "--hidden", 8, "--size", 40, "--distractors", 3,
        "--crop", 5, "--subset", 100, "--eval-subset", 40, "--bs", 50, "--device", "cpu",
        "--no-progress"]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def classified(labelled_mnist_mirror, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = invoke(["classify", *TINY, "--epochs", 2, "--name", "tiny", "--out", out,
                     "--data-dir", out / "data", "--mirror", labelled_mnist_mirror])
    assert result.exit_code == 0, result.output
    return out / "tiny", result.output


def test_classify_writes_a_run_dir(classified):
    run, output = classified
    assert "100 train digits (npm10k; the paper had 60,000)" in output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(0.0 <= r["test_error"] <= 1.0 for r in log)
    ckpt = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    assert ckpt.cfg == ClassifierConfig(height=40, width=40, glimpses=2, read_n=4, hidden=8)


def test_classify_eval_scores_the_logged_test_error_and_draws_the_glimpses(classified, tmp_path):
    run, _ = classified
    result = invoke(["classify-eval", run / "checkpoint.h5", "--subset", 40, "--json",
                     "--pictures", tmp_path, "--rows", 2, "--cols", 3, "--scale", 1,
                     "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output)
    logged = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert scored["error"] == logged["test_error"] and scored["n"] == 40
    assert scored["train_digits"] == 100              # classify --subset 100, not the 9000
    text = invoke(["classify-eval", run, "--subset", 40, "--device", "cpu"])
    assert text.exit_code == 0 and "(trained on 100 digits of npm10k;" in text.output
    grid = iio.imread(tmp_path / "glimpses.png")
    assert grid.shape == (2 * 41 + 1, 3 * 41 + 1, 3)
    frames = iio.imread(tmp_path / "glimpses.gif", index=None)
    assert len(frames) == 2


def test_plot_of_a_classifier_run(classified, tmp_path):
    run, _ = classified
    result = invoke(["plot", run, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    assert iio.imread(tmp_path / "error_curves.png").ndim == 3


def test_resume_through_the_cli(classified, tmp_path, labelled_mnist_mirror):
    run, _ = classified
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("checkpoint.h5", "log.jsonl"):
        (copy / name).write_bytes((run / name).read_bytes())
    result = invoke(["classify", "--resume", copy, "--epochs", 3, "--lr", 2e-4, "--seed", 5,
                     "--device", "cpu", "--mirror", labelled_mnist_mirror, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "ignoring seed" in result.output and "resuming after epoch 2" in result.output
    assert "resuming with lr 0.0002 (was 0.001)" in result.output
    log = [json.loads(line) for line in (copy / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == [1e-3, 1e-3, 2e-4]
    assert ckpt_lib.load_checkpoint(copy / "checkpoint.h5").epoch == 3


def test_the_two_kinds_of_checkpoint_are_not_mixed_up(classified, tmp_path):
    run, _ = classified
    for command in ("sample", "evaluate"):
        result = invoke([command, run / "checkpoint.h5"])
        assert result.exit_code == 2 and "classifier checkpoint; use classify-eval" in result.output
    from npdraw.config import DrawConfig
    from npdraw.model import init_params
    cfg = DrawConfig(T=2, enc_dim=4, dec_dim=4, z_dim=2)
    ckpt_lib.save_checkpoint(tmp_path / "draw.h5", cfg, init_params(cfg))
    result = invoke(["classify-eval", tmp_path / "draw.h5"])
    assert result.exit_code == 2 and "DRAW checkpoint; use evaluate" in result.output
    assert "Traceback" not in result.output


def test_missing_labelled_files_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NPDRAW_MIRROR", raising=False)
    result = invoke(["classify", *TINY, "--epochs", 1, "--out", tmp_path,
                     "--data-dir", tmp_path / "data"])
    assert result.exit_code == 1 and "Error: npm10k-images-idx3-ubyte has no public download" \
        in result.output


def test_classify_on_the_standard_training_files(labelled_mnist_mirror, tmp_path):
    """--train-set mnist: train-*-ubyte files (small ones here) in the data folder's
    labelled-mnist/, t10k from the mirror; the run records the choice, and classify-eval
    scores it with the same digits."""
    import gzip

    import numpy as np
    folder = tmp_path / "data" / "labelled-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for stem, array in (("train-images-idx3-ubyte",
                         rng.integers(0, 256, (120, 28, 28), dtype=np.uint8)),
                        ("train-labels-idx1-ubyte", (np.arange(120) % 10).astype(np.uint8))):
        head = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
        (folder / f"{stem}.gz").write_bytes(gzip.compress(head + array.tobytes()))
    result = invoke(["classify", *TINY, "--train-set", "mnist", "--valid-size", 20,
                     "--epochs", 1, "--name", "std", "--out", tmp_path,
                     "--data-dir", tmp_path / "data", "--mirror", labelled_mnist_mirror])
    assert result.exit_code == 0, result.output
    assert "100 train digits (mnist; the paper had 60,000), 20 valid" in result.output
    config = json.loads((tmp_path / "std" / "config.json").read_text())
    assert json.dumps(config).count('"train_set": "mnist"') == 1
    scored = invoke(["classify-eval", tmp_path / "std", "--subset", 10, "--json"])
    assert scored.exit_code == 0, scored.output
    record = json.loads(scored.output.strip().splitlines()[-1])
    assert record["train_set"] == "mnist" and record["train_digits"] == 100


@pytest.mark.parametrize("signum, status", [(2, 130), (15, 143)])
def test_an_interrupted_classify_exits_as_train_does(monkeypatch, tmp_path, signum, status):
    """Ctrl-C gives 130 and SIGTERM 143, in classify as in train (issue 25)."""
    from npdraw import train as train_lib
    from npdraw import runs as runs_lib

    def interrupted(*args, **kwargs):
        raise runs_lib.TrainingInterrupted("interrupted in epoch 1", tmp_path, signum)
    monkeypatch.setattr(train_lib, "train_classifier", interrupted)
    result = invoke(["classify", *TINY, "--out", tmp_path])
    assert result.exit_code == status, result.output
