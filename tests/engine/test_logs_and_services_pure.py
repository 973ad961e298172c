"""Pure parts of the engine corrections: ``logs --tail`` offsets, the init's service states."""

from __future__ import annotations

import io
import re

from hypothesis import given
from hypothesis import strategies as st

from tidal.engine.containers import tail_offset
from tidal.engine.richinit import ServiceState, parse_service_states


def _tail_model(data: bytes, n: int) -> bytes:
    """``tail -n``: lines end at a newline; a last line without one still counts."""
    lines = re.findall(rb"[^\n]*\n|[^\n]+$", data)
    return b"".join(lines[-n:]) if n > 0 else b""


@given(
    st.lists(st.sampled_from([b"a", b"bc", b"\n", b"\n\n", b"xyz\n"]), max_size=60),
    st.integers(0, 30),
    st.integers(1, 9),
)
def test_tail_offset_matches_tail_n(parts: list[bytes], n: int, block: int) -> None:
    data = b"".join(parts)
    off = tail_offset(io.BytesIO(data), n, block=block)
    assert data[off:] == _tail_model(data, n)


def test_tail_offset_examples() -> None:
    assert tail_offset(io.BytesIO(b"one\ntwo\nthree\n"), 2) == 4
    assert tail_offset(io.BytesIO(b"one\ntwo\nthree"), 1) == 8
    assert tail_offset(io.BytesIO(b"one\n"), 5) == 0
    assert tail_offset(io.BytesIO(b""), 3) == 0


def test_service_states_parse_and_skip_garbage() -> None:
    text = (
        "main\trunning\t0\t10\t-\t7\n"
        "ticker\tgave-up\t10\t10\t1\t0\n"
        "bogus line\n"
        "x\tweird-state\t0\t0\t-\t0\n"
        "y\texited\tnot-a-number\t0\t-\t0\n"
    )
    assert parse_service_states(text) == (
        ServiceState("main", "running", 0, 10, None, 7),
        ServiceState("ticker", "gave-up", 10, 10, 1, 0),
    )
