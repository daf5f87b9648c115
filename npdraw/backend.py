"""Array-module selection: the only module in npdraw that imports CuPy.

Every numerical function takes its array module from its inputs
(``xp = get_array_module(x)``), so the same code runs on NumPy and, given
CuPy arrays, on the GPU. Nothing here is a global switch, except the host
allocator setting that the training entry points ask for (retain_freed_memory).
"""
from __future__ import annotations

import ctypes
import types

import numpy as np

try:  # CuPy is optional; a machine without it (or without a GPU) runs on NumPy.
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA library that fails to load
    _cupy = None


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_array_module(*arrays):
    """numpy, or cupy when any argument is a CuPy array."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def is_gpu_array(array) -> bool:
    return _cupy is not None and isinstance(array, _cupy.ndarray)


def resolve_device(device: str) -> str:
    """Map 'auto' | 'cpu' | 'gpu' to 'cpu' or 'gpu'; 'gpu' without one is a ValueError."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', not {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise ValueError("device 'gpu' was asked for, but CuPy or a CUDA GPU is not available")
    return device


def xp_for(device: str):
    """The array module for a resolved device name."""
    return _cupy if resolve_device(device) == "gpu" else np


def to_device(array, device: str):
    """Copy a NumPy array to 'cpu' (NumPy) or 'gpu' (CuPy); dtype is kept."""
    if resolve_device(device) == "gpu":
        return _cupy.asarray(array)
    return to_numpy(array)


def to_numpy(array):
    """Any array (NumPy, CuPy or scalar) as a NumPy array; used only at I/O."""
    if is_gpu_array(array):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def synchronize(xp) -> None:
    """Wait for queued GPU work (for timing only); a no-op on NumPy."""
    if xp is not np and _cupy is not None:
        _cupy.cuda.get_current_stream().synchronize()


_FUSED = {}


def fuse(fn):
    """Run an elementwise function as one fused GPU kernel when given CuPy arrays.

    The function must use only `np.` ufuncs and arithmetic. On NumPy arrays it runs
    as plain NumPy code, which is what the tests check; on CuPy arrays cupy.fuse
    compiles that same code into a single kernel, with `np` bound to CuPy
    (`with_namespace`): inside cupy.fuse NumPy's own ufuncs do not dispatch to CuPy's
    (CuPy 14, NumPy 2). Should compilation fail, the plain function still runs on
    CuPy, just unfused, with a one-time warning.
    """
    def dispatch(*args):
        if _cupy is None or not any(isinstance(a, _cupy.ndarray) for a in args):
            return fn(*args)
        kernel = _FUSED.get(fn)
        if kernel is None:
            kernel = _FUSED[fn] = _cupy.fuse(kernel_name=fn.__name__)(with_namespace(fn, _cupy))
        if kernel is fn:
            return fn(*args)
        try:
            return kernel(*args)
        except Exception as error:  # pragma: no cover - GPU only
            import warnings
            warnings.warn(f"cupy.fuse failed for {fn.__name__} ({error}); running it unfused")
            _FUSED[fn] = fn
            return fn(*args)

    dispatch.__name__ = fn.__name__
    dispatch.__doc__ = fn.__doc__
    dispatch.unfused = fn
    return dispatch


def with_namespace(fn, module):
    """A copy of `fn` whose global name `np` means `module` (CuPy, for cupy.fuse), and so
    do the plain functions of fn's module that it calls (such as a shared `_sigmoid`)."""
    names = dict(fn.__globals__)
    names["np"] = module
    for name, value in fn.__globals__.items():
        if isinstance(value, types.FunctionType) and value.__globals__ is fn.__globals__:
            names[name] = types.FunctionType(value.__code__, names, value.__name__,
                                             value.__defaults__, value.__closure__)
    return types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory() -> bool:
    """Have the C allocator keep freed memory for reuse rather than return it to the OS.

    A training step allocates and frees the same tens of MB of activation buffers
    every time. glibc's malloc maps blocks that large afresh and hands them back on
    free, and trims the heap's free top, so each step pays the kernel for new zeroed
    pages, as system time (docs/DESIGN.md, item 14, has the measurement). Blocks up
    to 32 MiB (glibc's upper limit) then come from the heap, and up to 1 GiB of free
    heap is kept.

    Called by `train` (on every rank) and the benchmark (for both of its sides),
    never on import. -> True where the allocator took the settings (glibc),
    False elsewhere, where nothing changes.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):       # not glibc: no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    took_mmap = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    took_trim = mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    return took_mmap and took_trim


# ---------------------------------------------------------------- GPUs of data-parallel ranks
# (used by distributed.NCCLRanks: one rank per GPU, gradients summed over NCCL)

NCCL_UNIQUE_ID_BYTES = 128          # ncclUniqueId: 128 chars


def gpu_count() -> int:
    """CUDA devices CuPy sees on this machine (0 without CuPy or a GPU)."""
    if _cupy is None:
        return 0
    try:
        return int(_cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def use_gpu(index: int) -> None:
    """Make GPU `index` this process's current device (before any array is made)."""
    _cupy.cuda.Device(int(index)).use()


def _nccl():
    from cupy.cuda import nccl      # a CuPy build without NCCL has no such module
    return nccl


def nccl_unique_id():
    """NCCL's unique id of a new communicator as NCCL_UNIQUE_ID_BYTES signed chars (ints
    in [-128, 127], for an int8 broadcast), made on one rank and sent to the others.
    CuPy 14 gives the id as bytes (0..255), older CuPy as a tuple of signed chars."""
    return tuple((int(v) + 128) % 256 - 128 for v in _nccl().get_unique_id())


def nccl_communicator(size: int, unique_id, rank: int):
    """This rank's NCCL communicator of `size` ranks; unique_id: the broadcast id
    (NCCL_UNIQUE_ID_BYTES integers in [-128, 127], as nccl_unique_id gives it)."""
    nccl = _nccl()
    signed = [int(v) for v in unique_id]
    try:                            # CuPy 14 takes the id as bytes
        return nccl.NcclCommunicator(int(size), bytes(v % 256 for v in signed), int(rank))
    except TypeError:               # older CuPy: a tuple of signed chars
        return nccl.NcclCommunicator(int(size), tuple(signed), int(rank))


def nccl_allreduce_sum(communicator, array) -> None:
    """Sum a contiguous float32/float64 CuPy array over the ranks, in place on the device,
    on the current stream (no host copy; the host waits only when it reads the result)."""
    nccl = _nccl()
    dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
    if np.dtype(array.dtype) not in dtypes or not array.flags.c_contiguous:
        raise ValueError(f"NCCL sums contiguous float32/float64 arrays, got {array.dtype}")
    pointer = array.data.ptr
    communicator.allReduce(pointer, pointer, array.size, dtypes[np.dtype(array.dtype)],
                           nccl.NCCL_SUM, _cupy.cuda.get_current_stream().ptr)
