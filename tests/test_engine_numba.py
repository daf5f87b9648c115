"""npdraw.engine_numba (the optional Numba LSTM-cell kernels) against the NumPy path of
npdraw.engine_layers, the whole engine on them against the reference, and the switch
(env NPDRAW_KERNELS, engine_layers.set_kernels) that selects them."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npdraw
from npdraw import engine_layers as el
from npdraw import engine_numba, reference
from gradcheck import rel_err
from test_model import generic_point
from test_reference import ALL_CONFIGS, PEEPHOLE_CONFIGS, _check_engine_against_reference

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("lstm_cell", "lstm_cell_backward", "peephole_lstm_cell",
           "peephole_lstm_cell_backward")

AGREE64 = 1e-12
# float32: each output is a chain of at most 12 rounded operations (a product, sum or
# NumPy's tanh, the latter within 4 ulp), each off by at most u = 2^-24 relative; carried
# through factors of size O(1) (gates in (0, 1), |1 - t^2| <= 1, inputs ~ N(0, 1)) two
# orders of evaluation can differ by about 2 * (12 + 2 * 4) u = 40 u of the outputs'
# magnitude. rel_err divides by |a| + |b|, which only halves that; 64 u leaves margin.
AGREE32 = 64 * 2.0 ** -24


@pytest.fixture
def counted(monkeypatch):
    """engine_numba's four entry points, each counting its calls: -> the counts."""
    calls = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        def counting(*args, _kernel=getattr(engine_numba, name), _name=name):
            calls[_name] += 1
            return _kernel(*args)
        monkeypatch.setattr(engine_numba, name, counting)
    return calls


@pytest.fixture
def numba_kernels(monkeypatch, counted):
    """The engine on Numba kernels for one test (the NumPy ones again after it)."""
    monkeypatch.setattr(el, "_numba", el._numba)
    el.set_kernels("numba")
    assert el.kernels() == "numba"
    return counted


def _cell_inputs(dtype, seed, Hs=7, B=5):
    """Features-first inputs as the engine has them: h and dh are strided views into a
    stacked (features, T+1, B) buffer, gates are written over a."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((4 * Hs, B)).astype(dtype)
    c_prev = rng.standard_normal((Hs, B)).astype(dtype)
    stacked = rng.standard_normal((Hs, 3, B)).astype(dtype)
    dh, dc = stacked[:, 0], rng.standard_normal((Hs, B)).astype(dtype)
    peep = rng.standard_normal(3 * Hs).astype(dtype)
    return a, c_prev, dh, dc, peep


def _run_cells(kernels, dtype, seed, peepholes):
    """Forward then backward of one cell on the given kernels -> every array they give
    (h, c, the cache's gates and tanh(c), da, dc_prev and, with peepholes, dpeep)."""
    el.set_kernels(kernels)
    a, c_prev, dh, dc, peep = _cell_inputs(dtype, seed)
    h_slot = np.zeros((c_prev.shape[0], 2, c_prev.shape[1]), dtype)[:, 1]
    if peepholes:
        (h, c), cache = el.peephole_lstm_cell_forward(a, c_prev, peep, axis=0, gates_out=a,
                                                      h_out=h_slot)
        gates, tanh_c = np.concatenate(cache[0]), cache[3]
        da, dc_prev, dpeep = el.peephole_lstm_cell_backward(dh, dc, cache,
                                                            out=np.empty_like(a))
        extra = [dpeep]
    else:
        (h, c), cache = el.lstm_cell_forward(a, c_prev, axis=0, gates_out=a, h_out=h_slot)
        gates, tanh_c = cache[0], cache[2]
        da, dc_prev = el.lstm_cell_backward(dh, dc, cache, out=np.empty_like(a))
        extra = []
    assert h is h_slot                          # written where the NumPy path writes
    assert all(np.shares_memory(block, a) for block in cache[0]) if peepholes else gates is a
    return [h, c, gates, tanh_c, da, dc_prev, *extra]


@pytest.mark.parametrize("peepholes", [False, True])
@pytest.mark.parametrize("dtype, tol", [(np.float64, AGREE64), (np.float32, AGREE32)])
def test_numba_cells_equal_the_numpy_cells(numba_kernels, dtype, tol, peepholes):
    """Each Numba kernel gives what the NumPy sequence gives, in the same arrays and
    dtype (in practice to the bit: the same operations in the same order, NumPy's tanh)."""
    for seed in range(3):
        want = _run_cells("numpy", dtype, seed, peepholes)
        before = dict(numba_kernels)
        got = _run_cells("numba", dtype, seed, peepholes)
        forward, backward = KERNELS[2:] if peepholes else KERNELS[:2]
        assert numba_kernels[forward] == before[forward] + 1
        assert numba_kernels[backward] == before[backward] + 1
        for k, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype == dtype and g.shape == w.shape
            assert rel_err(g, w) < tol, (k, rel_err(g, w))


def test_the_batch_first_layout_stays_on_numpy(numba_kernels):
    """axis=-1 (the classifier's layout) has no Numba kernel: the NumPy path runs it."""
    a, c_prev, dh, dc, peep = _cell_inputs(np.float64, 0)
    _, cache = el.lstm_cell_forward(a.T.copy(), c_prev.T.copy())
    el.lstm_cell_backward(dh.T.copy(), dc.T.copy(), cache)
    assert sum(numba_kernels.values()) == 0


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_engine_on_numba_kernels_matches_the_reference(numba_kernels, name):
    """The whole engine (loss, stats, every gradient) on Numba kernels equals the reference
    in float64, with and without attention and peepholes; the kernels really ran."""
    _check_engine_against_reference(name)
    forward, backward = KERNELS[2:] if name in PEEPHOLE_CONFIGS else KERNELS[:2]
    T = ALL_CONFIGS[name].T
    assert numba_kernels[forward] >= 2 * T and numba_kernels[backward] == 2 * T
    other = set(KERNELS) - {forward, backward}
    assert all(numba_kernels[k] == 0 for k in other)


@pytest.mark.parametrize("name", ["attn_grey_nonsquare_peepholes", "noattn_colour"])
def test_numpy_kernels_are_the_default_and_untouched(monkeypatch, counted, name):
    """Without NPDRAW_KERNELS the NumPy path runs (no Numba kernel is called), and
    switching to Numba and back gives its results again to the bit."""
    monkeypatch.delenv("NPDRAW_KERNELS", raising=False)
    assert el._kernels_from_environment() is None
    monkeypatch.setattr(el, "_numba", el._kernels_from_environment())
    assert el.kernels() == "numpy"
    cfg = ALL_CONFIGS[name]
    params, x, eps = generic_point(cfg, seed=5)
    loss, grads, _ = npdraw.loss_and_grads(params, cfg, x, eps)
    assert sum(counted.values()) == 0
    el.set_kernels("numba")
    npdraw.loss_and_grads(params, cfg, x, eps)
    assert sum(counted.values()) > 0
    el.set_kernels("numpy")
    loss_again, grads_again, _ = npdraw.loss_and_grads(params, cfg, x, eps)
    assert loss_again == loss
    assert all(np.array_equal(grads_again[k], grads[k]) for k in grads)
    loss_r, _, _ = reference.loss_and_grads(params, cfg, x, eps)
    assert loss == pytest.approx(loss_r, rel=AGREE64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_default_cells_are_the_numpy_sequences_to_the_bit(monkeypatch, counted, dtype):
    """By default lstm_cell_forward/backward (axis=0) give exactly what the in-place NumPy
    functions they had before give, called directly."""
    monkeypatch.setattr(el, "_numba", None)
    a, c_prev, dh, dc, _ = _cell_inputs(dtype, 7)
    (h, c), cache = el.lstm_cell_forward(a.copy(), c_prev, axis=0)
    da, dc_prev = el.lstm_cell_backward(dh, dc, cache)
    gates, c_want, tanh_c, h_want = el._lstm_cell_numpy(a.copy(), c_prev, 0)
    da_want = np.empty_like(a)
    dc_prev_want = el._lstm_cell_backward_numpy(dh, dc, gates, c_prev, tanh_c, da_want, 0)
    for got, want in ((h, h_want), (c, c_want), (cache[0], gates), (cache[2], tanh_c),
                      (da, da_want), (dc_prev, dc_prev_want)):
        assert got.dtype == dtype and np.array_equal(got, want)
    assert sum(counted.values()) == 0


def test_float32_engine_on_numba_kernels_keeps_float32(numba_kernels):
    """A float32 model stays float32 through the Numba kernels, near the float64 loss."""
    cfg = ALL_CONFIGS["attn_grey_nonsquare_peepholes"]
    params, x, eps = generic_point(cfg, seed=6)
    loss64, _, _ = npdraw.loss_and_grads(params, cfg, x, eps)
    params32 = {k: v.astype(np.float32) for k, v in params.items()}
    loss32, grads32, _ = npdraw.loss_and_grads(params32, cfg, x.astype(np.float32),
                                               eps.astype(np.float32))
    assert all(g.dtype == np.float32 for g in grads32.values())
    assert loss32 == pytest.approx(loss64, rel=1e-4)
    assert numba_kernels["peephole_lstm_cell"] > 0


def test_the_environment_selects_the_kernels(monkeypatch):
    """NPDRAW_KERNELS=numba selects engine_numba; another name is refused, in one sentence,
    where a cell would run (not on import); set_kernels refuses it at once."""
    monkeypatch.setenv("NPDRAW_KERNELS", "numba")
    assert el._kernels_from_environment() is engine_numba
    monkeypatch.setenv("NPDRAW_KERNELS", "fast")
    wrong = el._kernels_from_environment()
    monkeypatch.setattr(el, "_numba", wrong)
    with pytest.raises(ValueError, match="NPDRAW_KERNELS=fast names kernels 'fast'; choose"):
        el.kernels()
    a, c_prev, *_ = _cell_inputs(np.float64, 0)
    with pytest.raises(ValueError, match="choose 'numpy' or 'numba'"):
        el.lstm_cell_forward(a, c_prev, axis=0)
    with pytest.raises(ValueError, match=r"set_kernels\('fast'\) names kernels"):
        el.set_kernels("fast")


def test_numba_missing_is_one_sentence(monkeypatch):
    """Asked for where numba cannot be imported: a ValueError that says how to install it."""
    monkeypatch.setitem(sys.modules, "numba", None)            # import numba now fails
    monkeypatch.delitem(sys.modules, "npdraw.engine_numba")
    monkeypatch.delattr(npdraw, "engine_numba")
    with pytest.raises(ValueError, match="asks for Numba kernels, but numba cannot be "
                                         r"imported \(.*\); install it with: pip install numba"):
        el.set_kernels("numba")


def test_the_command_line_says_numba_is_missing_in_one_sentence(tmp_path):
    """`npdraw train` with NPDRAW_KERNELS=numba and no numba: exit 1, one sentence on
    stderr, no traceback, before any work (no run folder)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "numba.py").write_text("raise ImportError('No module named numba')\n")
    env = {**os.environ, "NPDRAW_KERNELS": "numba",
           "PYTHONPATH": os.pathsep.join([str(hide), str(REPO_ROOT)])}
    done = subprocess.run([sys.executable, "-m", "npdraw", "train", "--out",
                           str(tmp_path / "runs")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "Error: NPDRAW_KERNELS=numba asks for Numba kernels, but numba cannot be imported "
        "(No module named numba); install it with: pip install numba"]
    assert not (tmp_path / "runs").exists()


def test_only_engine_numba_imports_numba():
    """Numba stays optional: one module of npdraw imports it (as backend.py holds CuPy)."""
    importers = []
    for path in sorted((REPO_ROOT / "npdraw").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "numba" for n in names):
                importers.append(path.name)
    assert importers == ["engine_numba.py"]
