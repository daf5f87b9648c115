"""The exponential moving average of the parameters (TrainConfig.ema_decay): the update,
its place in training, resume, checkpoints, export, evaluation, and the MPI ranks.

Tiny models on 200 real binarized-MNIST images (conftest.bmnist), a few steps each.
"""
import json
import math

import h5py
import numpy as np
import pytest

from npdraw import checkpoint as ckpt_lib
from npdraw import data as data_lib
from npdraw import optim
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw import evaluate as evaluate_lib
from npdraw import frames as frames_lib
from npdraw.config import DrawConfig, TrainConfig
from test_cli import invoke
from test_distributed import REPO, TRAIN_ARGS, _run_mpi
from test_train import _patched_loss

TINY = DrawConfig(T=3, read_n=2, write_n=3, enc_dim=16, dec_dim=16, z_dim=4)
DECAY = 0.9              # 4 steps an epoch: an average that differs clearly from the params
STEPS_PER_EPOCH = 4      # 200 images in batches of 50


def _tcfg(tmp_path, **kw):
    base = dict(epochs=1, batch_size=50, subset=200, eval_subset=200, seed=3, device="cpu",
                out=str(tmp_path), name="run")
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg, tcfg, bmnist, lines=None, overrides=()):
    return train_lib.train(cfg, tcfg, log=(lines if lines is not None else []).append,
                           data=bmnist, progress=False, resume_overrides=overrides)


def _closed_form(start, steps, decay):
    """ema_n = d^n start + (1 - d) sum_k d^(n-k) p_k over the parameters p_1..p_n, in
    float64: {name: (P,)}."""
    n = len(steps)
    return {name: decay ** n * np.asarray(start[name], np.float64)
            + (1 - decay) * sum(decay ** (n - k) * np.asarray(p[name], np.float64)
                                for k, p in enumerate(steps, start=1))
            for name in start}


def _ema_tolerance(steps, eps):
    """Each update rounds 3 times (e - p, the product by d, the sum), each by at most eps
    times twice the largest value; the average shrinks earlier errors by d < 1, and the
    closed form rounds about as often: 8 n eps max|p| over n steps."""
    biggest = max(float(np.max(np.abs(a))) for p in steps for a in p.values())
    return 8 * len(steps) * eps * biggest


# ----------------------------------------------------------------------------- the update

def _random_steps(dtype, n=5, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (3, 4), "b": (5,), "s": ()}
    return [{k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in shapes.items()}
            for _ in range(n + 1)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ema_update_is_the_closed_form_in_place_and_keeps_the_dtype(dtype):
    start, *steps = _random_steps(dtype)
    ema = optim.ema_init(start)
    arrays = {k: v for k, v in ema.items()}
    kept = [{k: v.copy() for k, v in p.items()} for p in steps]
    for p in steps:
        assert optim.ema_update(ema, p, DECAY) is ema
    want = _closed_form(start, steps, DECAY)
    eps = float(np.finfo(dtype).eps)
    for name in start:
        assert ema[name] is arrays[name]                 # the EMA's own arrays, in place
        assert ema[name].dtype == dtype and ema[name].shape == start[name].shape
        np.testing.assert_allclose(ema[name], want[name], rtol=0,
                                   atol=_ema_tolerance(steps, eps), err_msg=name)
        assert not np.shares_memory(ema[name], start[name])     # init copied
    for p, before in zip(steps, kept):                   # the inputs are only read
        for name in p:
            np.testing.assert_array_equal(p[name], before[name])


def test_an_average_of_unchanging_parameters_stays_exactly_put():
    start, _ = _random_steps(np.float32, n=1)
    ema = optim.ema_init(start)
    for _ in range(10):
        optim.ema_update(ema, start, 0.999)
    for name in start:
        np.testing.assert_array_equal(ema[name], start[name])


def test_ema_update_on_the_generic_array_path(request):
    """The GPU branch (conftest's as_if_on_gpu) gives the NumPy path's figures."""
    start, *steps = _random_steps(np.float32)
    ema = optim.ema_init(start)
    for p in steps:
        optim.ema_update(ema, p, DECAY)
    request.getfixturevalue("as_if_on_gpu")
    ema_g = optim.ema_init(start)
    for p in steps:
        optim.ema_update(ema_g, p, DECAY)
    for name in start:
        np.testing.assert_array_equal(ema_g[name], ema[name])


def test_ema_update_refuses_bad_input():
    start, step = _random_steps(np.float64, n=1)
    ema = optim.ema_init(start)
    for decay in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\)"):
            optim.ema_update(ema, step, decay)
    with pytest.raises(ValueError, match="different keys"):
        optim.ema_update(ema, {"w": step["w"]}, DECAY)
    with pytest.raises(ValueError, match="EMA 'b' has shape"):
        optim.ema_update(ema, {**step, "b": np.zeros(6)}, DECAY)


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_config_refuses_a_decay_outside_0_1(value):
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        TrainConfig(ema_decay=value)
    assert TrainConfig().ema_decay == 0.0              # the paper's: no average


@pytest.mark.parametrize("value", ["1", "-0.1", "x"])
def test_cli_refuses_a_bad_decay(value, tmp_path):
    result = invoke(["train", "--ema-decay", value, "--out", tmp_path, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "Error: Invalid value for '--ema-decay'" in result.output
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def ema_run(bmnist, tmp_path_factory):
    """Two epochs with ema_decay = DECAY; the run dir. The evaluations draw their noise
    afresh each epoch (not the default), so that the checks below name its stream."""
    out = tmp_path_factory.mktemp("ema")
    return _train(TINY, _tcfg(out, epochs=2, ema_decay=DECAY, eval_noise="epoch"), bmnist)


def test_the_run_saves_and_evaluates_the_average(ema_run, bmnist, tmp_path):
    run = ema_run
    rows = runs_lib.read_log(run)
    assert [r["ema"] for r in rows] == [True, True]
    ckpt = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    assert ckpt.ema is not None and set(ckpt.ema) == set(ckpt.params)
    assert runs_lib.train_config_of(ckpt).ema_decay == DECAY
    assert any(not np.array_equal(ckpt.ema[k], ckpt.params[k]) for k in ckpt.params)
    for name in ckpt.params:
        assert ckpt.ema[name].dtype == ckpt.params[name].dtype == np.float32
    # The logged valid and test bounds are the EMA's: the trainer's own evaluation of
    # the saved EMA with its noise of (seed, 1, epoch, split) gives them bit for bit.
    valid = np.asarray(bmnist.valid[:200], dtype=np.float32)
    test = np.asarray(bmnist.test[:200], dtype=np.float32)
    seed = 3
    for x, key, split in ((valid, "valid_bound", 0), (test, "test_bound", 1)):
        rng = evaluate_lib.derived_rng(seed, 1, 2, split)
        assert rows[1][key] == evaluate_lib.evaluate_bound(ckpt.ema, TINY, x, evaluate_lib.EVAL_BATCH,
                                                        rng), key
        raw = evaluate_lib.evaluate_bound(ckpt.params, TINY, x, evaluate_lib.EVAL_BATCH,
                                       evaluate_lib.derived_rng(seed, 1, 2, split))
        assert raw != rows[1][key], key
    # best.h5 holds the EMA of the epoch with the best (EMA) valid bound.
    best = ckpt_lib.load_checkpoint(run / "best.h5")
    assert best.epoch == min(rows, key=lambda r: r["valid_bound"])["epoch"]
    assert best.ema is not None
    # The samples are the EMA's.
    frames_lib.write_run_samples(tmp_path, ckpt.ema, TINY, seed)
    assert (tmp_path / "samples.png").read_bytes() == (run / "samples.png").read_bytes()


def test_the_average_leaves_the_training_itself_alone(ema_run, bmnist, tmp_path):
    """With ema_decay 0 nothing of the average is written (no /ema group, "ema": false,
    an export as before), and the params, Adam state, RNG and training bounds of the two
    runs are the same bit for bit."""
    plain = _train(TINY, _tcfg(tmp_path, epochs=2, name="plain", eval_noise="epoch"), bmnist)
    for name in ("checkpoint.h5", "best.h5"):
        with h5py.File(plain / name, "r") as f:
            assert "ema" not in f and "params" in f
        with h5py.File(ema_run / name, "r") as f:
            assert "ema" in f
    a = ckpt_lib.load_checkpoint(plain / "checkpoint.h5")
    b = ckpt_lib.load_checkpoint(ema_run / "checkpoint.h5")
    assert a.ema is None and a.rng_state == b.rng_state
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
        assert np.array_equal(a.opt_state["m"][name], b.opt_state["m"][name]), name
        assert np.array_equal(a.opt_state["v"][name], b.opt_state["v"][name]), name
    rows, rows_ema = runs_lib.read_log(plain), runs_lib.read_log(ema_run)
    assert [r["ema"] for r in rows] == [False, False]
    for r, r_ema in zip(rows, rows_ema):
        for key in ("train_bound", "train_recon", "kl", "grad_norm", "step_norm", "lr"):
            assert r[key] == r_ema[key], key
    rng = evaluate_lib.derived_rng(3, 1, 2, 0)
    assert rows[1]["valid_bound"] == evaluate_lib.evaluate_bound(
        a.params, TINY, np.asarray(bmnist.valid[:200], np.float32), evaluate_lib.EVAL_BATCH, rng)

    info = runs_lib.export_model(plain / "checkpoint.h5", tmp_path / "plain.h5")
    shipped = ckpt_lib.load_checkpoint(tmp_path / "plain.h5")
    assert "ema" not in info and "ema" not in shipped.extra and shipped.ema is None
    for name, value in a.params.items():
        assert np.array_equal(shipped.params[name], value), name


def test_resume_continues_the_average_bit_for_bit(ema_run, bmnist, tmp_path):
    split = _train(TINY, _tcfg(tmp_path, epochs=1, ema_decay=DECAY, name="split",
                               eval_noise="epoch"), bmnist)     # as ema_run
    lines = []
    _train(None, TrainConfig(epochs=2, device="cpu", resume=str(split)), bmnist, lines)
    assert any("continued from the checkpoint" in line for line in lines)
    a = ckpt_lib.load_checkpoint(ema_run / "checkpoint.h5")
    b = ckpt_lib.load_checkpoint(split / "checkpoint.h5")
    assert a.epoch == b.epoch == 2 and a.rng_state == b.rng_state
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
        assert np.array_equal(a.ema[name], b.ema[name]), name
        assert np.array_equal(a.opt_state["m"][name], b.opt_state["m"][name]), name
        assert np.array_equal(a.opt_state["v"][name], b.opt_state["v"][name]), name
    for ra, rb in zip(runs_lib.read_log(ema_run), runs_lib.read_log(split)):
        for key in ("train_bound", "valid_bound", "test_bound", "ema", "best"):
            assert ra[key] == rb[key], key


def test_an_old_checkpoint_resumed_with_an_average_starts_it_from_its_params(
        bmnist, bmnist_data_dir, bmnist_mirror, tmp_path, monkeypatch):
    """A run saved before ema_decay existed (no field in its config, no /ema group),
    resumed through the CLI with --ema-decay: the average starts at the checkpoint's
    params and follows the closed form over the steps that follow."""
    run = _train(TINY, _tcfg(tmp_path, epochs=1), bmnist)
    with h5py.File(run / "checkpoint.h5", "r+") as f:      # as an earlier version wrote it
        del f.attrs["digest"]
        saved = json.loads(f.attrs["train_config"])
        del saved["ema_decay"]
        f.attrs["train_config"] = json.dumps(saved)
    start = ckpt_lib.load_checkpoint(run / "checkpoint.h5").params

    seen, real = [], optim.ema_update

    def recording(ema, params, decay):
        if not seen:
            seen.append({k: v.copy() for k, v in ema.items()})
        seen.append({k: np.array(v) for k, v in params.items()})
        return real(ema, params, decay)

    monkeypatch.setattr(train_lib.optim, "ema_update", recording)
    result = invoke(["train", "--resume", run, "--epochs", 2, "--ema-decay", DECAY,
                     "--no-progress", "--device", "cpu", "--ranks", 1,
                     "--data-dir", bmnist_data_dir, "--mirror", bmnist_mirror])
    assert result.exit_code == 0, result.output
    assert f"resuming with ema_decay {DECAY} (was 0.0)" in result.output
    assert "the checkpoint holds none: started from its parameters" in result.output
    assert "EMA valid" in result.output
    initial, *steps = seen
    assert len(steps) == STEPS_PER_EPOCH
    for name in start:
        assert np.array_equal(initial[name], start[name]), name
    ckpt = ckpt_lib.load_checkpoint(run / "checkpoint.h5")
    assert runs_lib.train_config_of(ckpt).ema_decay == DECAY
    want = _closed_form(start, steps, DECAY)
    tol = _ema_tolerance(steps, float(np.finfo(np.float32).eps))
    for name in start:
        np.testing.assert_allclose(ckpt.ema[name], want[name], rtol=0, atol=tol, err_msg=name)
        assert np.array_equal(steps[-1][name], ckpt.params[name]), name
    assert [r["ema"] for r in runs_lib.read_log(run)] == [False, True]


def test_resuming_with_decay_0_drops_the_average(ema_run, bmnist, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(ema_run, run)
    lines = []
    _train(None, TrainConfig(epochs=3, device="cpu", resume=str(run), ema_decay=0.0), bmnist,
           lines, overrides=("ema_decay",))
    assert any("moving average of the parameters is dropped" in line for line in lines)
    assert ckpt_lib.load_checkpoint(run / "checkpoint.h5").ema is None
    assert [r["ema"] for r in runs_lib.read_log(run)] == [True, True, False]


def test_oldmodel_starts_from_the_average_of_a_run_that_kept_one(ema_run, bmnist, tmp_path,
                                                                  monkeypatch):
    """--oldmodel takes the checkpoint's model, which for an EMA run is the average (what
    it evaluated and exported), and says so; the new run starts without an average of its
    own unless asked."""
    old = ckpt_lib.load_checkpoint(ema_run / "checkpoint.h5")
    assert any(not np.array_equal(old.ema[k], old.params[k]) for k in old.params)
    first = {}

    def capture(real, params, cfg, x, eps):
        first.update({k: np.array(v) for k, v in params.items()})
        return real(params, cfg, x, eps)

    _patched_loss(monkeypatch, 1, capture)                # the first step's parameters
    lines = []
    run = _train(TINY, _tcfg(tmp_path, name="from-old", oldmodel=str(ema_run / "checkpoint.h5")),
                 bmnist, lines)
    assert any("--oldmodel" in line and "moving average" in line for line in lines)
    for name in old.params:
        assert np.array_equal(first[name], old.ema[name]), name
    assert ckpt_lib.load_checkpoint(run / "checkpoint.h5").ema is None


# ----------------------------------------------------------------------------- export

def test_export_and_evaluate_use_the_average(ema_run, bmnist, bmnist_data_dir, bmnist_mirror,
                                             tmp_path):
    out = tmp_path / "shipped.h5"
    info = runs_lib.export_model(ema_run / "best.h5", out, bmnist.test, check_n=20,
                                  check_seed=5)
    source = ckpt_lib.load_checkpoint(ema_run / "best.h5")
    shipped = ckpt_lib.load_checkpoint(out)
    assert shipped.opt_state is None and shipped.ema is None
    assert shipped.extra["ema"] is True and shipped.extra["ema_decay"] == DECAY
    assert info["ema"] is True
    for name, value in source.ema.items():
        assert shipped.params[name].dtype == np.float32
        assert np.array_equal(shipped.params[name], value), name
    assert any(not np.array_equal(shipped.params[k], source.params[k]) for k in source.params)
    assert math.isclose(shipped.extra["check"]["bound"],
                        evaluate_lib.fixed_noise_bound(source.ema, TINY, bmnist.test[:20], 5),
                        rel_tol=1e-12)
    row = runs_lib.read_log(ema_run)[source.epoch - 1]
    assert shipped.extra["valid_bound"] == row["valid_bound"]

    # `evaluate` of the run scores the same model (best.h5's EMA) and says so, and so
    # does `evaluate` of the shipped file, whose parameters are that average.
    spread = data_lib.spread_subset(len(bmnist.test), 20, 0)      # evaluate --subset 20
    want = evaluate_lib.evaluate_bound(source.ema, TINY, np.asarray(bmnist.test[spread], np.float32),
                                    500, np.random.default_rng(0))
    for model in (ema_run, out):
        result = invoke(["evaluate", model, "--subset", 20, "--json", "--ranks", 1,
                         "--device", "cpu", "--data-dir", bmnist_data_dir, "--mirror",
                         bmnist_mirror])
        assert result.exit_code == 0, result.output
        got = json.loads(result.output.splitlines()[-1])
        assert got["ema"] is True, model
        assert got["nll_bound"] == pytest.approx(want, rel=1e-6), model


# ----------------------------------------------------------------------------- MPI

def test_two_ranks_keep_the_one_process_average(bmnist, bmnist_data_dir, bmnist_mirror,
                                                tmp_path):
    """`mpiexec -n 2 python cli.py train --ema-decay ...`: every rank averages, rank 0
    saves it, and it is the one-process run's up to the float32 regrouping of the
    gradient sums (tests/test_distributed.py's tolerances)."""
    result = _run_mpi(2, [REPO / "cli.py", "train", *TRAIN_ARGS, "--ema-decay", DECAY,
                          "--data-dir", bmnist_data_dir, "--mirror", bmnist_mirror,
                          "--out", tmp_path, "--name", "mpi", "--epochs", 1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(2 MPI ranks)" in result.stdout and "EMA valid" in result.stdout
    cfg = DrawConfig(T=3, read_n=2, write_n=5, enc_dim=16, dec_dim=16, z_dim=4)
    one = _train(cfg, TrainConfig(epochs=1, batch_size=45, subset=200, eval_subset=200,
                                  seed=3, device="cpu", out=str(tmp_path), name="one",
                                  ema_decay=DECAY), bmnist)
    a = ckpt_lib.load_checkpoint(tmp_path / "mpi" / "checkpoint.h5")
    b = ckpt_lib.load_checkpoint(one / "checkpoint.h5")
    assert a.ema is not None and b.ema is not None
    for name in a.params:
        np.testing.assert_allclose(a.ema[name], b.ema[name], rtol=1e-3, atol=1e-4,
                                   err_msg=name)
    assert any(not np.allclose(a.ema[k], a.params[k], rtol=1e-3, atol=1e-4) for k in a.params)
    row, row_one = runs_lib.read_log(tmp_path / "mpi")[0], runs_lib.read_log(one)[0]
    assert row["ema"] is True
    assert row["valid_bound"] == pytest.approx(row_one["valid_bound"], rel=1e-4)
