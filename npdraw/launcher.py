"""The parent of the MPI ranks that a command starts on this machine (--ranks).

`run(argv, environ)` runs MPICH's mpiexec as a child, in a session of its own, and stays
the process the user started, so that:

- a signal to it (Ctrl-C, a scheduler's SIGTERM, a hang-up as SIGTERM) reaches every
  rank once, sent to each rank directly as soon as the rank notes signals (its SigCgt in
  /proc shows SIGTERM caught: npdraw's first line). Through mpiexec a signal was lost
  when it came before the ranks were started, and ended a rank alone when it came
  before npdraw's first line; a second SIGINT to mpiexec kills the ranks, so mpiexec,
  in a session of its own, gets no copy from the terminal either. Without /proc
  (not Linux) signals go to mpiexec;
- a rank that dies (kill -9, the kernel's OOM killer, a crash) ends the job with one
  sentence and exit status 1, in place of MPICH's "BAD TERMINATION" banner and the
  rank's signal number as status. mpiexec itself ends the other ranks; past
  `END_GRACE_S` this process kills what is left;
- the shared-memory segments (/dev/shm/mpich_shm_*) that MPICH unlinks only at
  MPI_Finalize are removed when a rank could not reach it. The segments removed are the
  ones the job's ranks mapped (read from /proc/PID/maps while it runs) and ones created
  since it started that no process maps: never those of another live job;
- a signal that ends ranks before they could stop together (in the first milliseconds of
  a rank, before npdraw notes signals) still gives 130 or 143 and one sentence.

mpiexec's output passes through unchanged but for the banner's lines (and a rank's
KeyboardInterrupt traceback after a forwarded signal). If this process is killed with
SIGKILL, the kernel sends mpiexec SIGTERM (Linux's parent-death signal), which stops the
ranks as a scheduler's SIGTERM does.

No arrays here, so no dimension letters.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "mpich_shm_"
# After a rank's death mpiexec ends the others within a second or so; past this the
# launcher kills what is left (a rank stuck where mpiexec's signal cannot end it).
END_GRACE_S = 5.0
POLL_S = 0.1
MAPS_EVERY = 20                 # polls between two readings of the ranks' maps
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1

# The lines of MPICH's banner (Hydra prints it on mpiexec's stdout) and of MPI_Abort's
# notice; the information in them is kept for the one sentence.
_RULE = re.compile(rb"^={20,}\s*$")
_BANNER_LINE = re.compile(rb"^=   ")
_BANNER_PID = re.compile(rb"^=   PID (\d+) RUNNING AT")
_BANNER_CODE = re.compile(rb"^=   EXIT CODE: (\d+)")
_EXIT_STRING = re.compile(rb"^YOUR APPLICATION TERMINATED WITH THE EXIT STRING: (.*?)\s*$")
_TRAILERS = (b"This typically refers to a problem with your application.",
             b"Please see the FAQ page for debugging suggestions")
_ABORT_NOTICE = re.compile(rb"^Abort\(\d+\) on node \d+ \(rank \d+ in comm \d+\): "
                           rb"application called MPI_Abort")
# A rank whose peer died fails in MPI and aborts with an error stack, often before mpiexec
# has reported the death (then there is no banner): its head names the rank, its lines
# follow as "function(line)....: text".
_MPI_FATAL = re.compile(rb"^Abort\(\d+\) on node \d+ \(rank (\d+) in comm \d+\): (Fatal error.*)$")
_STACK_LINE = re.compile(rb"^[A-Za-z_]\w*\(\d+\)\.*: ")
# Lines in which the ranks themselves say why they stop (rank 0's account, or a failing
# rank's): the job's status is then theirs.
_RANKS_SPOKE = re.compile(rb"^(Error: |interrupted|training interrupted)")
# Hydra's notes when it passes on a Ctrl-C (where signals go through mpiexec)
_HYDRA_NOTE = re.compile(rb"^\[mpiexec@[^]]*\] (Sending Ctrl-C to processes as requested|"
                         rb"Press Ctrl-C again to force abort)\s*$")
_SIGNAL_STRING = re.compile(rb"signal (\d+)")
_RUN_DIR = re.compile(rb"^run dir: (.+?)\s*$")
# Partial lines that may still become one of the lines above are held back.
_HELD_PREFIXES = (b"=", b"YOUR APPLICATION", *_TRAILERS, b"Abort(", b"Traceback", b"[mpiexec@")


def _may_become_dropped(partial: bytes) -> bool:
    return any(p.startswith(partial) or partial.startswith(p) for p in _HELD_PREFIXES)


class OutputFilter:
    """One stream of mpiexec's output: feed(bytes) -> the bytes to pass on; finish() ->
    what is still held. What the banner said is kept in `pid`, `code` and `how`."""

    def __init__(self, report):
        self._report = report          # the Launcher, told of the run dir and the banner
        self._partial = b""
        self._blank = b""              # a blank line held: the banner starts with one
        self._traceback = []           # a traceback held until its last line is known
        self._passed_partial = False   # part of the current line is already out
        self._in_stack = False         # inside an MPI error stack

    def feed(self, data: bytes) -> bytes:
        out = []
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self._passed_partial:   # the rest of a line already let through
                self._passed_partial = False
                out.append(line + b"\n")
                continue
            out.append(self._line(line + b"\n"))
        if self._partial and not self._traceback and not _may_become_dropped(self._partial):
            out.append(self._flush_blank() + self._partial)   # a progress bar's \r line
            self._partial, self._passed_partial = b"", True
        return b"".join(out)

    def finish(self) -> bytes:
        held = self._flush_blank() + b"".join(self._traceback) + self._partial
        self._traceback, self._partial = [], b""
        return held

    def _flush_blank(self) -> bytes:
        blank, self._blank = self._blank, b""
        return blank

    def _line(self, line: bytes) -> bytes:
        text = line.rstrip(b"\r\n")
        if self._in_stack:
            if _STACK_LINE.match(text):
                return b""
            self._in_stack = False
            if not text.strip():
                return b""
        fatal = _MPI_FATAL.match(text)
        if fatal:                      # kept for the sentence, not shown
            self._report.mpi_failures.append((int(fatal.group(1)),
                                              fatal.group(2).decode(errors="replace")))
            self._in_stack = True
            return b""
        if _RANKS_SPOKE.match(text):
            self._report.ranks_spoke = True
        if self._traceback:
            self._traceback.append(line)
            if text[:1] in (b" ", b"\t") or not text:
                return b""
            held, self._traceback = b"".join(self._traceback), []
            if text.startswith(b"KeyboardInterrupt") and self._report.signals:
                return b""             # a rank interrupted before npdraw took over
            return held
        if text.startswith(b"Traceback (most recent call last):"):
            self._traceback = [self._flush_blank() + line]
            return b""
        match = _RUN_DIR.match(text)
        if match:
            self._report.run_dir = match.group(1).decode(errors="replace")
        if not text.strip():
            held, self._blank = self._blank, line
            return held
        if _RULE.match(text) or _BANNER_LINE.match(text):
            self._blank = b""
            self._report.saw_banner = True
            for pattern, field in ((_BANNER_PID, "banner_pid"), (_BANNER_CODE, "banner_code")):
                found = pattern.match(text)
                if found:
                    setattr(self._report, field, int(found.group(1)))
            return b""
        found = _EXIT_STRING.match(text)
        if found:
            self._report.saw_banner = True
            self._report.exit_string = found.group(1).decode(errors="replace")
            return b""
        if text in _TRAILERS or _ABORT_NOTICE.match(text) or _HYDRA_NOTE.match(text):
            return b""
        return self._flush_blank() + line


# ----------------------------------------------------------------------------- /proc

def _children(pid: int) -> list:
    """The process ids whose parent is ``pid`` (Linux /proc; [] elsewhere)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                found.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _rank_of(pid: int):
    """The MPI rank (PMI_RANK) of process ``pid``, or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            for item in fh.read().split(b"\0"):
                if item.startswith(b"PMI_RANK="):
                    return int(item[len(b"PMI_RANK="):])
    except (OSError, ValueError):
        pass
    return None


def _mapped_segments(pid: int) -> set:
    """The names of the MPICH segments in /dev/shm that process ``pid`` maps."""
    names = set()
    try:
        with open(f"/proc/{pid}/maps", "rb") as fh:
            for line in fh:
                fields = line.split(None, 5)       # the sixth, when there, is the path
                path = fields[5].strip() if len(fields) == 6 else b""
                if path.startswith(b"/dev/shm/" + SHM_PREFIX.encode()):
                    names.add(path[len(b"/dev/shm/"):].split(b" ")[0].decode(errors="replace"))
    except OSError:
        pass
    return names


def _state_of(pid: int):
    """(state letter or None when gone, wait status of a zombie or None) of ``pid``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None, None
    state = fields[0].decode(errors="replace") if fields else None
    # field 52, exit_code (Linux 3.5+), is the wait status once the process has ended
    status = int(fields[49]) if state == "Z" and len(fields) > 49 else None
    return state, status


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (its SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def segments_in_use() -> set:
    """Every MPICH segment that some process this user can see maps."""
    used = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return used
    for name in entries:
        if name.isdigit():
            used |= _mapped_segments(int(name))
    return used


def _segments_now() -> dict:
    """name -> (inode, creation-ish time) of the MPICH segments in /dev/shm."""
    found = {}
    try:
        for entry in os.scandir(SHM_DIR):
            if entry.name.startswith(SHM_PREFIX):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_uid == os.getuid():
                    found[entry.name] = (st.st_ino, st.st_ctime)
    except OSError:
        pass
    return found


# ----------------------------------------------------------------------------- the parent

class Launcher:
    """One run of mpiexec; see the module's docstring."""

    def __init__(self, argv, environ):
        self.argv, self.environ = list(argv), dict(environ)
        self.run_dir = None            # from the output's "run dir: " line
        self.saw_banner = False
        self.ranks_spoke = False       # a rank said why the job stops
        self.mpi_failures = []         # (rank, "Fatal error ...") of ranks failing in MPI
        self.gone = {}                 # rank pid -> (when it was seen gone, its wait status)
        self.banner_pid = self.banner_code = None
        self.exit_string = ""
        self.ranks = {}                # pid -> rank, as seen while the job ran
        self.proxies = set()           # mpiexec's children (hydra_pmi_proxy)
        self.segments = set()          # the MPICH segments the ranks mapped
        self._proc = None
        self._polls = 0
        try:                           # the rank count, from mpiexec's "-n R"
            self._expected = int(self.argv[self.argv.index("-n") + 1])
        except (ValueError, IndexError):
            self._expected = 1 << 30   # unknown: keep looking
        self.signals = []              # every SIGINT and SIGTERM received, in order
        self._sent = {}                # rank pid -> how many of them it was sent
        self._ready = set()            # ranks seen catching SIGTERM
        # Signals go to the ranks themselves where /proc shows them (Linux), else to
        # mpiexec, which passes them on to the ranks it has started.
        self.direct = os.path.exists(f"/proc/{os.getpid()}/status")

    # -- signals

    def _on_signal(self, signum, frame):
        # a hang-up becomes SIGTERM: the ranks stop as a scheduler asks them to
        self.signals.append(signal.SIGTERM if signum == signal.SIGHUP else signum)
        if not self.direct and self._proc is not None:
            try:
                os.kill(self._proc.pid, self.signals[-1])
            except OSError:
                pass

    def _deliver(self):
        """Pass every signal received on to every rank, each once, as soon as the rank
        notes signals (npdraw's first line catches SIGTERM, which Python alone does not:
        earlier, a signal would end the rank alone, or be lost in mpiexec, which passes a
        signal only to the ranks it has started by then)."""
        for pid in self.ranks:
            sent = self._sent.get(pid, 0)
            if sent >= len(self.signals):
                continue
            if pid not in self._ready:     # once it noted signals, a rank gets them at once
                if not _catches_sigterm(pid):
                    continue
                self._ready.add(pid)
            for signum in self.signals[sent:]:
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass
            self._sent[pid] = len(self.signals)

    # -- the run

    def _start(self):
        prctl = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                prctl = ctypes.CDLL(None, use_errno=True).prctl
            except (OSError, AttributeError):
                pass

        def child_setup():             # mpiexec gets SIGTERM if this process dies
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        return subprocess.Popen(self.argv, env=self.environ, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=child_setup)

    def _relay(self, source, sink):
        filt = OutputFilter(self)
        fd = source.fileno()
        out = sink.buffer if hasattr(sink, "buffer") else sink
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            chunk = filt.feed(data) if data else filt.finish()
            if chunk:
                try:
                    out.write(chunk)
                    out.flush()
                except (OSError, ValueError):
                    pass               # the user's terminal went away: keep draining
            if not data:
                return

    def _watch(self):
        """Note the ranks (pid -> rank), which of them have ended, and the segments they
        map. /proc is scanned for new ranks only until all have been seen, and the maps
        read every MAPS_EVERY polls: the poll costs the ranks' cores little."""
        if len(self.ranks) < self._expected:
            proxies = _children(self._proc.pid)
            self.proxies.update(proxies)
            for proxy in proxies:
                for pid in _children(proxy):
                    if pid not in self.ranks:
                        rank = _rank_of(pid)
                        if rank is not None:
                            self.ranks[pid] = rank
        self._polls += 1
        for pid in list(self.ranks):
            if pid in self.gone:
                continue
            state, status = _state_of(pid)
            if state in (None, "Z"):   # ended (a zombie still shows how, until reaped)
                self.gone[pid] = (time.monotonic(), status)
            elif not self.segments or self._polls % MAPS_EVERY == 0:
                self.segments |= _mapped_segments(pid)

    def _kill_rest(self):
        """SIGKILL to mpiexec, its proxies and every rank seen (each in a group of its own)."""
        for pid in (self._proc.pid, *self.proxies, *self.ranks):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def remove_leftover_segments(self, before: dict, started: float) -> list:
        """Remove the job's MPICH segments that no process maps any more: those its ranks
        mapped, and those created since it started (not in `before`). -> their names."""
        now = _segments_now()
        candidates = {name for name in now if name in self.segments}
        candidates |= {name for name, (ino, ctime) in now.items()
                       if before.get(name, (None,))[0] != ino and ctime >= started - 1}
        if not candidates:
            return []
        in_use = segments_in_use()
        removed = []
        for name in sorted(candidates - in_use):
            try:
                (SHM_DIR / name).unlink()
                removed.append(name)
            except OSError:
                pass
        return removed

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED}
        before, started = _segments_now(), time.time()
        try:
            self._proc = self._start()
            if not self.direct:
                for signum in self.signals:
                    os.kill(self._proc.pid, signum)
            relays = [threading.Thread(target=self._relay, args=(pipe, sink), daemon=True)
                      for pipe, sink in ((self._proc.stdout, sys.stdout),
                                         (self._proc.stderr, sys.stderr))]
            for relay in relays:
                relay.start()
            deadline = None
            while self._proc.poll() is None:
                self._watch()
                self._deliver()
                if self.saw_banner and deadline is None:
                    deadline = time.monotonic() + END_GRACE_S
                if deadline is not None and time.monotonic() > deadline:
                    self._kill_rest()
                time.sleep(POLL_S)
            for relay in relays:
                relay.join(timeout=2.0)
            status = self._proc.returncode
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.remove_leftover_segments(before, started)
        return self._outcome(status)

    # -- what the user is told

    def _dead_rank(self):
        """(rank or None, signal number or None, exit code or None) of the rank that died
        first: the one mpiexec's banner names, else the first seen gone of those that did
        not fail in MPI themselves (None when none is known)."""
        if self.saw_banner:
            rank = self.ranks.get(self.banner_pid) if self.banner_pid is not None else None
            found = _SIGNAL_STRING.search(self.exit_string.encode())
            return rank, int(found.group(1)) if found else None, self.banner_code
        if not self.mpi_failures:
            return None
        failed = {rank for rank, _ in self.mpi_failures}
        ended = sorted((when, pid) for pid, (when, _) in self.gone.items()
                       if self.ranks[pid] not in failed)
        if ended:                      # seen gone first, without an MPI error of its own
            pid = ended[0][1]
        else:                          # gone between two polls: the one rank without one
            silent = [pid for pid, rank in self.ranks.items() if rank not in failed]
            if len(silent) != 1:
                return None
            pid = silent[0]
        status = self.gone.get(pid, (None, None))[1]
        if status is None:
            return self.ranks[pid], None, None
        return self.ranks[pid], (status & 0x7F) or None, (status >> 8) & 0xFF

    def _outcome(self, status: int) -> int:
        if status == 0:
            return 0
        dead = self._dead_rank()
        if self.ranks_spoke and (dead is None or dead[1] is None):
            return status                      # the ranks said what happened
        if self.signals:                       # ranks ended by the signal passed on
            name = signal.Signals(self.signals[0]).name
            code = 128 + self.signals[0]       # 130 for SIGINT, 143 for SIGTERM (a hang-up's too)
            _say(f"interrupted ({name}); the ranks ended before they could stop together; "
                 + self._where(), prefix="")
            return code
        if dead is None:
            if self.mpi_failures:
                rank, what = self.mpi_failures[0]
                _say(f"rank {rank} failed in MPI ({what}); the run stops; " + self._where())
            else:
                _say(f"mpiexec ended with status {status}; " + self._where())
            return 1
        rank, signum, code = dead
        who = f"rank {rank}" if rank is not None else (
            f"a rank (pid {self.banner_pid})" if self.banner_pid is not None else "a rank")
        if signum is not None:
            try:
                what = f"was killed ({signal.Signals(signum).name}, signal {signum})"
            except ValueError:
                what = f"was killed (signal {signum})"
        elif code:
            what = f"ended alone with status {code}"
        else:
            what = "was killed or crashed"
        _say(f"{who} {what}; the run stops; " + self._where())
        return 1

    def _where(self) -> str:
        """Where a training run stands: its last checkpoint, checked by loading it."""
        if not self.run_dir:
            return "nothing was written"
        path = Path(self.run_dir) / "checkpoint.h5"
        if not path.exists():
            return f"no checkpoint was saved yet in {self.run_dir}"
        try:
            from .checkpoint import load_checkpoint
            epoch = load_checkpoint(path).epoch
        except Exception as err:              # noqa: BLE001 - reported, not raised
            return f"its checkpoint {path} cannot be read ({err})"
        return (f"the last checkpoint (epoch {epoch}) is intact: resume with "
                f"--resume {self.run_dir}")


def _say(sentence: str, prefix: str = "Error: ") -> None:
    sys.stdout.flush()
    sys.stderr.write(f"{prefix}{sentence}\n")
    sys.stderr.flush()


def run(argv, environ) -> int:
    """Run mpiexec's `argv` with `environ` as this process's child; -> the exit status for
    this process (see the module's docstring)."""
    return Launcher(argv, environ).run()
