"""Adam and global-norm clipping against hand-computed values."""
import math

import numpy as np
import pytest

from npdraw.optim import adam_init, adam_step, clip_by_global_norm, clip_scale, global_norm


def _hand_adam(p, gs, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Scalar-by-scalar Adam in plain python floats, for reference."""
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    steps = []
    for t, g in enumerate(gs, start=1):
        upd = []
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            mh = m[i] / (1 - b1 ** t)
            vh = v[i] / (1 - b2 ** t)
            d = -lr * mh / (math.sqrt(vh) + eps)
            p[i] += d
            upd.append(d)
        steps.append(math.sqrt(sum(d * d for d in upd)))
    return p, m, v, steps


def test_two_step_adam_matches_hand_computation():
    params = {"w": np.array([[1.0, -2.0], [0.5, 3.0]]), "b": np.array([0.25])}
    g1 = {"w": np.array([[0.1, -0.3], [2.0, 0.0]]), "b": np.array([-1.5])}
    g2 = {"w": np.array([[-0.2, 0.4], [1.0, 5.0]]), "b": np.array([0.7])}
    lr = 0.01
    state = adam_init(params)
    p1, state, s1 = adam_step(params, g1, state, lr)
    p2, state, s2 = adam_step(p1, g2, state, lr)
    assert state["step"] == 2

    flat = lambda d: np.concatenate([d["w"].ravel(), d["b"].ravel()])
    ref_p, ref_m, ref_v, ref_steps = _hand_adam(flat(params), [flat(g1), flat(g2)], lr)
    np.testing.assert_allclose(flat(p2), ref_p, rtol=0, atol=1e-14)
    np.testing.assert_allclose(flat(state["m"]), ref_m, rtol=1e-14)
    np.testing.assert_allclose(flat(state["v"]), ref_v, rtol=1e-14)
    np.testing.assert_allclose([s1, s2], ref_steps, rtol=1e-12)
    # First Adam step moves every coordinate with nonzero gradient by ~lr.
    np.testing.assert_allclose(np.abs(flat(p1) - flat(params))[flat(g1) != 0], lr, rtol=1e-5)


def test_adam_does_not_modify_caller_params():
    params = {"w": np.ones((3, 2))}
    before = params["w"].copy()
    new, _, _ = adam_step(params, {"w": np.full((3, 2), 0.5)}, adam_init(params), 0.1)
    assert np.array_equal(params["w"], before)
    assert new["w"] is not params["w"]
    assert not np.array_equal(new["w"], before)


def test_adam_step_leaves_every_input_untouched():
    """adam_step is pure: params, grads and the whole state (m, v, step) are as they were,
    and the new state shares no array with the old one."""
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(2)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    state = adam_init(params)
    _, state, _ = adam_step(params, grads, state, 0.1)          # moments no longer zero
    copies = [{k: a.copy() for k, a in d.items()} for d in (params, grads, state["m"], state["v"])]
    new_params, new_state, _ = adam_step(params, grads, state, 0.1)
    for before, after in zip(copies, (params, grads, state["m"], state["v"])):
        for k in before:
            assert np.array_equal(before[k], after[k]), k
    assert state["step"] == 1 and new_state["step"] == 2
    for k in params:
        assert new_params[k] is not params[k]
        assert new_state["m"][k] is not state["m"][k] and new_state["v"][k] is not state["v"][k]
        assert not np.array_equal(new_state["m"][k], state["m"][k])


def test_a_loop_that_ignores_the_return_value_trains_nothing_and_a_loop_that_uses_it_trains():
    """The PyTorch habit (call the step, keep the old names) leaves the parameters and the
    state exactly where they were, so the misuse is plain at once; the intended loop
    minimises ||p - target||^2."""
    target = np.array([3.0, -2.0])
    start = {"p": np.zeros(2)}
    params, state = start, adam_init(start)
    for _ in range(50):
        adam_step(params, {"p": 2 * (params["p"] - target)}, state, 0.1)
    assert np.array_equal(params["p"], np.zeros(2)) and state["step"] == 0
    for _ in range(300):
        params, state, _ = adam_step(params, {"p": 2 * (params["p"] - target)}, state, 0.1)
    assert state["step"] == 300
    np.testing.assert_allclose(params["p"], target, atol=0.05)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_kept(dtype):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((4, 3)).astype(dtype), "b": np.zeros(3, dtype)}
    grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
    clipped, norm = clip_by_global_norm(grads, 0.5)
    assert isinstance(norm, float)
    assert all(clipped[k].dtype == dtype for k in grads)
    state = adam_init(params)
    new, state, step_norm = adam_step(params, clipped, state, 1e-3)
    assert isinstance(step_norm, float) and step_norm > 0
    for k in params:
        assert new[k].dtype == dtype
        assert state["m"][k].dtype == dtype and state["v"][k].dtype == dtype


def test_global_norm():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0, 0.0]])}
    assert global_norm(grads) == pytest.approx(5.0)
    assert global_norm({"a": np.zeros(3, np.float32)}) == 0.0


def test_clip_scales_and_leaves_inputs_untouched():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([4.0])}
    copies = {k: v.copy() for k, v in grads.items()}
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(clipped["a"], copies["a"] * scale, rtol=1e-15)
    np.testing.assert_allclose(clipped["b"], copies["b"] * scale, rtol=1e-15)
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    for k in grads:
        assert np.array_equal(grads[k], copies[k])
        assert clipped[k] is not grads[k]


def test_clip_below_threshold_is_identity():
    grads = {"a": np.array([0.3, 0.4])}
    clipped, norm = clip_by_global_norm(grads, 10.0)
    assert norm == pytest.approx(0.5)
    assert np.array_equal(clipped["a"], grads["a"])
    assert clipped["a"] is not grads["a"]


def test_key_mismatch_names_keys():
    params = {"w": np.zeros(2), "b": np.zeros(1)}
    with pytest.raises(ValueError, match=r"'b'.*'c'|'c'.*'b'"):
        adam_step(params, {"w": np.zeros(2), "c": np.zeros(1)}, adam_init(params), 0.1)


def test_shape_mismatch_names_key():
    params = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="'w'"):
        adam_step(params, {"w": np.zeros(3)}, adam_init(params), 0.1)


def test_bad_max_norm():
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm({"a": np.ones(2)}, 0.0)


def test_grad_scale_is_adam_on_clipped_gradients():
    """adam_step(grad_scale=clip_scale(...)) is the same update as Adam on clipped gradients."""
    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal((70000,)), "b": rng.standard_normal((3, 2))}
    state_a, state_b = adam_init(params), adam_init(params)
    pa = pb = params
    for _ in range(3):
        grads = {k: 5 * rng.standard_normal(v.shape) for k, v in params.items()}
        clipped, norm = clip_by_global_norm(grads, 2.0)
        assert norm == pytest.approx(math.sqrt(sum(float((g * g).sum()) for g in grads.values())),
                                     rel=1e-13)             # chunked sum over 70,000 values
        pa, state_a, sa = adam_step(pa, clipped, state_a, 1e-2)
        pb, state_b, sb = adam_step(pb, grads, state_b, 1e-2, grad_scale=clip_scale(norm, 2.0))
        assert sa == pytest.approx(sb, rel=1e-12)
    for k in params:
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(state_b["m"][k], state_a["m"][k], rtol=1e-12, atol=1e-15)
    assert clip_scale(1.0, 10.0) == 1.0 and clip_scale(20.0, 10.0) == pytest.approx(0.5)


def test_generic_path_equals_the_numpy_one(request):
    """global_norm and Adam as a GPU runs them (device-side sums, one conversion at the
    end; conftest's as_if_on_gpu) give the NumPy path's results."""
    rng = np.random.default_rng(7)
    params = {"a": rng.standard_normal((70000,)).astype(np.float32),
              "b": rng.standard_normal((3, 4)).astype(np.float32)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    norm = global_norm(grads)
    new, _, step_norm = adam_step(params, grads, adam_init(params), 1e-3, grad_scale=0.5)
    request.getfixturevalue("as_if_on_gpu")
    assert global_norm(grads) == pytest.approx(norm, rel=1e-12)
    new_g, _, step_norm_g = adam_step(params, grads, adam_init(params), 1e-3, grad_scale=0.5)
    assert step_norm_g == pytest.approx(step_norm, rel=1e-12)
    for name in params:
        np.testing.assert_array_equal(new_g[name], new[name])
