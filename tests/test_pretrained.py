"""The shipped model: pretrained/bmnist_r2w5_t64.h5 must still give the bound that it and
docs/RESULTS.md state, so the file and the claim cannot drift apart."""
import math
import re
from pathlib import Path

import numpy as np

from npdraw import checkpoint as ckpt_lib
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw import evaluate as evaluate_lib
from npdraw.config import DrawConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "pretrained" / "bmnist_r2w5_t64.h5"
PAPER_MODEL = DrawConfig(T=64, read_n=2, write_n=5, enc_dim=256, dec_dim=256, z_dim=100)


def test_the_shipped_model_gives_the_bound_stated_beside_it(bmnist):
    model = ckpt_lib.load_checkpoint(SHIPPED)
    assert model.cfg == PAPER_MODEL
    assert model.opt_state is None                      # parameters only
    assert all(v.dtype == np.float32 for v in model.params.values())
    check = model.extra["check"]
    assert (check["split"], check["dtype"]) == ("test", "float64")

    bound = evaluate_lib.fixed_noise_bound(model.params, model.cfg, bmnist.test[:check["n"]],
                                        check["seed"])
    # float64 throughout: a different BLAS kernel or summation order moves the mean of
    # ~100 * (784 + 64) terms of size <= ~10 nats by far less than 1e-9 relative.
    assert math.isclose(bound, check["bound"], rel_tol=1e-9), (bound, check["bound"])

    results = (REPO / "docs" / "RESULTS.md").read_text()
    stated = re.search(r"check\s+bound:\s+([0-9.]+)\s+nats", results)
    assert stated, "docs/RESULTS.md states no check bound for the shipped model"
    assert abs(float(stated.group(1)) - bound) < 0.005     # stated to 2 decimals
    test_bound = re.search(r"shipped\s+model's\s+test\s+bound:\s+([0-9.]+)\s+nats", results)
    assert test_bound and abs(float(test_bound.group(1)) - model.extra["test_bound"]) < 0.005


def test_the_campaign_state_and_the_shipped_model_load_and_resume(bmnist, tmp_path):
    """The shipped model was saved with `"workers": 0`, a field of the retired worker
    processes: its training config still loads (without it). The campaign's state loads
    and its run folder resumes."""
    import shutil

    from npdraw.config import TrainConfig
    run = tmp_path / "campaign"
    shutil.copytree(REPO / "pretrained" / "bmnist_r2w5_t64.run", run)
    for path in (SHIPPED, run / "checkpoint.h5"):
        saved = runs_lib.train_config_of(ckpt_lib.load_checkpoint(path))
        assert saved.batch_size == 100, path
    epochs = ckpt_lib.load_checkpoint(run / "checkpoint.h5").epoch
    lines = []
    train_lib.train(None, TrainConfig(epochs=epochs, device="cpu", resume=str(run)),
                    log=lines.append, data=bmnist, progress=False)
    assert f"nothing to do: the run already has {epochs} epochs" in lines
    assert len(runs_lib.read_log(run)) == epochs              # the log is kept whole
