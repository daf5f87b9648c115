"""The benchmark: its FLOP count, an end-to-end tiny run, and the PyTorch peer's agreement.

No timing is asserted here; the machine is shared and timings are noise. The
peer tests need torch, from the `bench` extra that the README's install command
brings; the benchmark itself repeats the agreement check before printing any ratio.
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
from npdraw import backend, distributed  # noqa: E402

from bench import run as bench_run  # noqa: E402

TINY = ["--T", "2", "--batch", "4", "--steps", "1", "--warmup", "0",
        "--gemm-n", "64", "--gemm-reps", "1", "--settle", "0"]


def _cfg(attention, **kw):
    base = dict(height=3, width=4, channels=2, T=2, read_n=2, write_n=3,
                enc_dim=5, dec_dim=6, z_dim=7, attention=attention)
    base.update(kw)
    return npdraw.DrawConfig(**base)


# ------------------------------------------------------------------ FLOP count

def test_count_flops_hand_count_with_attention():
    # D=24, read_dim=2*2*2^2=16, write_dim=2*3^2=18; per glimpse, batch 1:
    #   encoder 2*(16+6+5)*(4*5)=1080, q 2*5*14=140, decoder 2*(7+6)*(4*6)=624,
    #   write 2*6*18=216, attention layers 2*(2*6*5)=120,
    #   read filterbank 2C=4 planes * (2*2*3*4 + 2*2*4*2) = 320,
    #   write filterbank C=2 planes * (2*3*3*3 + 2*3*3*4) = 252     -> 2752
    # times T=2 glimpses, times 3 for forward + backward.
    cfg = _cfg(True)
    terms = bench_run.flop_terms(cfg, 1)
    assert terms == {"encoder_lstm": 2160, "q_layer": 280, "decoder_lstm": 1248,
                     "write_layer": 432, "attention_layers": 240,
                     "read_filterbank": 640, "write_filterbank": 504}
    assert bench_run.count_flops(cfg, 1) == 3 * 2 * 2752 == 16512


def test_count_flops_hand_count_without_attention():
    # read_dim=2D=48, write_dim=D=24: encoder 2*(48+6+5)*20=2360, q 140, decoder 624,
    # write 2*6*24=288 -> 3412 per glimpse.
    cfg = _cfg(False)
    assert set(bench_run.flop_terms(cfg, 1)) == {"encoder_lstm", "q_layer", "decoder_lstm",
                                                 "write_layer"}
    assert bench_run.count_flops(cfg, 1) == 3 * 2 * 3412


@pytest.mark.parametrize("attention", [True, False])
def test_count_flops_is_linear_in_batch_and_T(attention):
    cfg = npdraw.DrawConfig(attention=attention)
    f1 = bench_run.count_flops(cfg, 50)
    assert bench_run.count_flops(cfg, 100) == 2 * f1
    assert bench_run.count_flops(npdraw.DrawConfig(T=32, attention=attention), 50) * 2 == f1
    assert f1 == 3 * sum(bench_run.flop_terms(cfg, 50).values())


def test_paper_config_flops_are_dominated_by_the_lstms():
    terms = bench_run.flop_terms(npdraw.DrawConfig(), 100)
    lstm = terms["encoder_lstm"] + terms["decoder_lstm"]
    assert lstm > 0.8 * sum(terms.values())


# ------------------------------------------------------------------ the bench end to end

EXPECTED_IMPL_KEYS = {"ms_per_step", "ms_min", "ms_all", "examples_per_s", "gflops", "peak_fraction",
                      "activation_bytes_per_example", "final_loss"}


def _run_json(capsys, argv):
    rc = bench_run.main(argv + ["--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_bench_runs_end_to_end_json(capsys):
    rc, r = _run_json(capsys, TINY)
    assert rc == 0
    assert {"date", "device", "torch", "blas", "threads", "env", "settings", "gemm", "models",
            "ok"} <= set(r)
    assert r["ok"] is True
    assert r["device"]["cores"] >= 1 and r["device"]["cpu"]
    assert r["gemm"]["peak_gflops"] > 0
    g = r["gemm"]   # the peak bounds one multi-threaded matmul and the cores side by side
    assert g["single_core_best_gflops"] > 0 and g["cores"] == r["device"]["cores"]
    assert g["peak_gflops"] >= max(max(g["best_gflops"].values()),
                                   g["single_core_best_gflops"] * g["cores"]) * (1 - 1e-12)
    assert set(r["models"]) == {"attention", "no-attention"}
    from npdraw import engine_layers
    assert r["settings"]["kernels"] == engine_layers.kernels()
    for name, e in r["models"].items():
        assert e["config"]["T"] == 2 and e["config"]["attention"] == (name == "attention")
        assert e["flops_per_step"] == bench_run.count_flops(npdraw.DrawConfig(T=2, attention=(
            name == "attention")), 4)
        assert EXPECTED_IMPL_KEYS <= set(e["npdraw"])
        assert e["npdraw"]["ms_per_step"] > 0 and len(e["npdraw"]["ms_all"]) == 1
        assert e["npdraw"]["activation_bytes_per_example"] > 0
        assert np.isfinite(e["npdraw"]["final_loss"])
        if r["torch"] is not None:
            assert e["check"]["ok"] is True
            assert EXPECTED_IMPL_KEYS <= set(e["torch"])
            assert e["ratio_npdraw_over_torch"] > 0
            assert e["ratio_best"] > 0 and e["ratio_paired_median"] > 0
        else:
            assert e["ratio_npdraw_over_torch"] is None
    # the README's table is made from this JSON
    from bench import table
    rows = table.rows(r)
    assert len(rows) == 2 and rows[0].startswith("| " + r["date"][:10])
    assert all(row.count("|") == table.HEADER.splitlines()[0].count("|") for row in rows)
    assert "| attention |" in rows[0] and "| no-attention |" in rows[1]


def test_bench_times_npdraw_as_ranks_like_train():
    """`python bench/run.py --ranks 2` starts two MPI ranks (as `cli.py train` does) and
    times the sharded step, after checking that it computes the in-process loss."""
    assert distributed.mpi_available(), "the ranks need pip install -e \".[mpi]\" (the README's)"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "run.py"), *TINY,
                             "--ranks", "2", "--model", "attention", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)                  # rank 0 alone prints
    assert r["ok"] is True and r["settings"]["ranks"] == 2
    e = r["models"]["attention"]
    assert np.isfinite(e["npdraw"]["final_loss"]) and e["npdraw"]["activation_bytes_per_example"] > 0
    if r["torch"] is not None:
        assert e["check"]["loss_timed_rel_f32"] < bench_run.LOSS_RTOL_F32
    assert "npdraw splits each batch over 2 MPI ranks" in bench_run.format_report(r)
    from bench import table
    cells = _table_cells(table.rows(r)[0], table.HEADER)
    assert cells["model"] == "attention"
    assert cells["npdraw processes"] in ("2", "2, Numba kernels")   # NPDRAW_KERNELS may be set


def test_bench_ranks_in_one_process_agree_with_the_model():
    """The runner's sharded step with the one-process communicator is the model's step."""
    cfg = _cfg(True)
    params = npdraw.init_params(cfg, 0, dtype="float64")
    x, eps = bench_run.make_inputs(cfg, 5, 0, "float64")
    runner = bench_run.NpdrawRunner(npdraw, cfg, params, x, eps, "cpu")
    loss, grads, stats = runner.loss_and_grads()
    want_loss, want_grads, want_stats = npdraw.loss_and_grads(params, cfg, x, eps)
    assert loss == want_loss and stats["activation_bytes"] == want_stats["activation_bytes"]
    for name in want_grads:
        assert np.array_equal(grads[name], want_grads[name]), name
    assert runner.allreduce_seconds(3) == []       # no all-reduce in one process
    runner.close()                                 # nothing to tell in one process


def test_bench_text_report_npdraw_alone(capsys):
    threads_before = [lib.get("num_threads") for lib in bench_run.blas_info()]
    rc = bench_run.main(TINY + ["--no-torch", "--model", "attention", "--threads", "1",
                                "--profile", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "1 threads" in out  # the BLAS line reports the count in force during the run
    assert [lib.get("num_threads") for lib in bench_run.blas_info()] == threads_before  # put back
    assert "[attention]" in out and "[no-attention]" not in out
    assert "ms/step" in out and "npdraw" in out and "GEMM (" in out and "peak =" in out
    assert "throughput" not in out  # no peer, no ratio
    assert "tottime" in out  # the profile table


def test_bench_gpu_device(capsys):
    """Without a GPU, --device gpu fails clearly; with one, the tiny bench runs there."""
    if not backend.gpu_available():
        assert bench_run.main(TINY + ["--device", "gpu"]) == 2
        err = capsys.readouterr().err
        assert "gpu" in err.lower() and "not available" in err
    else:
        rc, r = _run_json(capsys, TINY + ["--device", "gpu"])
        assert rc == 0 and r["device"]["kind"] == "gpu" and r["device"]["gpu"]


def test_bench_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        bench_run.main(["--steps", "0"])
    for bad in (["--batches", "100,0"], ["--batches", "a"], ["--peers", "eager,jit"]):
        with pytest.raises(SystemExit):
            bench_run.parse_args(bad)
    args = bench_run.parse_args(["--batches", "500,100,500", "--peers", "compiled,eager"])
    assert args.batches == [500, 100] and args.batch == 500 and args.peers == ["compiled", "eager"]
    assert bench_run.parse_args(["--no-torch", "--peers", "compiled"]).peers == []


def test_best_batch_takes_each_sides_best():
    def entry(B, npdraw, torch):
        return {"batch": B, "npdraw": {"examples_per_s": npdraw},
                "torch": {"examples_per_s": torch}}
    best = bench_run.best_batch([entry(100, 300.0, 200.0), entry(500, 900.0, 150.0)])
    assert best["npdraw"] == {"batch": 500, "examples_per_s": 900.0}
    assert best["torch"] == {"batch": 100, "examples_per_s": 200.0}
    assert best["ratio_npdraw_over_torch"] == 4.5 and "torch_compiled" not in best


def test_bench_batches_report_each_batch_and_the_best(capsys):
    rc, r = _run_json(capsys, TINY + ["--model", "no-attention", "--batches", "4,8"])
    assert rc == 0 and r["ok"] is True and r["settings"]["batches"] == [4, 8]
    entries = r["batches"]["no-attention"]
    assert [e["batch"] for e in entries] == [4, 8]
    assert r["models"]["no-attention"]["batch"] == 4           # the first, as table.py reads it
    best = r["best_batch"]["no-attention"]
    sides = ["npdraw"] + (["torch"] if r["torch"] is not None else [])
    for side in sides:
        top = max(entries, key=lambda e: e[side]["examples_per_s"])
        assert best[side] == {"batch": top["batch"], "examples_per_s": top[side]["examples_per_s"]}
    if r["torch"] is not None:
        assert best["ratio_npdraw_over_torch"] == (best["npdraw"]["examples_per_s"]
                                                   / best["torch"]["examples_per_s"])
    text = bench_run.format_report(r)
    assert "[no-attention, batch 4]" in text and "[no-attention, batch 8]" in text
    assert "best batch: npdraw" in text
    from bench import table
    cells = _table_cells(table.rows(r)[0], table.HEADER)
    sides = cells["best batch ex/s (batch): npdraw / eager / compiled"].split(" / ")
    assert sides[0] == f"{best['npdraw']['examples_per_s']:.0f} ({best['npdraw']['batch']})"
    assert sides[2] == "-"                                      # no compiled peer this run


def test_bench_compiled_peer_agrees_and_reports_its_compile_on_its_own(capsys):
    """torch.compile beside eager: the same agreement check, its first compile time in a
    field of its own, and its ratio beside eager's. Compiling takes a minute or more."""
    rc, r = _run_json(capsys, TINY + ["--model", "no-attention", "--peers", "eager,compiled",
                                      "--threads", "1", "--ranks", "1"])
    assert rc == 0 and r["ok"] is True and r["settings"]["peers"] == ["eager", "compiled"]
    e = r["models"]["no-attention"]
    chk = e["check_torch_compiled"]
    assert chk["ok"] is True and chk["loss_rel_f32"] < bench_run.LOSS_RTOL_F32
    assert chk["loss_rel_f64"] < bench_run.RTOL_F64
    assert all(v < bench_run.RTOL_F64 for v in chk["grad_rel_f64"].values())
    assert e["compile_s"] > 0 and e["compiled_first_step_s"] > 0
    assert EXPECTED_IMPL_KEYS <= set(e["torch_compiled"]) and len(e["torch_compiled"]["ms_all"]) == 1
    assert e["torch_compiled"]["activation_bytes_per_example"] is None
    assert e["ratio_npdraw_over_torch_compiled"] > 0 and e["ratio_npdraw_over_torch"] > 0
    text = bench_run.format_report(r)
    assert "check vs torch.compile" in text and "first compile" in text
    assert "npdraw/compiled throughput" in text and "npdraw/torch throughput" in text
    from bench import table
    cells = _table_cells(table.rows(r)[0], table.HEADER)
    assert cells["torch.compile ms/step"] == f"{e['torch_compiled']['ms_per_step']:.0f}"
    assert cells["speed-up vs torch.compile"] == f"{e['ratio_npdraw_over_torch_compiled']:.2f}x"


def _table_cells(row: str, header: str) -> dict:
    """{column name: cell} of one Markdown row under the table's header line."""
    names = [c.strip() for c in header.splitlines()[0].strip("|").split("|")]
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert len(cells) == len(names), row
    return dict(zip(names, cells))


def _figures(ms, ex_s):
    return {"ms_per_step": ms, "examples_per_s": ex_s, "gflops": 128.4, "peak_fraction": 0.61}


def test_table_shows_the_compiled_peer_and_each_sides_best_batch():
    """A hand-made run's JSON (the fields bench/run.py writes with --peers eager,compiled
    --batches 100,500), formatted: the compiled peer's columns and the best batches."""
    from bench import table
    r = {"date": "2026-12-04T10:00:00+00:00", "settings": {"ranks": 2},
         "device": {"kind": "cpu", "cpu": "AMD EPYC", "cores": 2},
         "blas": [{"user_api": "blas", "internal_api": "openblas", "architecture": "SkylakeX"}],
         "models": {"attention": {"npdraw": _figures(290.2, 344.6), "torch": _figures(623.4, 160.4),
                                  "torch_compiled": _figures(364.1, 274.6),
                                  "ratio_npdraw_over_torch": 2.148,
                                  "ratio_npdraw_over_torch_compiled": 1.254}},
         "best_batch": {"attention": {
             "npdraw": {"batch": 500, "examples_per_s": 346.2},
             "torch": {"batch": 500, "examples_per_s": 242.1},
             "torch_compiled": {"batch": 100, "examples_per_s": 313.0},
             "ratio_npdraw_over_torch": 1.43, "ratio_npdraw_over_torch_compiled": 1.106}}}
    (row,) = table.rows(r)
    cells = _table_cells(row, table.HEADER)
    assert cells["npdraw ms/step"] == "290" and cells["PyTorch eager ms/step"] == "623"
    assert cells["speed-up vs eager"] == "2.15x"
    assert cells["torch.compile ms/step"] == "364" and cells["speed-up vs torch.compile"] == "1.25x"
    assert cells["best batch ex/s (batch): npdraw / eager / compiled"] == \
        "346 (500) / 242 (500) / 313 (100)"
    assert cells["speed-up at best batches: vs eager / vs compiled"] == "1.43x / 1.11x"
    assert cells["npdraw processes"] == "2"
    r["settings"]["kernels"] = "numba"                     # NPDRAW_KERNELS=numba
    assert _table_cells(table.rows(r)[0], table.HEADER)["npdraw processes"] == "2, Numba kernels"
    # a best batch without the compiled peer: its places are "-"
    del r["best_batch"]["attention"]["torch_compiled"]
    del r["best_batch"]["attention"]["ratio_npdraw_over_torch_compiled"]
    cells = _table_cells(table.rows(r)[0], table.HEADER)
    assert cells["best batch ex/s (batch): npdraw / eager / compiled"] == "346 (500) / 242 (500) / -"
    assert cells["speed-up at best batches: vs eager / vs compiled"] == "1.43x / -"


def test_table_row_of_a_run_without_the_new_fields_shows_dashes():
    """An older run's JSON (eager peer only, one batch, "workers"): its row, with "-" in
    the compiled peer's and the best batch's columns."""
    from bench import table
    r = {"date": "2026-11-29T10:00:00+00:00", "settings": {"workers": 2},
         "device": {"cpu": "AMD EPYC", "cores": 2},
         "blas": [{"user_api": "blas", "internal_api": "openblas", "architecture": "Haswell"}],
         "models": {"no-attention": {"npdraw": _figures(354.0, 282.5), "torch": _figures(721.0, 138.7),
                                     "ratio_npdraw_over_torch": 2.03}}}
    (row,) = table.rows(r)
    cells = _table_cells(row, table.HEADER)
    assert cells["npdraw processes"] == "2" and cells["speed-up vs eager"] == "2.03x"
    assert cells["PyTorch eager ms/step"] == "721"
    for column in ("torch.compile ms/step", "speed-up vs torch.compile",
                   "best batch ex/s (batch): npdraw / eager / compiled",
                   "speed-up at best batches: vs eager / vs compiled"):
        assert cells[column] == "-", column
    r["models"]["no-attention"].pop("torch")               # --no-torch: no peer at all
    r["models"]["no-attention"]["ratio_npdraw_over_torch"] = None
    cells = _table_cells(table.rows(r)[0], table.HEADER)
    assert cells["PyTorch eager ms/step"] == "-" and cells["speed-up vs eager"] == "-"


# ------------------------------------------------------------------ the PyTorch peer (optional)

PEER_CONFIGS = [
    dict(attention=True, channels=3, height=5, width=7, read_n=2, write_n=3),
    dict(attention=False, channels=3, height=5, width=7),
    dict(attention=True, channels=1, height=6, width=4, read_n=1, write_n=4),
]


def _peer_case(kw, seed=3):
    cfg = npdraw.DrawConfig(T=3, enc_dim=6, dec_dim=7, z_dim=4, **kw)
    rng = np.random.default_rng(seed)
    params = npdraw.init_params(cfg, seed, dtype="float64")
    # Move every parameter off its initial value so windows and gates are not at special points.
    params = {k: np.asarray(v) + 0.3 * rng.standard_normal(np.shape(v)) for k, v in params.items()}
    B = 3
    x = (rng.random((B, cfg.D)) < 0.4).astype(np.float64)
    eps = rng.standard_normal((cfg.T, B, cfg.z_dim))
    return cfg, params, x, eps


@pytest.mark.parametrize("kw", PEER_CONFIGS, ids=["attention-C3", "no-attention-C3", "attention-N1"])
def test_torch_peer_matches_npdraw_float64(kw):
    import torch
    from bench.torch_draw import TorchDraw

    cfg, params, x, eps = _peer_case(kw)
    loss_n, grads_n, _stats = npdraw.loss_and_grads(params, cfg, x, eps)
    model = TorchDraw(cfg).load_from_npdraw(params)
    assert next(model.parameters()).dtype == torch.float64
    loss_t = model(torch.from_numpy(x), torch.from_numpy(eps))
    loss_t.backward()
    assert abs(float(loss_n) - loss_t.item()) <= 1e-6 * abs(loss_t.item())
    grads_t = model.grads_as_npdraw()
    assert set(grads_t) == set(grads_n)
    for name, g_t in grads_t.items():
        g_n = np.asarray(grads_n[name])
        assert g_n.shape == g_t.shape, name
        assert np.linalg.norm(g_n - g_t) <= 1e-6 * max(np.linalg.norm(g_t), 1e-12), name


def test_torch_peer_round_trips_parameters():
    import torch
    from bench.torch_draw import TorchDraw, gate_perm

    cfg, params, _x, _eps = _peer_case(PEER_CONFIGS[0])
    model = TorchDraw(cfg).load_from_npdraw(params)
    H = cfg.enc_dim
    Wt = params["enc_W"]
    # Gate g (npdraw block 3) becomes LSTMCell block 2; o (npdraw block 2) becomes block 3.
    np.testing.assert_array_equal(model.encoder.weight_ih.detach().numpy()[2 * H:3 * H],
                                  Wt[:cfg.read_dim + cfg.dec_dim, 3 * H:4 * H].T)
    np.testing.assert_array_equal(model.encoder.weight_hh.detach().numpy()[3 * H:],
                                  Wt[cfg.read_dim + cfg.dec_dim:, 2 * H:3 * H].T)
    assert torch.count_nonzero(model.encoder.bias_hh) == 0
    assert np.array_equal(gate_perm(H)[gate_perm(H)], np.arange(4 * H))


def test_bench_withholds_ratio_when_peer_disagrees(capsys, monkeypatch):
    import bench.torch_draw as td

    monkeypatch.setattr(td, "gate_perm", lambda hidden: np.arange(4 * hidden))  # wrong mapping
    rc = bench_run.main(TINY + ["--model", "no-attention"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "DISAGREE" in out and "throughput" not in out and "FAILED" in out
