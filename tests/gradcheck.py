"""Centred finite differences in float64, and the project's relative error.

rel_err(a, b) = max|a - b| / max(1e-8, max(|a| + |b|)): the largest absolute
disagreement, measured against the scale of the gradients being compared.
"""
import numpy as np

STEP = 1e-5  # roundoff (~1e-16 * |f| / STEP) and truncation (~STEP^2) balance near here


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-8, float(np.max(np.abs(a) + np.abs(b)))))


def numeric_grad(f, array, indices=None, step=STEP):
    """d f() / d array at the given flat indices (all by default), by centred differences.

    f takes no arguments and reads `array`, which is perturbed in place and restored.
    """
    flat = array.reshape(-1)
    indices = range(flat.size) if indices is None else indices
    out = []
    for i in indices:
        old = flat[i]
        flat[i] = old + step
        up = f()
        flat[i] = old - step
        down = f()
        flat[i] = old
        out.append((up - down) / (2 * step))
    return np.array(out)


def sample_indices(size, count, rng):
    """All indices of a small array, else `count` distinct random ones."""
    if size <= count:
        return np.arange(size)
    return rng.choice(size, size=count, replace=False)
