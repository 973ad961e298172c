import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidal.errors import FormatError
from tidal.image.merged import MergedView
from tidal.image.trace import Trace, TraceRange, TraceRecorder, coalesce


def test_recorder_records_first_access_in_order() -> None:
    t = iter([0.0, 0.010, 0.020, 0.030])
    rec = TraceRecorder(MergedView([], 1 << 20), clock=lambda: next(t))
    assert rec.read(8192, 100) == bytes(100)
    rec.read(0, 4096)
    rec.read(8192, 10)  # same page again: not recorded twice
    tr = rec.trace()
    assert [(r.lba_sectors, r.length_sectors, r.first_access_ms) for r in tr.ranges] == [
        (16, 1, 10),
        (0, 8, 20),
    ]
    assert Trace.deserialize(tr.serialize()) == tr


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 50)), max_size=30))
def test_coalesce_covers_exactly_the_same_sectors(pairs) -> None:
    ranges = [TraceRange(a, n, i) for i, (a, n) in enumerate(pairs)]
    merged = coalesce(ranges)
    covered = {s for r in ranges for s in range(r.lba_sectors, r.lba_sectors + r.length_sectors)}
    assert {
        s for r in merged for s in range(r.lba_sectors, r.lba_sectors + r.length_sectors)
    } == covered
    assert all(
        a.lba_sectors + a.length_sectors < b.lba_sectors for a, b in itertools.pairwise(merged)
    )


def test_bad_trace_bytes() -> None:
    good = Trace((TraceRange(1, 2, 3),)).serialize()
    with pytest.raises(FormatError, match="checksum"):
        Trace.deserialize(good[:-1] + b"\xff")
    with pytest.raises(FormatError, match="bad magic"):
        Trace.deserialize(b"x" * 30)
