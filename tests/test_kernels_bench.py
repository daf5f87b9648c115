"""bench/kernels.py: npdraw's step on NumPy's and Numba's kernels, side by side.

No timing is asserted (the machine is shared): only that both ran, in turns, agreed, and
that a disagreement is reported."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # bench/ is not part of the installed package
    sys.path.insert(0, str(REPO_ROOT))

from npdraw import distributed, engine_layers  # noqa: E402

from bench import kernels  # noqa: E402
from test_distributed import signal_once_ranks_run  # noqa: E402

TINY = ["--glimpses", "2", "--batch", "6", "--rounds", "3"]


def test_both_kernels_run_in_turns_and_agree(capsys, monkeypatch):
    calls = []
    real = engine_layers.set_kernels
    monkeypatch.setattr(engine_layers, "set_kernels", lambda k: (calls.append(k), real(k)))
    assert kernels.main([*TINY, "--ranks", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["agree"] and r["loss_rel_diff"] < kernels.LOSS_RTOL
    assert all(len(r["ms"][k]) == 3 and min(r["ms"][k]) > 0 for k in kernels.KINDS)
    assert r["ratio_medians"] > 0 and r["ratio_paired_median"] > 0
    # the availability probe, the check's two steps, then turns NumPy Numba / Numba NumPy
    # (each set before its untimed and timed steps), and NumPy's again at the end
    assert calls == ["numba", "numpy", "numpy", "numba", "numpy", "numba", "numba", "numpy",
                     "numpy", "numba", "numpy"]
    assert engine_layers.kernels() == "numpy"


def test_a_disagreement_is_reported_with_exit_1(capsys, monkeypatch):
    monkeypatch.setattr(kernels, "LOSS_RTOL", 0.0)       # no difference passes 0 < 0
    assert kernels.main([*TINY, "--ranks", "1"]) == 1
    assert "DISAGREE" in capsys.readouterr().out


def test_under_two_ranks():
    """--ranks 2 starts two MPI ranks that switch kernels and step together."""
    assert distributed.mpi_available(), "the ranks need pip install -e \".[mpi]\" (the README's)"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "kernels.py"), *TINY,
                           "--ranks", "2", "--json"], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["settings"]["ranks"] == 2 and r["agree"]
    assert all(len(r["ms"][k]) == 3 for k in kernels.KINDS)


def test_without_numba_it_says_so_in_one_sentence(capsys, monkeypatch):
    def refuse(name):
        if name == "numba":
            raise ValueError("set_kernels('numba') asks for Numba kernels, but numba cannot "
                             "be imported (No module named numba); install it with: pip "
                             "install numba")
    monkeypatch.setattr(engine_layers, "set_kernels", refuse)
    assert kernels.main(TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: set_kernels('numba') asks for Numba kernels, but numba cannot be "
                   "imported (No module named numba); install it with: pip install numba"]


def _ranks_below(root: int) -> int:
    """How many processes below ``root`` run bench/kernels.py (the ranks; not mpiexec)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path("/proc", pid, "cmdline").read_bytes().split(b"\0")
            if b"kernels.py" not in b" ".join(argv) or b"mpiexec" in argv[0]:
                continue
            parent = int(pid)
            for _ in range(5):
                parent = int(Path("/proc", str(parent), "stat").read_text().rsplit(")", 1)[1]
                             .split()[1])
                if parent == root:
                    count += 1
                    break
        except (OSError, ValueError, IndexError):
            continue
    return count


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_ranks_at_once(signum):
    """Under two ranks a Ctrl-C or SIGTERM was noted by every rank and never acted on:
    the benchmark ran on to its end and exited 0. Now it ends at once, 128 + the signal,
    one "interrupted" and no traceback (bench/profile_step.py and bench/run.py start their
    ranks the same way)."""
    assert distributed.mpi_available(), "the ranks need pip install -e \".[mpi]\" (the README's)"
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "bench" / "kernels.py"),
                             "--glimpses", "2", "--batch", "6", "--rounds", "1000000",
                             "--ranks", "2"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, took = signal_once_ranks_run(proc, signum, lambda: _ranks_below(proc.pid) >= 2,
                                         settle=3.0)     # past their imports, into the turns
    assert proc.returncode == 128 + signum, output
    assert took < 15, took
    # one sentence: rank 0's "interrupted", or the launcher's when the ranks' abort won
    # the race ("interrupted (SIGTERM); the ranks ended before they could stop together")
    assert len([line for line in output.splitlines() if line.startswith("interrupted")]) == 1, \
        output
    assert "Traceback" not in output and "BAD TERMINATION" not in output, output
