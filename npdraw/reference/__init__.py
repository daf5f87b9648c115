"""The plain reference implementations, written to be read; the fast paths are tested
against them. One module per model:
    init        DRAW's parameter table (param_shapes) and initialisation (init_params,
                tiling_window_bias, the attention's start window)
    draw        DRAW (eq 1-29): step_forward/step_backward, loss_and_grads, generate,
                reconstruct, and the plain attention (window parameters, filterbank, read, write)
    classifier  the attentive classifier of cluttered MNIST (paper table 1)
"""
from . import classifier, init  # noqa: F401
from .draw import (filterbank_backward, filterbank_forward, generate, initial_state,
                   loss_and_grads, read_backward, read_forward, reconstruct, step_backward,
                   step_forward, window_backward, window_forward, window_params_backward,
                   window_params_forward, write_backward, write_forward)
