"""The entry points: every data set by name (load_splits), and one split alone
(load_split), which for binarized MNIST reads that split only.

Dimension legend
    E  images (examples) in a set or a file
    C, H, W  channels, image height, image width
    D  C*H*W, one image flattened channels-first
"""
from __future__ import annotations

import numpy as np

from ..config import DATASETS  # the one list of names, shared with TrainConfig
from .bmnist import BMNIST_H5, BMNIST_SHAPE, bmnist_split, load_bmnist, read_bmnist_h5
from .cifar import load_cifar10
from .folder import load_folder
from .idx import load_idx_dataset
from .sources import (DEFAULT_DATA_DIR, SPLITS, DataError, DataSplits, resolve_data_dir,
                      resolve_mirror)
from .svhn import load_svhn
from .synthetic import two_digit_splits

def load_splits(dataset: str, data_dir: str = DEFAULT_DATA_DIR, mirror: str = "",
                folder: str = "", progress: bool = True) -> DataSplits:
    """Load a data set as float32 (E, D) train/valid/test matrices in [0, 1].

    dataset:  one of DATASETS.
    data_dir: where downloads, conversions and caches go (see resolve_data_dir).
    mirror:   local folder or base URL to fetch source files from (see resolve_mirror).
    folder:   the image folder, for dataset "folder" only.
    progress: print a download progress bar to stderr.
    """
    name = str(dataset).strip().lower()
    if name not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")
    if name == "folder":
        return load_folder(folder)
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"data folder {root} exists but is not a folder")
    mirror = resolve_mirror(mirror)
    if name == "bmnist":
        return load_bmnist(root, mirror, progress)
    if name == "two-digit-mnist":
        return two_digit_splits(load_bmnist(root, mirror, progress))
    if name in ("mnist", "fashion-mnist"):
        return load_idx_dataset(name, root, mirror, progress)
    if name == "cifar10":
        return load_cifar10(root, mirror, progress)
    return load_svhn(root, mirror, progress)

def load_split(dataset: str, split: str, data_dir: str = DEFAULT_DATA_DIR, mirror: str = "",
               folder: str = "", progress: bool = True) -> tuple:
    """One split as float32 (E, D) in [0, 1], and the image shape (C, H, W).

    For binarized MNIST only that split is read: from the converted file when it exists,
    else from its own source file (checked against its sha256, nothing converted), so
    scoring a shipped model needs the test file alone. Other data sets: load_splits."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if str(dataset).strip().lower() != "bmnist":
        data = load_splits(dataset, data_dir, mirror, folder, progress)
        return getattr(data, split), data.shape
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"data folder {root} exists but is not a folder")
    h5 = root / BMNIST_H5
    if h5.exists():
        images = read_bmnist_h5(h5, (split,))[split]
    else:
        root.mkdir(parents=True, exist_ok=True)
        images = bmnist_split(split, root, resolve_mirror(mirror), progress)
    return images.astype(np.float32), BMNIST_SHAPE
