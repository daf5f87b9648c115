"""npdraw.engine_numba (the optional Numba kernels: the LSTM cells, the attention filters'
rows, eq 3's glimpse error) against the NumPy path of npdraw.engine_layers,
engine_attention and engine, the whole engine on them against the reference, and the
switch (env NPDRAW_KERNELS, engine_layers.set_kernels) that selects them."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npdraw
from npdraw import engine, engine_numba, reference
from npdraw import engine_attention as att
from npdraw import engine_layers as el
from gradcheck import rel_err
from test_model import generic_point
from test_reference import ALL_CONFIGS, PEEPHOLE_CONFIGS, _check_engine_against_reference

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("lstm_cell", "lstm_cell_backward", "peephole_lstm_cell",
           "peephole_lstm_cell_backward")
OTHER_KERNELS = ("gaussian_rows", "gaussian_sums_backward", "glimpse_error",
                 "glimpse_error_backward", "latent", "latent_backward")
U32 = 2.0 ** -24

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
    calls = dict.fromkeys(KERNELS + OTHER_KERNELS, 0)
    for name in KERNELS + OTHER_KERNELS:
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
    cfg = ALL_CONFIGS[name]
    T = cfg.T
    assert numba_kernels[forward] >= 2 * T and numba_kernels[backward] == 2 * T
    other = set(KERNELS) - {forward, backward}
    assert all(numba_kernels[k] == 0 for k in other)
    # eq 3 every glimpse; the filters of every window (T + 1 read, T write; one
    # softmax for both axes when H == W, one each otherwise), forward and backward
    assert numba_kernels["glimpse_error"] >= T and numba_kernels["glimpse_error_backward"] == T
    assert numba_kernels["latent"] >= T and numba_kernels["latent_backward"] == T
    axes = 1 if cfg.height == cfg.width else 2
    windows = (T + 1) * axes if cfg.attention else 0
    assert numba_kernels["gaussian_sums_backward"] == windows
    assert numba_kernels["gaussian_rows"] >= windows


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


# ---------------------------------------------------------------- attention and eq 3

def _filter_inputs(dtype, seed, per_row, B=6, M=9, A=11):
    """Centres inside, outside and at the edges of the image, one NaN and one infinite,
    variances from tiny to wide; sigma2 (B,) or, per_row, (B, M); and a gradient dF."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-4, A + 5, (B, M))
    mu[0, :3] = [1.0, A, 0.5]
    mu[1, 0], mu[2, 1], mu[3, 2] = np.nan, np.inf, -np.inf
    sigma2 = np.exp(rng.uniform(-6, 3, (B, M) if per_row else B))
    dF = rng.standard_normal((B, M, A))
    return mu.astype(dtype), sigma2.astype(dtype), dF.astype(dtype), A


def _filters(kernels, mu, sigma2, dF, A):
    """_gaussian_rows and its backward on the given kernels -> (F, index, 2d, dmu, dsigma2)."""
    el.set_kernels(kernels)
    with np.errstate(invalid="ignore"):          # the NaN and infinite centres
        F, cache = att._gaussian_rows(mu, sigma2, A)
        dmu, dsigma2 = att._gaussian_rows_backward(dF, cache)
    return F, cache[1], cache[2], dmu, dsigma2


def _agree_where_finite(got, want, tol):
    """NaN where the other is NaN, and the rest within tol (rel_err)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want))
    keep = ~np.isnan(want)
    assert rel_err(got[keep], want[keep]) < tol, rel_err(got[keep], want[keep])


@pytest.mark.parametrize("per_row", [False, True])
def test_numba_filters_equal_the_numpy_filters_in_float64(numba_kernels, per_row):
    """Eq 25-26 and their backward: the same nearest pixels and gaps exactly, the filters
    and gradients to 1e-12 (the row sums run in another order), NaN where NumPy's is."""
    for seed in range(3):
        inputs = _filter_inputs(np.float64, seed, per_row)
        want = _filters("numpy", *inputs)
        got = _filters("numba", *inputs)
        assert numba_kernels["gaussian_rows"] == numba_kernels["gaussian_sums_backward"] == seed + 1
        assert np.array_equal(got[1], want[1]) and got[1].dtype == want[1].dtype
        assert np.array_equal(got[2], want[2], equal_nan=True)
        for g, w in zip(got[:1] + got[3:], want[:1] + want[3:]):
            _agree_where_finite(g, w, AGREE64)


@pytest.mark.parametrize("per_row", [False, True])
def test_numba_filters_in_float32_are_as_close_as_numpy_float32(numba_kernels, per_row):
    """float32: a filter row is exp(l) / Z with Z a sum of A positive terms; summed in
    another order, Z moves by at most 2 (A - 1) u, so F by that plus two roundings. The
    gradients are sums with cancellation: the Numba path's error against float64 must stay
    within twice the NumPy path's own float32 error, plus a few ulp."""
    for seed in range(3):
        inputs32 = _filter_inputs(np.float32, seed, per_row)
        A = inputs32[-1]
        exact = _filters("numpy", *[a.astype(np.float64) for a in inputs32[:3]], A)
        want = _filters("numpy", *inputs32)
        got = _filters("numba", *inputs32)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2], equal_nan=True)
        _agree_where_finite(got[0], want[0], (2 * (A - 1) + 2) * U32)
        for g, w, e in zip(got[3:], want[3:], exact[3:]):
            keep = ~np.isnan(e)
            numpy_error = rel_err(w[keep], e[keep])
            assert rel_err(g[keep], e[keep]) <= 2 * numpy_error + 8 * U32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_glimpse_error_is_the_numpy_one_to_the_bit(numba_kernels, dtype):
    """Eq 3 and its backward on Numba give NumPy's results exactly (the same operations in
    the same order after NumPy's own tanh), written where NumPy writes them; the read's
    x_hat is a strided view of the image buffer, as in the engine."""
    rng = np.random.default_rng(3)
    B, C, H, W = 4, 2, 5, 3
    x = rng.random((B, C, H, W)).astype(dtype)
    canvas = rng.normal(0, 3, (B, C, H, W)).astype(dtype)
    dcanvas, dx_hat = rng.standard_normal((2, B, C * H * W)).astype(dtype)
    results = {}
    for kernels in ("numpy", "numba"):
        el.set_kernels(kernels)
        images = np.zeros((B, 2 * C, H, W), dtype)
        sig = np.empty((B, C, H, W), dtype)
        engine._glimpse_error_into(x, canvas, sig, images[:, C:])
        back = engine._glimpse_error_backward(dcanvas.copy(), dx_hat, sig.reshape(B, -1))
        results[kernels] = (sig, images, back)
    assert numba_kernels["glimpse_error"] == numba_kernels["glimpse_error_backward"] == 1
    for got, want in zip(results["numba"], results["numpy"]):
        assert got.dtype == dtype and np.array_equal(got, want)
    assert not results["numba"][1][:, :C].any()          # x's planes left alone


@pytest.mark.parametrize("kernels", ["numpy", "numba"])
@pytest.mark.parametrize("peepholes", [False, True])
def test_a_cell_backward_writes_its_slot_of_the_stacked_buffer(monkeypatch, kernels, peepholes):
    """slot=t puts da into out[:, t] of a (4Hs, T, B) buffer, as the engine keeps it, and
    nothing elsewhere; the da returned and dc_prev (and dpeep) are the slot-less call's."""
    monkeypatch.setattr(el, "_numba", el._numba)
    el.set_kernels(kernels)
    a, c_prev, dh, dc, peep = _cell_inputs(np.float64, 4)
    if peepholes:
        _, cache = el.peephole_lstm_cell_forward(a, c_prev, peep, axis=0)
        backward = el.peephole_lstm_cell_backward
    else:
        _, cache = el.lstm_cell_forward(a, c_prev, axis=0)
        backward = el.lstm_cell_backward
    want = backward(dh, dc, cache)
    stacked = np.full((a.shape[0], 3, a.shape[1]), -7.0)
    got = backward(dh, dc, cache, out=stacked, slot=1)
    assert np.array_equal(stacked[:, 1], want[0])
    assert (stacked[:, [0, 2]] == -7.0).all()
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_latent_is_the_numpy_one_to_the_bit(numba_kernels, dtype):
    """Eq 6 and 10-11, forward and backward, features first as the engine runs them: z
    written into its strided slot, the KL, and dq into its slot of the stacked (2Z, T, B)
    buffer, all NumPy's to the bit; the other slots are left alone."""
    rng = np.random.default_rng(8)
    Z, B = 5, 4
    q = rng.normal(0, 1.5, (2 * Z, B)).astype(dtype)
    eps = rng.standard_normal((B, Z)).astype(dtype).T          # a transposed view, as there
    dz = rng.standard_normal((Z, B)).astype(dtype)
    results = {}
    for kernels in ("numpy", "numba"):
        el.set_kernels(kernels)
        z_slots = np.zeros((Z, 3, B), dtype)
        (z, kl), cache = el.latent_forward(q, eps, axis=0, z_out=z_slots[:, 1])
        stacked = np.full((2 * Z, 3, B), -7.0, dtype)
        dq = el.latent_backward(dz, 0.25, cache, out=stacked, slot=2)
        assert z is z_slots[:, 1] or np.shares_memory(z, z_slots)
        results[kernels] = (z_slots, kl, stacked, np.array(dq))
    assert numba_kernels["latent"] == numba_kernels["latent_backward"] == 1
    for got, want in zip(results["numba"], results["numpy"]):
        assert got.dtype == dtype and np.array_equal(got, want)
    z_slots, _, stacked, dq = results["numba"]
    assert not z_slots[:, [0, 2]].any() and (stacked[:, :2] == -7.0).all()
    assert np.array_equal(stacked[:, 2], dq)


# ---------------------------------------------------------------- centred differences
# The kernels' backward passes are hand-written: the float64 centred-difference checks of
# tests/test_model.py (the whole model) and tests/test_engine_attention.py (the windows)
# run on them too.

@pytest.mark.parametrize("name", ["attn_grey_nonsquare", "noattn_colour", "attn_write_n1"])
def test_whole_model_gradients_on_numba_kernels(numba_kernels, name):
    from test_model import test_whole_model_gradients
    test_whole_model_gradients(name)
    assert numba_kernels["lstm_cell_backward"] > 0 and numba_kernels["latent_backward"] > 0
    assert numba_kernels["glimpse_error_backward"] > 0
    assert (numba_kernels["gaussian_sums_backward"] > 0) == (name != "noattn_colour")


@pytest.mark.parametrize("H,W,Ns", [(6, 6, (4, 2)), (5, 7, (3,))])
def test_window_gradients_on_numba_kernels(numba_kernels, H, W, Ns):
    from test_engine_attention import test_windows_gradients
    test_windows_gradients(np.random.default_rng(11), H, W, Ns)
    assert numba_kernels["gaussian_sums_backward"] >= 1
