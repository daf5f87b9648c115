"""bench/gemm_shapes.py: its list of a step's GEMMs is the engine's, and its command runs.

No timing is asserted (the machine is shared)."""
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # bench/ is not part of the installed package
    sys.path.insert(0, str(REPO_ROOT))

import npdraw  # noqa: E402

from bench import gemm_shapes, profile_step, run as bench_run  # noqa: E402


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "no-attention"])
def test_the_listed_gemms_are_the_ones_a_step_runs(attention):
    """The FLOPs of step_gemms equal those of the matmuls a counted step records in its GEMM
    category, less the few that are not per glimpse or per weight: with attention the first
    read window's three (B x Hd x 5 each), without it x's projection onto enc_W's rows and
    their gradient (B x D x 4He each)."""
    B = 6
    cfg = npdraw.DrawConfig(T=3, enc_dim=12, dec_dim=10, z_dim=4, attention=attention)
    params = npdraw.init_params(cfg, 0, dtype="float64")
    x, eps = bench_run.make_inputs(cfg, B, 0, "float64")
    runner = bench_run.NpdrawRunner(npdraw, cfg, params, x, eps, "cpu")
    runner.step()
    counted = profile_step.count_step(runner).flops["gemm"]
    shapes = gemm_shapes.step_gemms(cfg, B)
    listed = cfg.T * sum(2 * m * k * n for m, k, n in shapes["glimpse"]) + \
        sum(2 * m * k * n for m, k, n in shapes["weights"])
    others = 3 * 2 * B * cfg.dec_dim * 5 if attention else 2 * 2 * B * cfg.D * 4 * cfg.enc_dim
    assert counted == listed + others


def test_the_command_gives_a_row_per_batch(capsys):
    assert gemm_shapes.main(["--per-rank", "2", "--per-rank", "3", "--reps", "1",
                             "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [row["per_rank"] for row in r["rows"]] == [2, 3]
    cfg = npdraw.DrawConfig()
    for row in r["rows"]:
        shapes = gemm_shapes.step_gemms(cfg, row["per_rank"])
        assert row["step_gemm_gflop"] * 1e9 == pytest.approx(
            cfg.T * sum(2 * m * k * n for m, k, n in shapes["glimpse"])
            + sum(2 * m * k * n for m, k, n in shapes["weights"]))
        assert row["step_gemm_ms"] > 0 and row["core_peak_fraction"] > 0
    assert gemm_shapes.main(["--per-rank", "2", "--reps", "1"]) == 0
    assert "per rank" in capsys.readouterr().out


def test_bad_sizes_are_refused():
    with pytest.raises(SystemExit) as stop:
        gemm_shapes.main(["--per-rank", "0"])
    assert stop.value.code == 2
