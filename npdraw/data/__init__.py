"""Data sets for DRAW: download, verify, convert and load as flat float32 arrays.

Every loader returns a :class:`DataSplits` of three float32 matrices with values
in [0, 1], one image a row, each image flattened channels-first (C, H, W).

Dimension legend
    E  images (examples) in a set or a file
    C, H, W  channels, image height, image width
    D  C*H*W, one image flattened channels-first

Data sets (see docs/DATA.md for formats, splits and the mirror layout), a module each:

    bmnist         Larochelle's binarized MNIST (the DRAW paper's), 50k/10k/10k,
                   converted once into <data_dir>/binarized_mnist.h5        (bmnist.py)
    mnist          grey-level MNIST from the IDX files, values / 255        (idx.py)
    fashion-mnist  Fashion-MNIST from the IDX files, values / 255           (idx.py)
    cifar10        CIFAR-10 binary version (cifar-10-binary.tar.gz)         (cifar.py)
    svhn           SVHN cropped digits (train_32x32.mat / test_32x32.mat, MAT v5; svhn.py)
    folder         a folder of same-sized PNG/JPEG images                   (folder.py)
    two-digit-mnist  two binarized-MNIST digits on a 60x60 canvas, made on the fly
                   (synthetic.py, with cluttered MNIST; a fresh training set every epoch)

What they share (sources.py): where files come from, in this order: a copy already in
the data folder, the mirror (argument ``mirror`` or env ``NPDRAW_MIRROR``: a local folder,
or an http://, https:// or file:// base URL), else the canonical URL. Downloads are
streamed into a hidden temporary file inside the data folder and renamed only once
complete and verified, so an interrupted or bad download never leaves a file that looks
valid. No pickle is used anywhere: CIFAR-10 is read from its binary version. load.py
holds the entry points; this file only gathers the public names.

Imports point one way: sources <- each family <- synthetic (bmnist's splits, idx's
reader) <- load <- this file.
"""
from ..config import DATASETS  # the one list of names, shared with TrainConfig
from .bmnist import BMNIST_H5, BMNIST_ROWS, BMNIST_SHA256, BMNIST_SHAPE, amat_sha256
from .folder import IMAGE_SUFFIXES
from .idx import parse_idx
from .load import load_split, load_splits
from .sources import (CANONICAL_MD5, DEFAULT_DATA_DIR, ENV_DATA, ENV_MIRROR, SPLITS,
                      VALID_SIZE, DataError, DataSplits, resolve_data_dir, resolve_mirror,
                      spread_subset)
from .svhn import read_mat_v5

# The tables (BMNIST_SHA256, BMNIST_ROWS, CANONICAL_MD5) are the modules' own dicts; a
# constant that a module reads at call time (DOWNLOAD_TIMEOUT, MNIST_URL, ...) is set on
# that module (sources, idx, ...), not here.
__all__ = [
    "DATASETS", "DataError", "DataSplits", "load_splits", "load_split", "resolve_data_dir",
    "resolve_mirror", "spread_subset", "parse_idx", "read_mat_v5", "amat_sha256",
    "DEFAULT_DATA_DIR", "ENV_DATA", "ENV_MIRROR", "SPLITS", "VALID_SIZE", "CANONICAL_MD5",
    "BMNIST_H5", "BMNIST_SHAPE", "BMNIST_ROWS", "BMNIST_SHA256", "IMAGE_SUFFIXES",
]
