"""bench/profile_step.py: its categories add up to the step, its byte counts follow
their stated definition, and it leaves npdraw as it found it.

No timing is asserted (the machine is shared); only signs and sums of times.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # bench/ is not part of the installed package
    sys.path.insert(0, str(REPO_ROOT))

import npdraw  # noqa: E402
from npdraw import distributed  # noqa: E402

from bench import profile_step, run as bench_run  # noqa: E402

KEYS = [key for key, _ in profile_step.CATEGORIES]
TINY_CLI = ["--T", "2", "--steps", "1", "--warmup", "0", "--gemm-n", "64", "--gemm-reps", "1",
            "--threads", "1"]


def _runner(attention, dtype="float64", B=8):
    cfg = npdraw.DrawConfig(T=2, enc_dim=16, dec_dim=16, z_dim=4, attention=attention)
    params = npdraw.init_params(cfg, 0, dtype=dtype)
    x, eps = bench_run.make_inputs(cfg, B, 0, dtype)
    return bench_run.NpdrawRunner(npdraw, cfg, params, x, eps, "cpu")


@pytest.fixture
def one_thread():
    restore = bench_run.set_threads(1, torch_too=False)   # steadier on a loaded machine
    yield
    restore()


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "no-attention"])
def test_categories_sum_to_the_step_and_npdraw_is_left_as_it_was(attention, one_thread):
    profiled, plain = _runner(attention), _runner(attention)
    targets = profile_step._targets(profiled)
    before = [getattr(owner, name) for owner, name, _ in targets]
    makers = [getattr(np, name) for name in profile_step._MAKERS + ("ascontiguousarray",)]

    r = profile_step.profile_runner(profiled, steps=2, warmup=1)

    # the same steps unprofiled give the same parameters, to the bit
    for _ in range(r["steps_run"]):
        plain.step()
    for name in plain.params:
        assert np.array_equal(profiled.params[name], plain.params[name]), name
        assert type(profiled.params[name]) is np.ndarray, name
    assert [getattr(owner, name) for owner, name, _ in targets] == before
    assert "reduce_step" not in vars(profiled.comm)          # the instance's wrapper is gone
    assert [getattr(np, name) for name in profile_step._MAKERS + ("ascontiguousarray",)] == makers
    assert profile_step._ACTIVE is None

    cats = r["categories"]
    assert list(cats) == KEYS
    for key, cat in cats.items():
        assert cat["ms"] >= 0, key
        assert cat["bytes"] >= 0 and cat["ops"] >= 0 and cat["passes"] >= 0, key
        assert (cat["bytes"] > 0) == (cat["ops"] > 0), key
    total = sum(cat["ms"] for cat in cats.values())
    assert abs(total - r["step_ms_profiled"]) <= 1e-9 * r["step_ms_profiled"]
    # every category that the model has does NumPy work; one process has no allreduce
    for key in ("gemm", "lstm", "error_image", "latent", "loss", "weight_layout",
                "input_check", "clip_adam"):
        assert cats[key]["ops"] > 0, key
    assert (cats["filterbank"]["ops"] > 0) == attention
    assert cats["allreduce"]["ops"] == 0
    assert cats["rank_wait"]["ms"] == 0 and cats["rank_wait"]["ops"] == 0     # no other ranks
    assert r["allreduce_bare_ms"] == [] and r["allreduce_call_ms"] == 0
    # the counted matmuls are the model's GEMMs: count_flops, less what the engine skips
    # without attention (x's rows of enc_W: projected once, no input gradient), plus a
    # little (the bias rows of the stacked GEMMs, the filterbank's row sums)
    cfg = profiled.cfg
    skipped = 0 if attention else 2 * 8 * cfg.D * 4 * cfg.enc_dim * (3 * cfg.T - 2)
    counted = sum(cat["gemm_flops"] for cat in cats.values())
    assert 1 <= counted / (bench_run.count_flops(cfg, 8) - skipped) <= 1.05
    assert r["inline_gemms"] == (23 if attention else 20)
    assert r["activation_bytes"] > 0 and r["engine_body_ms"] >= r["gemm_replay_ms"] > 0


def test_bytes_follow_the_definition():
    """Each operation charges its distinct operand bytes read and written; views and
    new empty buffers charge nothing; a matmul its 2mnk FLOPs."""
    profile = profile_step._Profile()
    with profile_step._Wrapped(profile, [], counting=True):
        a = np.zeros(10)                          # a new buffer: nothing
        b = a * 2.0                               # 80 read + 80 written
        a[:5] = b[:5]                             # 40 + 40
        np.multiply(b, b, out=b)                  # b read once, written: 80 + 80
        c = np.concatenate([a, b])                # 160 + 160
        c.reshape(4, 5).T                         # a view: nothing
        m = np.ones((3, 4)) @ np.ones((4, 5))     # (12 + 20 + 15) * 8, 2*3*4*5 FLOPs
    assert profile.ops["unattributed"] == 5
    assert profile.bytes["unattributed"] == 160 + 80 + 160 + 320 + 47 * 8
    assert profile.flops["unattributed"] == 120
    assert type(c) is profile_step._Counted and m.shape == (3, 5)
    assert profile_step._ACTIVE is None and np.zeros(1).__class__ is np.ndarray


def test_gemm_replay_reproduces_layout_and_aliasing():
    base = np.arange(24.0).reshape(4, 6)
    w = np.ones((6, 3))
    specs = [([profile_step._layout(base[:, 1:5]), profile_step._layout(w[1:5])], None),
             ([profile_step._layout(base.T), profile_step._layout(base)],
              profile_step._layout(np.empty((6, 6))))]
    replay = profile_step.gemm_replay(specs)
    replay()                                      # runs the recorded shapes, strided as they were
    root, offset, shape, strides = specs[0][0][0]
    assert root is base.base and (offset, shape, strides) == (8, (4, 4), (48, 8))
    assert specs[1][0][0][0] is specs[1][0][1][0] is root
    assert replay.buffers == 3                    # one per owner: base's, w, the output


def test_cli_text_and_json(capsys):
    assert profile_step.main(TINY_CLI + ["--batch", "4", "--batch", "8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [(e["model"], e["batch"]) for e in r["profiles"]] == [("attention", 4), ("attention", 8)]
    assert r["settings"]["ranks"] == 1 and r["gemm"]["peak_gflops"] > 0
    for e in r["profiles"]:
        assert list(e["categories"]) == KEYS
        wait = e["categories"]["rank_wait"]
        assert wait["ms"] == 0 and wait["ops"] == 0 and wait["bytes"] == 0
        assert e["allreduce_bare_ms"] == [] and e["allreduce_bare_median_ms"] is None
        assert e["step_peak_fraction"] > 0 and e["flops_per_step"] == bench_run.count_flops(
            npdraw.DrawConfig(T=2), e["batch"])
    assert profile_step.main(TINY_CLI + ["--batch", "4", "--model", "no-attention"]) == 0
    out = capsys.readouterr().out
    assert "[no-attention, batch 4]" in out and "GEMM peak" in out and "of peak" in out
    for _key, label in profile_step.CATEGORIES:
        assert label in out
    assert out.count("n/a (one process)") == 2       # allreduce and the wait for the ranks
    assert profile_step.main(TINY_CLI + ["--batch", "4", "--markdown"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("**attention, batch 4**") and table[2].startswith("| category |")
    assert len(table) == 4 + len(KEYS) and all(row.count("|") == 7 for row in table[2:])


def test_cli_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        profile_step.main(["--batch", "0"])


def test_split_allreduce_adds_up_and_never_goes_negative():
    assert profile_step.split_allreduce(10.0, 1.5) == (1.5, 8.5)
    assert profile_step.split_allreduce(1.0, 1.5) == (1.0, 0.0)    # noise: no wait
    assert profile_step.split_allreduce(0.0, 0.0) == (0.0, 0.0)


def test_profile_under_two_ranks():
    """--ranks 2 starts two MPI ranks; rank 0's allreduce charges its packing of every
    gradient and the in-place Allreduce of the flat buffer; its call's time in the step is
    split into the bare all-reduce (timed with the ranks lined up) and the wait."""
    assert distributed.mpi_available(), "the ranks need pip install -e \".[mpi]\" (the README's)"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "profile_step.py"),
                             *TINY_CLI, "--batch", "8", "--ranks", "2", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)                  # rank 0 alone prints
    assert r["settings"]["ranks"] == 2
    allreduce = r["profiles"][0]["categories"]["allreduce"]
    n_params = len(npdraw.init_params(npdraw.DrawConfig(T=2), 0))
    assert allreduce["ms"] > 0 and allreduce["ops"] >= n_params + 1
    e = r["profiles"][0]
    cats = e["categories"]
    assert list(cats) == KEYS
    wait = cats["rank_wait"]
    assert wait["ms"] >= 0 and wait["ops"] == 0 and wait["bytes"] == 0
    assert all(cat["ms"] >= 0 for key, cat in cats.items() if key != "unattributed")
    total = sum(cat["ms"] for cat in cats.values())
    assert abs(total - e["step_ms_profiled"]) <= 1e-9 * e["step_ms_profiled"]
    # the bare all-reduces: max(steps, BARE_REPEATS) of them, each taking time; the call's
    # time in the step is the bare median (at most) plus the wait
    bare = e["allreduce_bare_ms"]
    assert len(bare) == max(1, profile_step.BARE_REPEATS) and min(bare) > 0
    assert e["allreduce_bare_median_ms"] == pytest.approx(float(np.median(bare)))
    assert e["allreduce_call_ms"] > 0
    assert wait["ms"] == pytest.approx(max(0.0, e["allreduce_call_ms"] - np.median(bare)))
    assert allreduce["ms"] >= min(e["allreduce_call_ms"], np.median(bare))
    report = profile_step.format_report(r)
    assert "waiting for the other ranks" in report and "the all-reduce call took" in report
    assert "n/a" not in report
    # rank 0's GEMMs against its share of peak
    assert e["gemm_peak_fraction"] == pytest.approx(e["gemm_gflops"] / (r["gemm"]["peak_gflops"] / 2))
    assert "rank 0 of 2 MPI ranks" in profile_step.format_report(r)
