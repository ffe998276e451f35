"""reproduce.core.progress: plain lines in a log, byte amounts in human units, resumed loops."""
from __future__ import annotations

import io

from reproduce.core.progress import Progress, _amount


def test_bytes_are_shown_in_human_units():
    assert _amount(512, "B") == "512 B"
    assert _amount(1_500_000, "B") == "1.5 MB"
    assert _amount(19_000_000_000, "B") == "19.0 GB"
    assert _amount(7, "images") == "7"


def test_a_resumed_download_logs_from_its_offset_without_carriage_returns():
    stream = io.StringIO()
    with Progress(4_000_000, "kitti.zip", unit="B", initial=1_000_000, every=1_000_000,
                  stream=stream) as bar:
        for _ in range(3):
            bar.update(1_000_000)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(",")[0] for line in lines] == [
        "kitti.zip: 2.0 MB of 4.0 MB", "kitti.zip: 3.0 MB of 4.0 MB", "kitti.zip: 4.0 MB of 4.0 MB"]


def test_unknown_total_prints_the_amount_only():
    stream = io.StringIO()
    with Progress(0, "dl", unit="B", every=10, stream=stream) as bar:
        bar.update(2_000)
    assert stream.getvalue().startswith("dl: 2.0 kB,")
