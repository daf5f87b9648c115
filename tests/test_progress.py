"""The one progress bar (downloads, epochs, evaluations), on tqdm."""
import io

from npdraw import progress as progress_lib
from npdraw.progress import Progress


def test_terminal_bar_shows_the_count_rate_and_note_and_ends_its_line():
    stream = io.StringIO()
    bar = Progress("epoch 1/2", 12, True, rate_unit="it/s", stream=stream, terminal=True)
    for done in range(1, 13):
        bar.update(done, f"loss {100.0 / done:8.2f}")
    bar.close()
    last = stream.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("epoch 1/2  loss     8.33")
    assert "100%" in last and "12/12" in last and "it/s" in last
    assert stream.getvalue().endswith("\n")


def test_plain_lines_when_not_a_terminal(monkeypatch):
    """No carriage returns: a line every PLAIN_EVERY_S seconds with an ETA, and the last."""
    clock = iter(float(t) for t in range(0, 1000, 10))
    monkeypatch.setattr(progress_lib.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress_lib, "PLAIN_EVERY_S", 25.0)
    stream = io.StringIO()
    bar = Progress("evaluating 10 batches", 10, True, rate_unit="it/s", stream=stream)
    assert not bar.terminal
    for done in range(1, 11):
        bar.update(done)
    bar.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and 2 <= len(lines) <= 5
    assert "ETA" in lines[0] and lines[0].startswith("evaluating 10 batches")
    assert "100.0%  10/10" in lines[-1] and "ETA" not in lines[-1]


def test_unknown_total_and_a_formatted_amount():
    stream = io.StringIO()
    bar = Progress("file.gz", None, True, amount=lambda n: f"{n / 1e6:.1f} MB", stream=stream)
    bar.update(2_500_000)
    bar.close()
    assert stream.getvalue().startswith("file.gz  2.5 MB  elapsed")
    assert bar.done == 2_500_000
    stream = io.StringIO()
    bar = Progress("file.gz", None, True, amount=lambda n: f"{n / 1e6:.1f} MB", stream=stream,
                   terminal=True)
    bar.update(2_500_000)
    bar.close()
    assert stream.getvalue().split("\r")[-1].startswith("file.gz  2.5 MB  [00:00]")
    stream = io.StringIO()
    bar = Progress("file.gz", 4_000_000, True, amount=lambda n: f"{n / 1e6:.1f} MB",
                   stream=stream, terminal=True)
    bar.update(1_000_000)
    bar.close()
    assert stream.getvalue().split("\r")[-1].startswith("file.gz  1.0 MB/4.0 MB   25%|")


def test_disabled_bar_writes_nothing_but_counts():
    for terminal in (True, False):
        stream = io.StringIO()
        bar = Progress("x", 3, False, stream=stream, terminal=terminal)
        bar.update(3)
        bar.close()
        assert stream.getvalue() == "" and bar.done == 3
