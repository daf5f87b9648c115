"""npdraw: DRAW (Gregor et al. 2015) with hand-written forward and backward passes.

Public API:
    DrawConfig, TrainConfig        typed configuration (paper MNIST defaults)
    init_params(cfg, seed, dtype)  -> dict name -> array
    loss_and_grads(params, cfg, x, eps) -> (loss, grads, stats)
    loss_only(params, cfg, x, eps, return_terms=False) -> (loss_per_example, stats)
    generate(params, cfg, eps)     -> (canvases (T, B, D), windows)
    reconstruct(params, cfg, x, eps) -> (canvases (T, B, D), read and write windows, kl (T, B))
    load(path)                     -> (cfg, params) of a checkpoint or an exported model
Arrays may be NumPy or CuPy; the array module is taken from the inputs.
npdraw.reference holds the same model written plainly, to be read (start there).

Dimension legend
    B  batch
    T  glimpses
    D  = C*H*W, one image flattened
"""
from .guards import note_signals_until_handled
from .threads import launched_ranks, share_cores_between_ranks

share_cores_between_ranks()   # under mpiexec or srun: before NumPy loads (npdraw/threads.py)
if launched_ranks() > 1:      # a rank: a Ctrl-C while it imports stops all ranks together
    note_signals_until_handled()

from .config import DrawConfig, TrainConfig  # noqa: E402
from .model import (generate, init_params, loss_and_grads, loss_only,  # noqa: E402
                    param_shapes, reconstruct)

__all__ = ["DrawConfig", "TrainConfig", "init_params", "loss_and_grads", "loss_only", "generate",
           "param_shapes", "reconstruct", "load"]
__version__ = "0.1.0"


def load(path):
    """A checkpoint's or an exported model's (cfg, params): path is an .h5 file or a run
    dir (its best.h5, else its checkpoint.h5); params are NumPy arrays {name: array}, the
    moving average of the parameters when the checkpoint keeps one (runs.model_params).
    ValueError, naming the file, when it cannot be read or is a classifier's."""
    from . import runs
    ckpt = runs.load_checkpoint(path)
    if not isinstance(ckpt.cfg, DrawConfig):
        raise ValueError(f"{runs.checkpoint_file(path)} is a classifier checkpoint, not a "
                         "DRAW model")
    return ckpt.cfg, runs.arrays_to_device(runs.model_params(ckpt)[0], "cpu")
