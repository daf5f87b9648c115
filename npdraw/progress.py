"""A one-line text progress bar on stderr (carriage return, no tqdm): downloads and epochs."""
from __future__ import annotations

import sys
import time


class Progress:
    """label [#####.....]  42.0%  done/total  rate  note, redrawn at most ten times a second.

    total: the count at completion, or None when unknown (then no bar). amount formats a
    count (bytes as MB for a download); rate_unit, if given, adds done per second.
    """

    def __init__(self, label: str, total, enabled: bool, amount=str, rate_unit: str = "",
                 stream=None, width: int = 24):
        self.label, self.total, self.enabled = label, total, enabled
        self.amount, self.rate_unit, self.width = amount, rate_unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.note = 0, ""
        self._start = self._last = time.monotonic()
        self._shown = False

    def update(self, done: int, note: str = "") -> None:
        """Set the count done so far (and a note shown after it)."""
        self.done, self.note = done, note
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or done == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now) -> None:
        parts = [self.label]
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(round(self.width * frac))
            parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}%")
            parts.append(f"{self.amount(self.done)}/{self.amount(self.total)}")
        else:
            parts.append(self.amount(self.done))
        if self.rate_unit:
            parts.append(f"{self.done / max(now - self._start, 1e-9):6.1f} {self.rate_unit}")
        if self.note:
            parts.append(self.note)
        self.stream.write("\r" + "  ".join(parts) + " ")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled and (self._shown or self.done):
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
