"""The one progress bar (downloads and epochs)."""
import io

from npdraw.progress import Progress


def test_bar_shows_the_count_rate_and_note_and_ends_its_line():
    stream = io.StringIO()
    bar = Progress("epoch 1/2", 12, True, rate_unit="it/s", stream=stream)
    for done in range(1, 13):
        bar.update(done, f"loss {100.0 / done:8.2f}")
    bar.close()
    last = stream.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("epoch 1/2  [" + "#" * 24 + "] 100.0%  12/12")
    assert "it/s" in last and last.rstrip().endswith("loss     8.33")
    assert stream.getvalue().endswith("\n")


def test_unknown_total_and_a_formatted_amount():
    stream = io.StringIO()
    bar = Progress("file.gz", None, True, amount=lambda n: f"{n / 1e6:.1f} MB", stream=stream)
    bar.update(2_500_000)
    bar.close()
    assert stream.getvalue().split("\r")[-1].strip() == "file.gz  2.5 MB"
    assert bar.done == 2_500_000


def test_disabled_bar_writes_nothing_but_counts():
    stream = io.StringIO()
    bar = Progress("x", 3, False, stream=stream)
    bar.update(3)
    bar.close()
    assert stream.getvalue() == "" and bar.done == 3
