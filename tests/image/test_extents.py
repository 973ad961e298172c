import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.errors import FormatError, LayerError
from tidal.image.extents import Extent, ExtentMap


def model_apply(model: dict[int, tuple[int, bool]], e: Extent) -> None:
    for i in range(e.length_sectors):
        model[e.lba_sectors + i] = (e.data_offset_sectors + i if not e.zeroed else -1, e.zeroed)


@given(
    st.lists(
        st.tuples(st.integers(0, 200), st.integers(1, 40), st.integers(0, 10_000), st.booleans()),
        max_size=40,
    ),
    st.integers(0, 250),
    st.integers(0, 60),
)
@settings(max_examples=200, deadline=None)
def test_insert_and_lookup_match_a_sector_model(writes, q_lba, q_len) -> None:
    m = ExtentMap()
    model: dict[int, tuple[int, bool]] = {}
    for lba, n, off, z in writes:
        e = Extent(lba, n, 0 if z else off, z)
        m.insert(e)
        model_apply(model, e)
    items = list(m)
    assert all(a.end_sector <= b.lba_sectors for a, b in itertools.pairwise(items))
    segs = m.lookup(q_lba, q_len)
    assert sum(s.length_sectors for s in segs) == q_len
    pos = q_lba
    for s in segs:
        assert s.lba_sectors == pos
        for i in range(s.length_sectors):
            got = (
                None
                if s.extent is None
                else (-1 if s.extent.zeroed else s.extent.data_offset_sectors + i, s.extent.zeroed)
            )
            assert got == model.get(pos + i)
        pos += s.length_sectors
    c = m.compacted()
    assert len(c) <= len(m)
    for lba in range(0, 260):
        a, b = m.lookup(lba, 1)[0].extent, c.lookup(lba, 1)[0].extent
        assert (a is None) == (b is None)
        if a and b:
            assert (a.zeroed, a.data_offset_sectors if not a.zeroed else 0) == (
                b.zeroed,
                b.data_offset_sectors if not b.zeroed else 0,
            )
    assert list(ExtentMap.deserialize(c.serialize())) == list(c)


def test_rejects_overlap_and_bad_bytes() -> None:
    with pytest.raises(LayerError, match="overlap"):
        ExtentMap([Extent(0, 10, 0), Extent(5, 10, 10)])
    good = ExtentMap([Extent(0, 8, 0), Extent(16, 8, 8)]).serialize()
    with pytest.raises(FormatError, match="checksum"):
        ExtentMap.deserialize(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(FormatError, match="bad magic"):
        ExtentMap.deserialize(b"X" * 40)
    with pytest.raises(FormatError, match="too short"):
        ExtentMap.deserialize(b"TID")
