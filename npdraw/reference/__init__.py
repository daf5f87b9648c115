"""The plain reference implementations, written to be read; the fast paths are tested
against them. One module per part:
    draw        DRAW (eq 1-18, 28): the T-step loop loss_and_grads, step_forward/step_backward,
                the read and write heads, generate, reconstruct
    attention   DRAW's attention (eq 19-29): the window, read, write, the filterbank
    init        DRAW's parameter table (param_shapes) and initialisation (init_params,
                tiling_window_bias, the attention's start window)
    classifier  the attentive classifier of cluttered MNIST (paper table 1)
    __main__    `python -m npdraw.reference`: trains the plain DRAW a few hundred steps on
                a slice of binarized MNIST and prints the bound falling
"""
from . import attention, classifier, init  # noqa: F401
from .attention import (filterbank_backward, filterbank_forward, read_backward,  # noqa: F401
                        read_forward, window_backward, window_forward, window_params_backward,
                        window_params_forward, write_backward, write_forward)
from .draw import (generate, initial_state, loss_and_grads, reconstruct,  # noqa: F401
                   step_backward, step_forward)
