"""The one progress bar (downloads, epochs, evaluations), drawn by tqdm on stderr.

On a terminal tqdm redraws one line in place, with the rate and an ETA. When stderr is
not a terminal (a log file, a pipe, a batch job), carriage returns would pile up into one
enormous line, so the bar writes a plain line at most every ``PLAIN_EVERY_S`` seconds and
one at the end instead.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

PLAIN_EVERY_S = 30.0      # seconds between two plain lines when stderr is not a terminal
# tqdm's line for a count with a format of its own (bytes as MB): by known total or not.
_AMOUNT_FORMATS = {True: "{desc}  {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
                   False: "{desc}  [{elapsed}]"}


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):         # a closed stream
        return False


class Progress:
    """label  42%|#####     | done/total [elapsed<eta, rate]  note.

    total: the count at completion, or None when unknown (then no bar and no ETA). amount
    formats a count (bytes as MB for a download); rate_unit, if given, names the unit of
    the rate. enabled False: nothing is written, the count is still kept. terminal: draw
    in place (default: whether ``stream`` is a terminal); else plain lines.
    """

    def __init__(self, label: str, total, enabled: bool, amount=str, rate_unit: str = "",
                 stream=None, terminal=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.amount, self.rate_unit = amount, rate_unit
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = _is_terminal(self.stream) if terminal is None else bool(terminal)
        self.done, self.note = 0, ""
        self._bar = None
        self._start = self._last_plain = time.monotonic()
        if enabled and self.terminal:
            self._bar = tqdm(total=total, desc=label, file=self.stream, leave=True,
                             unit=rate_unit.split("/")[0] if rate_unit else "it",
                             dynamic_ncols=True, mininterval=0.1, ascii=True,
                             bar_format=None if amount is str else _AMOUNT_FORMATS[bool(total)])

    def update(self, done: int, note: str = "") -> None:
        """Set the count done so far (and a note shown after it)."""
        step, self.done, self.note = done - self.done, done, note
        if not self.enabled:
            return
        if self._bar is not None:
            desc = self.label
            if self.amount is not str:       # the count in its own unit (MB), not tqdm's
                desc += f"  {self.amount(done)}" + (f"/{self.amount(self.total)}"
                                                    if self.total else "")
            if note:
                desc += f"  {note}"
            self._bar.set_description_str(desc, refresh=False)
            self._bar.update(step)
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_EVERY_S and done != self.total:
            self._last_plain = now
            self._plain(now)

    def plain_line(self, now=None) -> str:
        """The state as one line: label, percent, count, rate, ETA and note."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        parts = [self.label]
        if self.total:
            parts.append(f"{100.0 * min(1.0, self.done / self.total):5.1f}%")
            parts.append(f"{self.amount(self.done)}/{self.amount(self.total)}")
        else:
            parts.append(self.amount(self.done))
        if self.rate_unit:
            parts.append(f"{self.done / elapsed:.1f} {self.rate_unit}")
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        if self.total and 0 < self.done < self.total:
            left = (self.total - self.done) * elapsed / self.done
            parts.append(f"ETA {tqdm.format_interval(left)}")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def _plain(self, now) -> None:
        self.stream.write(self.plain_line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done:
            self._plain(time.monotonic())
