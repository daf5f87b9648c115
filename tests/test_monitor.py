"""train --tensorboard: the event files hold log.jsonl's values (read back by tensorboard)."""
import builtins

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from npdraw import monitor
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw.config import DrawConfig, TrainConfig

TINY = DrawConfig(T=3, read_n=2, write_n=3, enc_dim=16, dec_dim=16, z_dim=4)


def _tcfg(tmp_path, **kw):
    base = dict(epochs=2, batch_size=50, subset=200, eval_subset=200, seed=3, device="cpu",
                out=str(tmp_path), name="run", tensorboard=True)
    base.update(kw)
    return TrainConfig(**base)


def _events(run):
    acc = EventAccumulator(str(run / monitor.FOLDER), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_events_hold_the_logs_scalars_and_samples_and_a_resume_adds_epochs(bmnist, tmp_path):
    run = train_lib.train(TINY, _tcfg(tmp_path), log=[].append, data=bmnist, progress=False)
    rows = runs_lib.read_log(run)
    acc = _events(run)
    for tag, key in monitor.SCALARS:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2], tag
        assert np.allclose([e.value for e in events], [r[key] for r in rows], rtol=1e-6), tag
    images = acc.Images(monitor.SAMPLES_TAG)
    assert [i.step for i in images] == [1, 2]
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")

    # A resume writes on into the same folder; --no-tensorboard (False) would stop it.
    train_lib.train(None, TrainConfig(epochs=3, device="cpu", resume=str(run)),
                    log=[].append, data=bmnist, progress=False)
    rows = runs_lib.read_log(run)
    events = _events(run).Scalars("bound/valid")
    assert [e.step for e in events] == [1, 2, 3]
    assert np.isclose(events[-1].value, rows[-1]["valid_bound"], rtol=1e-6)


def test_off_by_default_and_one_sentence_without_tensorboardx(bmnist, tmp_path, monkeypatch):
    run = train_lib.train(TINY, _tcfg(tmp_path, tensorboard=False, epochs=1), log=[].append,
                          data=bmnist, progress=False)
    assert not (run / monitor.FOLDER).exists()
    monkeypatch.setattr(monitor.importlib.util, "find_spec",
                        lambda name: None if name == "tensorboardX" else builtins.__import__)
    with pytest.raises(ValueError, match=r"^--tensorboard needs the tensorboardX package"):
        train_lib.train(TINY, _tcfg(tmp_path, name="no"), log=[].append, data=bmnist,
                        progress=False)
    assert not (tmp_path / "no").exists()


def test_cli_option_writes_events_and_says_one_sentence_without_the_extra(
        bmnist_data_dir, bmnist_mirror, tmp_path, monkeypatch):
    from test_cli import TINY_ARGS, invoke
    args = ["train", *TINY_ARGS, "--epochs", "1", "--subset", "100", "--eval-subset", "100",
            "--out", tmp_path, "--data-dir", bmnist_data_dir, "--mirror", bmnist_mirror,
            "--ranks", "1", "--no-progress", "--tensorboard"]
    result = invoke([*args, "--name", "board"])
    assert result.exit_code == 0, result.output
    assert [e.step for e in _events(tmp_path / "board").Scalars("bound/test")] == [1]
    monkeypatch.setattr(monitor.importlib.util, "find_spec", lambda name: None)
    result = invoke([*args, "--name", "none"])
    assert result.exit_code == 1 and "Error: --tensorboard needs the tensorboardX" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "none").exists()
