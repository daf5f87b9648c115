"""Shared fixtures. The real binarized MNIST comes from the project's offline mirror.

The mirror is ../shared/data/binarized_mnist next to the repository (as laid out for
developers and CI), or the folder named by NPDRAW_TEST_MIRROR. If it is missing the
tests that need it fail rather than skip: real data is part of what they check.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _mirror_dir() -> Path:
    env = os.environ.get("NPDRAW_TEST_MIRROR")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data" / "binarized_mnist"


@pytest.fixture(scope="session")
def bmnist_mirror() -> Path:
    """Folder holding binarized_mnist_{train,valid,test}.amat.gz (read-only)."""
    path = _mirror_dir()
    names = [f"binarized_mnist_{s}.amat.gz" for s in ("train", "valid", "test")]
    missing = [n for n in names if not (path / n).exists()]
    if missing:
        pytest.fail(f"binarized MNIST mirror not found at {path} (missing {missing}); "
                    "set NPDRAW_TEST_MIRROR to the folder holding the .amat.gz files")
    return path


@pytest.fixture(scope="session")
def bmnist_data_dir(bmnist_mirror, tmp_path_factory):
    """The mirror converted once per session into a data dir (test_train, test_cli)."""
    from npdraw.data import load_splits
    path = tmp_path_factory.getbasetemp() / "npdraw-bmnist-data"
    load_splits("bmnist", data_dir=str(path), mirror=str(bmnist_mirror), progress=False)
    return path


@pytest.fixture(scope="session")
def bmnist(bmnist_data_dir, bmnist_mirror):
    """The binarized MNIST splits (DataSplits), loaded once per session."""
    from npdraw.data import load_splits
    return load_splits("bmnist", data_dir=str(bmnist_data_dir), mirror=str(bmnist_mirror),
                       progress=False)


@pytest.fixture
def as_if_on_gpu(monkeypatch):
    """Make npdraw take its GPU branches on NumPy arrays: every module's
    get_array_module returns an array module that has NumPy's functions but is not
    numpy itself. Checks the generic code (fused kernels, assignments into views,
    device-side sums) on a machine without a GPU."""
    import types

    import numpy as np

    from npdraw import engine, engine_attention, engine_layers, layers, model, optim
    from npdraw.reference import attention, draw
    generic = types.ModuleType("generic_xp")
    generic.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    generic.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0))
    for module in (attention, draw, engine, engine_attention, engine_layers, layers, model, optim):
        monkeypatch.setattr(module, "get_array_module", lambda *arrays: generic)
    return generic


@pytest.fixture(scope="session")
def labelled_mnist_mirror() -> Path:
    """Folder holding the labelled grey MNIST IDX files (npm10k and t10k; read-only):
    ../shared/data/mnist next to the repository, or NPDRAW_TEST_LABELLED_MIRROR."""
    env = os.environ.get("NPDRAW_TEST_LABELLED_MIRROR")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "mnist"
    names = [f"{s}-{k}-idx{d}-ubyte.gz" for s in ("npm10k", "t10k")
             for k, d in (("images", 3), ("labels", 1))]
    missing = [n for n in names if not (path / n).exists()]
    if missing:
        pytest.fail(f"labelled MNIST mirror not found at {path} (missing {missing}); set "
                    "NPDRAW_TEST_LABELLED_MIRROR to the folder holding the IDX files")
    return path
