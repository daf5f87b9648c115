"""The wheel: built from the package's files, installed (not editable) into a fresh
virtual environment, and the npdraw command run from outside the repository: --version,
--help, and a tiny train, sample and evaluate on the real binarized MNIST. Offline: the
build uses the setuptools already installed, the venv sees this Python's packages (numpy,
h5py, ...) but imports npdraw from its own site-packages."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import npdraw
from conftest import REPO_ROOT

TINY = ["--niter", "3", "--attention", "2,3", "--enc-dim", "8", "--dec-dim", "8", "--z-dim",
        "2", "--bs", "50", "--subset", "100", "--eval-subset", "100", "--device", "cpu",
        "--ranks", "1", "--no-progress"]


def _run(argv, cwd, env, timeout=120):
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """-> (the venv's bin folder, the environment to run it in); the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"           # the package's files only: no build/ in the repo
    shutil.copytree(REPO_ROOT / "npdraw", source / "npdraw",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INDEX"] = "1"          # never the network
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", root / "dist", source], root, env, timeout=180)
    wheels = list((root / "dist").glob("npdraw-*.whl"))
    assert [w.name for w in wheels] == [f"npdraw-{npdraw.__version__}-py3-none-any.whl"]
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
          root / "venv"], root, env)
    bin_dir = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
    _run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--no-deps",
          "-q", wheels[0]], root, env, timeout=180)
    return root, bin_dir, env


def test_the_wheel_holds_every_subpackage_and_imports_from_the_venv(venv):
    root, bin_dir, env = venv
    script = "import npdraw, npdraw.reference, npdraw.cli; print(npdraw.__file__)"
    where = _run([bin_dir / "python", "-c", script], root, env).stdout.strip()
    assert Path(where).resolve().is_relative_to((root / "venv").resolve())


def test_the_npdraw_command_trains_samples_evaluates_reconstructs_and_plots_outside_the_repo(
        venv, bmnist_data_dir, bmnist_mirror):
    root, bin_dir, env = venv
    npdraw_cmd = bin_dir / "npdraw"
    work = root / "elsewhere"
    work.mkdir()
    version = _run([npdraw_cmd, "--version"], work, env).stdout
    assert version == f"npdraw, version {npdraw.__version__}\n"
    helped = _run([npdraw_cmd, "--help"], work, env).stdout
    for command in ("train", "sample", "evaluate", "reconstruct", "export", "plot", "classify"):
        assert command in helped
    assert "bench" not in helped       # bench/run.py is the repository's, not the wheel's
    data = ["--data-dir", bmnist_data_dir, "--mirror", bmnist_mirror]
    _run([npdraw_cmd, "train", *TINY, *data, "--epochs", "1", "--name", "tiny", "--out",
          "runs"], work, env)
    run = work / "runs" / "tiny"
    assert (run / "best.h5").is_file()
    _run([npdraw_cmd, "sample", run / "best.h5", "--rows", "2", "--cols", "2", "--device",
          "cpu"], work, env)
    assert (run / "samples" / "samples.gif").is_file()
    result = _run([bin_dir / "python", "-m", "npdraw", "evaluate", run, "--subset", "50",
                   "--ranks", "1", "--device", "cpu", "--json"], work, env)
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == 50
    _run([npdraw_cmd, "reconstruct", run / "best.h5", "--n", "2", "--device", "cpu",
          "--out", "rebuilt"], work, env)
    assert (work / "rebuilt" / "reconstruct.gif").is_file()
    _run([npdraw_cmd, "plot", run], work, env)
    assert (run / "learning_curves.png").is_file() and (run / "learning_curves.pdf").is_file()
