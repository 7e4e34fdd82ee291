"""Issue 8, fuzzing the SSE parser: arbitrary bytes in arbitrary chunkings.

The parser reads every upstream byte, so whatever arrives it must only ever return events or raise
LineTooLong, hold no more than its cap, and hand the relay events it can always re-encode: a
client parsing the relay's frames sees the same types and data, and nothing the upstream wrote
beyond them. The example counts are the ones reported in docs/hardening.md.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sse import Event, LineTooLong, SSEParser, encode_event

RUNS_CHUNKING = 1000
RUNS_BOUNDS = 1000
RUNS_TRANSPARENCY = 1000
RUNS_MANY_DATA_LINES = 200

# Pieces that make parsers go wrong: fields, separators, every line ending, BOMs, NULs, broken and
# split UTF-8, plus arbitrary bytes.
_PIECES = st.sampled_from(
    [
        b"data",
        b"data:",
        b"data: ",
        b"event:",
        b"event: call.x",
        b"id:",
        b"id: 7",
        b"retry:",
        b"retry: 10",
        b":",
        b" ",
        b"\r",
        b"\n",
        b"\r\n",
        b"\n\n",
        b"\xef\xbb\xbf",
        b"\x00",
        b"\xff",
        b"\xc3",
        b"\xe2\x9c",
        "é✓😀".encode(),
    ]
)
WIRE = st.lists(_PIECES | st.binary(max_size=24), max_size=60).map(b"".join) | st.binary(
    max_size=600
)


def chunked(wire: bytes, cuts: list[int]) -> Iterator[bytes]:
    """`wire` cut at the given offsets (any, in any order)."""
    edges = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    return (wire[a:b] for a, b in itertools.pairwise(edges))


def parse(chunks: Iterator[bytes] | list[bytes]) -> list[Event]:
    parser = SSEParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


@settings(max_examples=RUNS_CHUNKING, deadline=None)
@given(WIRE, st.lists(st.integers(min_value=0), max_size=40))
def test_any_bytes_in_any_chunking_give_the_events_of_the_whole(
    wire: bytes, cuts: list[int]
) -> None:
    assert parse(chunked(wire, cuts)) == parse([wire])


@settings(max_examples=RUNS_BOUNDS, deadline=None)
@given(WIRE, st.lists(st.integers(min_value=0), max_size=40), st.integers(4, 64))
def test_a_small_cap_is_the_only_error_and_bounds_what_is_held(
    wire: bytes, cuts: list[int], cap: int
) -> None:
    parser = SSEParser(max_line_bytes=cap)
    for chunk in chunked(wire, cuts):
        try:
            events = parser.feed(chunk)
        except LineTooLong:
            return  # the relay drops the connection and starts over with a new parser
        # Held between chunks: at most one partial line and one event's data, each under the cap.
        assert sum(map(len, parser._pending)) <= cap
        assert parser._data_size <= cap
        for event in events:
            assert len(event.data) <= cap
            assert event.type


@settings(max_examples=RUNS_MANY_DATA_LINES, deadline=None)
@given(
    st.lists(
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=8),
        max_size=1200,
    )
)
def test_an_event_of_many_data_lines_keeps_every_line(lines: list[str]) -> None:
    wire = "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
    expected = [Event("message", "\n".join(lines), None, "")] if lines else []
    assert parse([wire]) == expected


def _relay_frames(events: list[Event]) -> bytes:
    """What the relay writes for these events: its own id, the upstream's type and data."""
    return b"".join(
        encode_event(event.data, event=event.type, id=f"1700000000000-{n}")
        for n, event in enumerate(events, 1)
    )


@settings(max_examples=RUNS_TRANSPARENCY, deadline=None)
@given(WIRE, st.lists(st.integers(min_value=0), max_size=20))
def test_relayed_events_parse_back_to_the_same_types_and_data_and_nothing_else(
    wire: bytes, cuts: list[int]
) -> None:
    upstream = parse(chunked(wire, cuts))
    client = SSEParser()
    seen = client.feed(_relay_frames(upstream))
    assert [(e.type, e.data) for e in seen] == [(e.type, e.data) for e in upstream]
    # Ids are the relay's own and the upstream's retry never comes through.
    assert [e.id for e in seen] == [f"1700000000000-{n}" for n in range(1, len(seen) + 1)]
    assert client.retry_ms is None


# -- bounded memory, measured ----------------------------------------------------------------------

MIB = 2**20


def peak_while(feed: Callable[[SSEParser], None]) -> int:
    """Peak bytes allocated while `feed` runs against a parser capped at 1 MiB."""
    parser = SSEParser(max_line_bytes=MIB)
    tracemalloc.start()
    try:
        feed(parser)
        peak: int = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak


def flood(parser: SSEParser, piece: bytes, total: int) -> None:
    chunk = piece * (64 * 1024 // len(piece))
    for _ in range(total // len(chunk)):
        parser.feed(chunk)


@pytest.mark.parametrize(
    ("start", "piece"),
    [(b"data: ", b"x"), (b"event: ", b"call."), (b"", b"no colon "), (b"", b"data: abcdefgh\n")],
    ids=["data-value", "event-type", "field-name", "data-lines-without-blank-line"],
)
def test_an_endless_line_or_event_stops_at_the_cap_in_bounded_memory(
    start: bytes, piece: bytes
) -> None:
    def endless(parser: SSEParser) -> None:
        parser.feed(start)
        with pytest.raises(LineTooLong):
            flood(parser, piece, 64 * MIB)

    assert peak_while(endless) < 4 * MIB


@pytest.mark.parametrize(
    "field",
    [b":", b"id: ", b"event: ", b"retry: 1", b"x-unknown: "],
    ids=["comments", "ids", "event-types", "retries", "unknown-fields"],
)
def test_endless_lines_that_dispatch_nothing_hold_no_memory(field: bytes) -> None:
    line = field + b"7" * (63 - len(field)) + b"\n"

    def endless(parser: SSEParser) -> None:
        flood(parser, line, 4 * MIB)

    assert peak_while(endless) < MIB // 4
