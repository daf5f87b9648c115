"""Guards of a long-running command: a lock on the run folder, a stop flag set by
SIGINT/SIGTERM, a memory estimate checked before allocating, and one-sentence
messages for file-system errors.

No arrays here, so no dimension letters.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking (documented in docs/TRAINING.md)
    fcntl = None

# A request may use at most this fraction of the machine's physical memory.
MEMORY_FRACTION = 0.75
LOCK_NAME = "train.lock"


# ----------------------------------------------------------------------------- messages

def what_blocks_a_folder(path) -> str:
    """What stands at ``path`` where a folder should be, for an error sentence: a link
    whose target is missing (exists() is False there, yet mkdir fails), or a file."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    return "a file"


def os_error_sentence(err: OSError, wanted: str) -> str:
    """'cannot <wanted>: <reason>' for an OSError; the reason names the path involved."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.ENOSPC:
        reason = "no space left on the device"
    filename = getattr(err, "filename", None)
    if filename is not None and os.fspath(filename) not in wanted:
        reason += f" ({os.fspath(filename)})"
    return f"cannot {wanted}: {reason[0].lower() + reason[1:]}"


def naming(err: BaseException, path) -> BaseException:
    """``err``, when an OSError, with ``path`` as its file name: a write's ENOSPC names no
    file, and an atomic write's names its temporary; os_error_sentence then names the
    file meant. -> err, for ``raise guards.naming(err, path)``."""
    if isinstance(err, OSError):
        err.filename = os.fspath(path)
    return err


# ----------------------------------------------------------------------------- run folder lock

class RunFolderBusy(ValueError):
    """Another process holds the lock of a run folder."""


class RunLock:
    """An exclusive ``fcntl.flock`` on RUN/train.lock, held while a process writes into RUN.

    The kernel drops the lock when the holder exits in any way (a crash, kill -9), so
    no stale lock ever blocks a later run. The file holds the holder's process id, for
    the message a second writer gets. Use as a context manager; ``acquire(run_dir)``
    takes the lock (once the folder is known), leaving the context releases it.
    """

    def __init__(self):
        self._fd = None
        self.run_dir = None

    def acquire(self, run_dir) -> None:
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(os_error_sentence(err, f"lock the run folder {run_dir}")) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise RunFolderBusy(
                        f"the run folder {run_dir} is in use by another training process "
                        f"(pid {holder}); wait for it to end or stop it first") from None
                raise ValueError(os_error_sentence(err, f"lock the run folder {run_dir}")) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd, self.run_dir = fd, run_dir

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)          # closing the last descriptor drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------- stop signals

class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


# A second signal this soon after the first is the same request delivered twice: by
# mpiexec, which forwards it, and by a kill aimed at every process of the run (pkill -f).
SAME_REQUEST_S = 1.0

_early = {"signum": None, "at": 0.0}   # the signal noted before the command took over


def _note_early(signum, frame):
    if _early["signum"] is None:
        _early["signum"], _early["at"] = signum, time.monotonic()
    elif time.monotonic() - _early["at"] > SAME_REQUEST_S:   # a person's second Ctrl-C
        raise KeyboardInterrupt


def note_signals_until_handled() -> None:
    """From here until a command takes over (StopSignals, or the ranks' stop at their first
    reduction), SIGINT and SIGTERM only note the signal, which the command then acts on.
    npdraw/__init__.py calls it first thing in an MPI rank: a rank interrupted while still
    importing NumPy would exit alone and leave the others waiting in their first
    collective for ever. A second signal, later than a forwarded copy, interrupts."""
    if threading.current_thread() is threading.main_thread():
        for sig in StopSignals.SIGNALS:
            signal.signal(sig, _note_early)


def take_early_signal():
    """The signal noted since note_signals_until_handled (None if none), forgotten; the
    default handlers are back, for the command to install its own over them."""
    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler),
                             (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is _note_early:
                signal.signal(sig, default)
    signum, _early["signum"] = _early["signum"], None
    return signum


class StopSignals:
    """Context manager: the first SIGINT or SIGTERM only sets ``signum``; ``check()``,
    called between training steps, then raises StopRequested. A second signal raises
    StopRequested at once.

    Python runs a signal handler wherever the main thread happens to be, also inside a
    weakref callback or a __del__, where an exception is printed and dropped ("Exception
    ignored in ..."); with a flag the first stop cannot be lost that way. Outside the
    main thread (where handlers cannot be installed) nothing is installed and
    KeyboardInterrupt behaves as usual.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise StopRequested(signum)
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise StopRequested(self.signum)

    def take(self):
        """The noted signal (None if none), forgotten here: MPI ranks carry it into their
        next reduction instead (distributed.MPIRanks.deferred_interrupts)."""
        signum, self.signum = self.signum, None
        return signum

    def __enter__(self):
        self.signum = take_early_signal()          # one noted while the rank started
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


# ----------------------------------------------------------------------------- memory

def total_memory() -> int | None:
    """Physical memory of the machine in bytes, or None when it cannot be read."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page_size > 0:
            return int(pages) * int(page_size)
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit() -> int | None:
    """The most memory one request may need: MEMORY_FRACTION of the machine's."""
    total = total_memory()
    return None if total is None else int(total * MEMORY_FRACTION)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} PB"


class MemoryEstimateError(ValueError):
    """A request would need more memory than the limit (see memory_limit)."""


# The estimates (train.model_bytes and the like) count the arrays npdraw allocates, which
# tracemalloc bounds; a process holds more (issue 25, item 9). Peak RSS measured for
# `train --epochs 1` on an 8-unit model, batch 100, binarized MNIST, one process: 0.35 GB
# at --attention 2,5 (the imports 54 MB, the data set 0.22 GB in float32), 1.24 GB at
# 200,200 and 2.18 GB at 300,300 (5.04 GB at 500,500 in the issue), where model_bytes
# gives 0.009, 0.58, 1.21 and 3.17 GB: 1.5 bytes of RSS per byte counted, beyond the
# imports (evaluation and pictures beside the step's arrays, freed memory kept for reuse).
PROCESS_BYTES = 100 * 10**6     # Python and its libraries, before any array
RSS_PER_BYTE = 2.0              # peak RSS per byte of arrays counted (measured 1.5)


def peak_bytes(arrays: float, data: float = 0.0) -> float:
    """The peak memory (RSS) of a process whose counted arrays take ``arrays`` bytes, with
    a data set of ``data`` bytes loaded."""
    return PROCESS_BYTES + RSS_PER_BYTE * (float(arrays) + float(data))


def check_memory(nbytes: float, what: str, data_bytes: float = 0.0) -> None:
    """MemoryEstimateError when ``what``, whose arrays an estimate puts at ``nbytes`` (and
    with a data set of ``data_bytes`` loaded), would take more than memory_limit() bytes
    of the process's memory (peak_bytes)."""
    limit = memory_limit()
    needed = peak_bytes(nbytes, data_bytes)
    if limit is not None and needed > limit:
        raise MemoryEstimateError(
            f"{what} would need about {human_bytes(needed)} of memory, more than the limit of "
            f"{human_bytes(limit)} ({MEMORY_FRACTION:.0%} of this machine's "
            f"{human_bytes(total_memory())}); ask for less")
