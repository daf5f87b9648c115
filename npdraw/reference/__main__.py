"""python -m npdraw.reference: train the plain DRAW (the reference's loss and gradients,
optim's Adam) on a small slice of binarized MNIST, printing the bound as it falls.

A learner's run, not the training program (that is `python -m npdraw train`): one batch
a step from the first --train images, no validation, no checkpoints. The defaults finish
in a few minutes on one core. Data as npdraw.data.load_splits finds it: --data-dir and
--mirror, else env NPDRAW_DATA and NPDRAW_MIRROR, else ./data and the canonical URLs.

Shapes: x (B, D) a batch of images, eps (T, B, Z) the noise of eq 6.

Dimension legend
    B  batch
    T  glimpses
    D  = C*H*W, one image flattened
    Z  latent size
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .. import optim
from ..config import DrawConfig
from ..data import DEFAULT_DATA_DIR, load_splits
from . import draw
from .init import init_params

C0_CLIP = 1e-3      # the mean image's pixels clipped into [C0_CLIP, 1 - C0_CLIP] for logit


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m npdraw.reference",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="Adam steps (default 300)")
    p.add_argument("--batch", type=int, default=50, help="batch size B (default 50)")
    p.add_argument("--train", type=int, default=5000,
                   help="first training images used (default 5000)")
    p.add_argument("--T", type=int, default=8, help="glimpses T (default 8)")
    p.add_argument("--enc", type=int, default=100, help="encoder LSTM size He (default 100)")
    p.add_argument("--dec", type=int, default=100, help="decoder LSTM size Hd (default 100)")
    p.add_argument("--z", type=int, default=10, help="latent size Z (default 10)")
    p.add_argument("--attention", action="store_true",
                   help="read 2x2 and write 5x5 windows (eq 19-29) instead of whole images")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    p.add_argument("--every", type=int, default=25, help="print the mean bound every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="where binarized MNIST is kept [env NPDRAW_DATA]")
    p.add_argument("--mirror", default="",
                   help="a folder or URL to fetch it from [env NPDRAW_MIRROR]")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "train", "T", "enc", "dec", "z", "every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def train(args, out=sys.stdout):
    """Train and print; -> the mean bounds (nats) of each --every steps, in order."""
    images = load_splits("bmnist", data_dir=args.data_dir, mirror=args.mirror,
                         progress=False).train[:args.train]
    cfg = DrawConfig(T=args.T, enc_dim=args.enc, dec_dim=args.dec, z_dim=args.z,
                     attention=args.attention, read_n=2, write_n=5)
    params = init_params(cfg, args.seed)
    # c_0 = logit(mean image): the first canvas is the mean digit (a departure, see init)
    mean = np.clip(images.mean(axis=0), C0_CLIP, 1 - C0_CLIP)
    params["c0"] = (np.log(mean) - np.log1p(-mean)).astype(np.float32)
    state = optim.adam_init(params)
    rng = np.random.default_rng(args.seed)
    print(f"plain DRAW on {images.shape[0]} binarized MNIST images: T {cfg.T}, He {cfg.enc_dim}, "
          f"Hd {cfg.dec_dim}, Z {cfg.z_dim}, attention {'on' if cfg.attention else 'off'}, "
          f"batch {args.batch}", file=out)
    bounds, window = [], []
    for step in range(1, args.steps + 1):
        x = images[rng.integers(0, images.shape[0], args.batch)]
        eps = rng.standard_normal((cfg.T, args.batch, cfg.z_dim), dtype=np.float32)
        loss, grads, stats = draw.loss_and_grads(params, cfg, x, eps)
        params, state, _ = optim.adam_step(params, grads, state, args.lr)
        window.append(loss)
        if step % args.every == 0 or step == args.steps:
            bounds.append(float(np.mean(window)))
            print(f"step {step:5d}  bound {bounds[-1]:8.2f} nats  "
                  f"(recon {stats['recon']:.2f}, KL {stats['kl_total']:.2f})", file=out, flush=True)
            window = []
    print(f"the bound went from {bounds[0]:.2f} to {bounds[-1]:.2f} nats", file=out)
    return bounds


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
