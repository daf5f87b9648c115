"""Gradient checks for npdraw.layers (the plain pairs: linear, LSTM cell and BPTT, latent +
KL, BCE) and npdraw.engine_layers (the engine's in-place, features-first variants), and
that both kinds agree."""
import numpy as np
import pytest

from npdraw.layers import (bce_backward, bce_forward, kl_backward, kl_forward, latent_backward,
                           latent_forward, linear_backward, linear_forward, lstm_cell_backward,
                           lstm_cell_forward, peephole_lstm_cell_backward,
                           peephole_lstm_cell_forward, reparam_backward, reparam_forward)
from gradcheck import numeric_grad, rel_err

from npdraw import engine_layers as el

TOL = 1e-6  # reached: every check here lands below about 1e-8


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_linear_gradients(rng):
    x = rng.standard_normal((4, 3, 5))
    W = rng.standard_normal((5, 6))
    b = rng.standard_normal(6)
    proj = rng.standard_normal((4, 3, 6))

    def f():
        return float((linear_forward(x, W, b)[0] * proj).sum())

    _, cache = linear_forward(x, W, b)
    dx, dW, db = linear_backward(proj, cache)
    for analytic, array in ((dx, x), (dW, W), (db, b)):
        assert rel_err(analytic.ravel(), numeric_grad(f, array)) < TOL


def test_lstm_cell_gradients(rng):
    B, Hd = 3, 4
    a = rng.standard_normal((B, 4 * Hd))
    c_prev = rng.standard_normal((B, Hd))
    ph, pc = rng.standard_normal((B, Hd)), rng.standard_normal((B, Hd))

    def f():
        (h, c), _ = lstm_cell_forward(a, c_prev)
        return float((h * ph).sum() + (c * pc).sum())

    _, cache = lstm_cell_forward(a, c_prev)
    da, dc_prev = lstm_cell_backward(ph, pc, cache)
    assert rel_err(da.ravel(), numeric_grad(f, a)) < TOL
    assert rel_err(dc_prev.ravel(), numeric_grad(f, c_prev)) < TOL


def test_lstm_gate_order_is_i_f_o_g():
    """With a huge forget and no input, c carries over; the g block is the candidate."""
    Hd = 2
    a = np.zeros((1, 4 * Hd))
    a[0, Hd:2 * Hd] = 50.0        # forget gate open
    a[0, 0:Hd] = -50.0            # input gate shut
    a[0, 2 * Hd:3 * Hd] = 50.0    # output gate open
    c_prev = np.array([[0.3, -0.2]])
    (h, c), _ = lstm_cell_forward(a, c_prev)
    np.testing.assert_allclose(c, c_prev, atol=1e-12)
    np.testing.assert_allclose(h, np.tanh(c_prev), atol=1e-12)


def test_lstm_bptt_through_several_steps(rng):
    """A T-step LSTM built from the paired functions, checked end to end."""
    T, B, I, Hd = 4, 2, 3, 5
    xs = rng.standard_normal((T, B, I))
    W = 0.5 * rng.standard_normal((I + Hd, 4 * Hd))
    b = rng.standard_normal(4 * Hd)
    h0 = rng.standard_normal((B, Hd))
    proj = rng.standard_normal((T, B, Hd))

    def run():
        h, c, caches = h0, np.zeros((B, Hd)), []
        for t in range(T):
            a, lin_cache = linear_forward(np.concatenate([xs[t], h], axis=1), W, b)
            (h, c), cell_cache = lstm_cell_forward(a, c)
            caches.append((lin_cache, cell_cache, h))
        return caches

    def f():
        return float(sum((cache[2] * proj[t]).sum() for t, cache in enumerate(run())))

    caches = run()
    dW, db, dxs = np.zeros_like(W), np.zeros_like(b), np.zeros_like(xs)
    dh_next, dc_next = np.zeros((B, Hd)), np.zeros((B, Hd))
    for t in reversed(range(T)):
        lin_cache, cell_cache, _ = caches[t]
        da, dc_next = lstm_cell_backward(proj[t] + dh_next, dc_next, cell_cache)
        dinput, dW_t, db_t = linear_backward(da, lin_cache)
        dW += dW_t
        db += db_t
        dxs[t], dh_next = dinput[:, :I], dinput[:, I:]
    assert rel_err(dW.ravel(), numeric_grad(f, W)) < TOL
    assert rel_err(db, numeric_grad(f, b)) < TOL
    assert rel_err(dxs.ravel(), numeric_grad(f, xs)) < TOL
    assert rel_err(dh_next.ravel(), numeric_grad(f, h0)) < TOL


def test_latent_gradients_and_exact_kl(rng):
    B, Z = 3, 4
    q = rng.standard_normal((B, 2 * Z))
    eps = rng.standard_normal((B, Z))
    pz, pkl = rng.standard_normal((B, Z)), rng.standard_normal(B)

    def f():
        (z, kl), _ = latent_forward(q, eps)
        return float((z * pz).sum() + (kl * pkl).sum())

    (z, kl), cache = latent_forward(q, eps)
    dq = latent_backward(pz, pkl, cache)
    assert rel_err(dq.ravel(), numeric_grad(f, q)) < TOL
    mu, sigma = q[:, :Z], np.exp(q[:, Z:])
    np.testing.assert_allclose(z, mu + sigma * eps)
    # KL(N(mu, sigma^2) || N(0, 1)) by its textbook closed form
    expected = np.sum(np.log(1.0 / sigma) + (sigma ** 2 + mu ** 2) / 2.0 - 0.5, axis=1)
    np.testing.assert_allclose(kl, expected, rtol=1e-12)
    # the buffers the unrolled model passes: z and dq written into given arrays
    z_out, dq_out = np.full_like(eps, np.nan), np.full_like(q, np.nan)
    (z_into, _), cache_into = el.latent_forward(q, eps, z_out=z_out)
    assert z_into is z_out
    np.testing.assert_array_equal(z_out, z)
    assert el.latent_backward(pz, pkl, cache_into, out=dq_out) is dq_out
    np.testing.assert_array_equal(dq_out, dq)


@pytest.mark.parametrize("axis", [-1, 0])
def test_reparam_gradients_and_accumulation(rng, axis):
    """z = mu + sigma eps, features last or first; dq= adds into a given gradient."""
    B, Z = 3, 4
    q, eps, pz = rng.standard_normal((B, 2 * Z)), rng.standard_normal((B, Z)), rng.standard_normal((B, Z))
    if axis == 0:
        q, eps, pz = q.T.copy(), eps.T.copy(), pz.T.copy()
    z_out = np.full_like(eps, np.nan)

    def f():
        return float((el.reparam_forward(q, eps, axis)[0] * pz).sum())

    z, cache = el.reparam_forward(q, eps, axis, z_out=z_out)
    assert z is z_out
    dq = el.reparam_backward(pz, cache)
    assert rel_err(dq.ravel(), numeric_grad(f, q)) < TOL
    base = rng.standard_normal(dq.shape)
    into = base.copy()
    assert el.reparam_backward(pz, cache, dq=into) is into
    np.testing.assert_allclose(into, base + dq, rtol=1e-14)


@pytest.mark.parametrize("axis", [-1, 0])
def test_kl_of_many_glimpses_at_once(rng, axis):
    """kl_forward over a stacked (2Z, T, B) or (T, B, 2Z) q: gradients and the per-glimpse KL."""
    T, B, Z = 2, 3, 4
    q = rng.standard_normal((2 * Z, T, B) if axis == 0 else (T, B, 2 * Z))
    pkl = rng.standard_normal((T, B))

    def f():
        return float((el.kl_forward(q, axis)[0] * pkl).sum())

    kl, cache = el.kl_forward(q, axis)
    assert rel_err(el.kl_backward(pkl, cache).ravel(), numeric_grad(f, q)) < TOL
    assert rel_err(el.kl_backward(0.5, cache).ravel(),
                   numeric_grad(lambda: 0.5 * float(el.kl_forward(q, axis)[0].sum()), q)) < TOL
    for t in range(T):
        q_t = q[:, t].T if axis == 0 else q[t]                          # (B, 2Z)
        np.testing.assert_allclose(kl[t], latent_forward(q_t, np.zeros((B, Z)))[0][1], rtol=1e-13)


def test_kl_is_zero_at_the_prior():
    (_, kl), _ = latent_forward(np.zeros((2, 6)), np.ones((2, 3)))
    np.testing.assert_allclose(kl, 0.0, atol=1e-15)


def test_bce_gradients_and_stability(rng):
    B, D = 3, 7
    logits = 3 * rng.standard_normal((B, D))
    x = rng.random((B, D))
    w = rng.standard_normal(B)

    def f():
        return float((bce_forward(logits, x)[0] * w).sum())

    loss, cache = bce_forward(logits, x)
    assert rel_err(bce_backward(w, cache).ravel(), numeric_grad(f, logits)) < TOL
    p = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(loss, -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1), rtol=1e-10)
    # huge logits neither overflow nor lose the linear tail
    big, _ = bce_forward(np.array([[1000.0, -1000.0]]), np.array([[0.0, 1.0]]))
    np.testing.assert_allclose(big, [2000.0])


def test_layers_keep_float32(rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    W = rng.standard_normal((3, 8)).astype(np.float32)
    a, _ = linear_forward(x, W, np.zeros(8, np.float32))
    (h, c), cache = lstm_cell_forward(a, np.zeros((2, 2), np.float32))
    da, dc = lstm_cell_backward(h, c, cache)
    assert a.dtype == h.dtype == c.dtype == da.dtype == dc.dtype == np.float32
    (z, kl), lcache = latent_forward(a[:, :4], x[:, :2])
    assert z.dtype == kl.dtype == latent_backward(z, 1.0, lcache).dtype == np.float32
    loss, bcache = bce_forward(a, np.zeros_like(a))
    assert loss.dtype == bce_backward(1.0, bcache).dtype == np.float32


def test_inputs_are_not_modified(rng):
    a = rng.standard_normal((2, 8))
    c_prev = rng.standard_normal((2, 2))
    before = (a.copy(), c_prev.copy())
    (h, c), cache = lstm_cell_forward(a, c_prev)
    lstm_cell_backward(h, c, cache)
    np.testing.assert_array_equal(a, before[0])
    np.testing.assert_array_equal(c_prev, before[1])


def test_features_first_layout_is_the_transpose(rng):
    """The engine's axis=0 (features first, as it runs them) equals the plain (B, .) pairs,
    transposed."""
    B, Hd, Z = 3, 4, 2
    a, c_prev = rng.standard_normal((B, 4 * Hd)), rng.standard_normal((B, Hd))
    dh, dc = rng.standard_normal((B, Hd)), rng.standard_normal((B, Hd))
    (h, c), cache = lstm_cell_forward(a, c_prev)
    (hT, cT), cacheT = el.lstm_cell_forward(a.T, c_prev.T, axis=0)
    np.testing.assert_allclose(hT, h.T, rtol=1e-14)
    np.testing.assert_allclose(cT, c.T, rtol=1e-14)
    slot = np.full((Hd + 2, B), np.nan)[1:-1]                  # h written into a given view
    (h_into, _), _ = el.lstm_cell_forward(a.T, c_prev.T, axis=0, h_out=slot)
    assert h_into is slot
    np.testing.assert_array_equal(slot, hT)
    for got, want in zip(el.lstm_cell_backward(dh.T, dc.T, cacheT),
                         lstm_cell_backward(dh, dc, cache)):
        np.testing.assert_allclose(got, want.T, rtol=1e-14)
    q, eps = rng.standard_normal((B, 2 * Z)), rng.standard_normal((B, Z))
    dz, dkl = rng.standard_normal((B, Z)), rng.standard_normal(B)
    (z, kl), lcache = latent_forward(q, eps)
    (zT, klT), lcacheT = el.latent_forward(q.T, eps.T, axis=0)
    np.testing.assert_allclose(zT, z.T, rtol=1e-14)
    np.testing.assert_allclose(klT, kl, rtol=1e-14)
    np.testing.assert_allclose(el.latent_backward(dz.T, dkl, lcacheT),
                               latent_backward(dz, dkl, lcache).T, rtol=1e-14)


def _cell_inputs(rng, B, Hd, axis):
    """a (B, 4Hd), c_prev, dh, dc (B, Hd) for a cell test; features first when axis == 0."""
    a = rng.standard_normal((B, 4 * Hd)) * 3
    c_prev, dh, dc = (rng.standard_normal((B, Hd)) for _ in range(3))
    if axis == 0:
        return a.T.copy(), c_prev.T.copy(), dh.T.copy(), dc.T.copy()
    return a, c_prev, dh, dc


@pytest.mark.parametrize("axis", [-1, 0])
def test_lstm_numpy_path_equals_the_fused_kernels(rng, axis):
    """The engine's in-place NumPy path computes what the GPU's fused kernels compute."""
    from npdraw import layers
    B, Hd = 3, 5
    a, c_prev, dh, dc = _cell_inputs(rng, B, Hd, axis)
    (h, c), cache = el.lstm_cell_forward(a, c_prev, axis=axis)
    da, dc_prev = el.lstm_cell_backward(dh, dc, cache)
    blocks = el._blocks(a, Hd, 4, axis)
    i, f, o, g, c_ref, tanh_c, h_ref = layers._lstm_cell_kernel.unfused(*blocks, c_prev)
    np.testing.assert_allclose(h, h_ref, rtol=1e-13)
    np.testing.assert_allclose(c, c_ref, rtol=1e-13)
    ref = layers._lstm_cell_backward_kernel.unfused(dh, dc, i, f, o, g, c_prev, tanh_c)
    for got, want in zip(el._blocks(da, Hd, 4, axis), ref[:4]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dc_prev, ref[4], rtol=1e-13)


# ---------------------------------------------------------------- peephole LSTM cell

@pytest.mark.parametrize("axis", [-1, 0])
def test_peephole_lstm_cell_gradients(rng, axis):
    """da, dc_prev and dpeep of Graves 2013 eq 7-11, by centred differences, in both layouts."""
    B, Hd = 3, 4
    a = rng.standard_normal((B, 4 * Hd))
    c_prev = rng.standard_normal((B, Hd))
    peep = rng.standard_normal(3 * Hd)
    ph, pc = rng.standard_normal((B, Hd)), rng.standard_normal((B, Hd))
    if axis == 0:
        a, c_prev, ph, pc = a.T.copy(), c_prev.T.copy(), ph.T.copy(), pc.T.copy()

    def f():
        (h, c), _ = el.peephole_lstm_cell_forward(a, c_prev, peep, axis=axis)
        return float((h * ph).sum() + (c * pc).sum())

    _, cache = el.peephole_lstm_cell_forward(a, c_prev, peep, axis=axis)
    da, dc_prev, dpeep = el.peephole_lstm_cell_backward(ph, pc, cache)
    assert rel_err(da.ravel(), numeric_grad(f, a)) < TOL
    assert rel_err(dc_prev.ravel(), numeric_grad(f, c_prev)) < TOL
    assert rel_err(dpeep, numeric_grad(f, peep)) < TOL


def test_peephole_lstm_cell_equations(rng):
    """Input and forget gates see c_{t-1}, the output gate sees c_t (gates [i, f, o, g])."""
    B, Hd = 2, 3
    a, c_prev = rng.standard_normal((B, 4 * Hd)), rng.standard_normal((B, Hd))
    peep = rng.standard_normal(3 * Hd)
    p_i, p_f, p_o = peep[:Hd], peep[Hd:2 * Hd], peep[2 * Hd:]
    a_i, a_f, a_o, a_g = (a[:, k * Hd:(k + 1) * Hd] for k in range(4))

    def sig(v):
        return 1 / (1 + np.exp(-v))
    c = sig(a_f + p_f * c_prev) * c_prev + sig(a_i + p_i * c_prev) * np.tanh(a_g)
    h = sig(a_o + p_o * c) * np.tanh(c)
    (h_got, c_got), _ = peephole_lstm_cell_forward(a, c_prev, peep)
    np.testing.assert_allclose(c_got, c, rtol=1e-13)
    np.testing.assert_allclose(h_got, h, rtol=1e-13)


@pytest.mark.parametrize("axis", [-1, 0])
def test_zero_peepholes_are_the_plain_cell(rng, axis):
    """peep = 0: h, c, da and dc_prev equal the plain cell's (the function-preserving start)."""
    B, Hd = 3, 5
    a, c_prev, dh, dc = _cell_inputs(rng, B, Hd, axis)
    (h, c), cache = el.lstm_cell_forward(a, c_prev, axis=axis)
    da, dc_prev = el.lstm_cell_backward(dh, dc, cache)
    gates = np.empty_like(a)
    slot = np.empty_like(c_prev)
    (hp, cp), pcache = el.peephole_lstm_cell_forward(a, c_prev, np.zeros(3 * Hd), axis=axis,
                                                     gates_out=gates, h_out=slot)
    assert hp is slot
    dap, dcp, _ = el.peephole_lstm_cell_backward(dh, dc, pcache)
    for got, want in ((hp, h), (cp, c), (dap, da), (dcp, dc_prev)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("axis", [-1, 0])
def test_peephole_numpy_path_equals_the_fused_kernels(rng, axis):
    """The engine's in-place NumPy path of the peephole cell computes what its fused kernels do."""
    from npdraw import layers
    B, Hd = 3, 5
    a, c_prev, dh, dc = _cell_inputs(rng, B, Hd, axis)
    peep = rng.standard_normal(3 * Hd)
    peeps = el._peep_blocks(peep, Hd, axis)
    ref = layers._peephole_lstm_cell_kernel.unfused(*el._blocks(a, Hd, 4, axis), c_prev, *peeps)
    (h, c), cache = el.peephole_lstm_cell_forward(a, c_prev, peep, axis=axis, gates_out=a)
    np.testing.assert_allclose(h, ref[6], rtol=1e-13)
    np.testing.assert_allclose(c, ref[4], rtol=1e-13)
    da, dc_prev, _ = el.peephole_lstm_cell_backward(dh, dc, cache)
    want = layers._peephole_lstm_cell_backward_kernel.unfused(dh, dc, *ref[:4], c_prev, ref[5],
                                                              *peeps)
    for got, w in zip(el._blocks(da, Hd, 4, axis), want[:4]):
        np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dc_prev, want[4], rtol=1e-12, atol=1e-15)


def test_plain_and_engine_layers_agree(rng):
    """Each plain pair of npdraw.layers against its engine variant in the (B, .) layout:
    values and gradients (the plain ones are what the reference runs)."""
    from npdraw import layers
    B, Hs, Z = 3, 4, 2
    x, W = rng.standard_normal((B, 5)), rng.standard_normal((5, 4 * Hs))
    b = rng.standard_normal(4 * Hs)
    np.testing.assert_allclose(layers.linear_forward(x, W, b)[0], el.linear_forward(x, W, b)[0],
                               rtol=1e-14)
    a, c_prev, dh, dc = _cell_inputs(rng, B, Hs, -1)
    peep = rng.standard_normal(3 * Hs)
    pairs = ((layers.lstm_cell_forward, layers.lstm_cell_backward, el.lstm_cell_forward,
              el.lstm_cell_backward, ()),
             (layers.peephole_lstm_cell_forward, layers.peephole_lstm_cell_backward,
              el.peephole_lstm_cell_forward, el.peephole_lstm_cell_backward, (peep,)))
    for fwd, bwd, efwd, ebwd, extra in pairs:
        (h, c), cache = fwd(a, c_prev, *extra)
        (eh, ec), ecache = efwd(a, c_prev, *extra)
        np.testing.assert_allclose(h, eh, rtol=1e-13)
        np.testing.assert_allclose(c, ec, rtol=1e-13)
        for got, want in zip(bwd(dh, dc, cache), ebwd(dh, dc, ecache)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    q, eps = rng.standard_normal((B, 2 * Z)), rng.standard_normal((B, Z))
    dz, dkl = rng.standard_normal((B, Z)), rng.standard_normal(B)
    (z, kl), cache = layers.latent_forward(q, eps)
    (ez, ekl), ecache = el.latent_forward(q, eps)
    np.testing.assert_allclose(z, ez, rtol=1e-14)
    np.testing.assert_allclose(kl, ekl, rtol=1e-13)
    np.testing.assert_allclose(layers.latent_backward(dz, dkl, cache),
                               el.latent_backward(dz, dkl, ecache), rtol=1e-13)


def test_the_plain_layers_take_no_engine_options():
    """The plain pairs are the readable kind: no out=, axis= or *_out= options."""
    import inspect

    from npdraw import layers
    for name, fn in vars(layers).items():
        if name.endswith(("_forward", "_backward")) and callable(fn):
            params = set(inspect.signature(fn).parameters)
            assert not params & {"out", "axis", "gates_out", "h_out", "z_out", "dq"}, name


def test_plain_peephole_lstm_cell_gradients(rng):
    """The plain peephole pair (the reference's): da, dc_prev and dpeep by centred differences."""
    B, Hs = 3, 4
    a, c_prev = rng.standard_normal((B, 4 * Hs)), rng.standard_normal((B, Hs))
    peep = rng.standard_normal(3 * Hs)
    ph, pc = rng.standard_normal((B, Hs)), rng.standard_normal((B, Hs))

    def f():
        (h, c), _ = peephole_lstm_cell_forward(a, c_prev, peep)
        return float((h * ph).sum() + (c * pc).sum())

    _, cache = peephole_lstm_cell_forward(a, c_prev, peep)
    da, dc_prev, dpeep = peephole_lstm_cell_backward(ph, pc, cache)
    assert rel_err(da.ravel(), numeric_grad(f, a)) < TOL
    assert rel_err(dc_prev.ravel(), numeric_grad(f, c_prev)) < TOL
    assert rel_err(dpeep, numeric_grad(f, peep)) < TOL


def test_plain_reparam_and_kl_gradients(rng):
    """The plain reparam and KL pairs by centred differences; the KL over stacked (T, B, 2Z)."""
    B, T, Z = 3, 2, 4
    q, eps, pz = rng.standard_normal((B, 2 * Z)), rng.standard_normal((B, Z)), rng.standard_normal((B, Z))
    _, cache = reparam_forward(q, eps)
    assert rel_err(reparam_backward(pz, cache).ravel(),
                   numeric_grad(lambda: float((reparam_forward(q, eps)[0] * pz).sum()), q)) < TOL
    qs, pkl = rng.standard_normal((T, B, 2 * Z)), rng.standard_normal((T, B))
    _, kcache = kl_forward(qs)
    assert rel_err(kl_backward(pkl, kcache).ravel(),
                   numeric_grad(lambda: float((kl_forward(qs)[0] * pkl).sum()), qs)) < TOL
