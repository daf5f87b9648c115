"""npdraw: DRAW (Gregor et al. 2015) with hand-written forward and backward passes.

Public API:
    DrawConfig, TrainConfig        typed configuration (paper MNIST defaults)
    init_params(cfg, seed, dtype)  -> dict name -> array
    loss_and_grads(params, cfg, x, eps) -> (loss, grads, stats)
    loss_only(params, cfg, x, eps, return_terms=False) -> (loss_per_example, stats)
    generate(params, cfg, eps)     -> (canvases (T, B, D), windows)
    reconstruct(params, cfg, x, eps) -> (canvases (T, B, D), read and write windows, kl (T, B))
Arrays may be NumPy or CuPy; the array module is taken from the inputs.
npdraw.reference holds the same model written plainly, to be read (start there).
"""
from .config import DrawConfig, TrainConfig
from .model import (generate, init_params, loss_and_grads, loss_only, param_shapes,
                    reconstruct)

__all__ = ["DrawConfig", "TrainConfig", "init_params", "loss_and_grads", "loss_only", "generate",
           "param_shapes", "reconstruct"]
__version__ = "0.1.0"
