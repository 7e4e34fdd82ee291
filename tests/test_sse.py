"""The SSE parser against WHATWG HTML 9.2.6 "Interpreting an event stream", and the encoder."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sse import Event, LineTooLong, SSEParser, encode_comment, encode_event


def parse(stream: bytes, chunk_size: int | None = None) -> list[Event]:
    parser = SSEParser()
    if chunk_size is None:
        return parser.feed(stream)
    events: list[Event] = []
    for start in range(0, len(stream), chunk_size):
        events.extend(parser.feed(stream[start : start + chunk_size]))
    return events


def data_of(stream: bytes, chunk_size: int | None = None) -> list[str]:
    return [event.data for event in parse(stream, chunk_size)]


# --- The spec's own examples -------------------------------------------------------------------


def test_spec_example_stock_ticker_joins_data_lines_with_lf() -> None:
    events = parse(b"data: YHOO\ndata: +2\ndata: 10\n\n")

    assert events == [Event(type="message", data="YHOO\n+2\n10", id=None, last_event_id="")]


def test_spec_example_four_blocks_with_comment_and_ids() -> None:
    stream = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
    )

    assert parse(stream) == [
        Event(type="message", data="first event", id="1", last_event_id="1"),
        Event(type="message", data="second event", id="", last_event_id=""),
        Event(type="message", data=" third event", id=None, last_event_id=""),
    ]


def test_spec_example_bare_data_fields_and_unterminated_last_block() -> None:
    # Empty data, then a single LF; the last block has no blank line, so it is discarded.
    assert data_of(b"data\n\ndata\ndata\n\ndata:") == ["", "\n"]


def test_spec_example_space_after_colon_is_optional() -> None:
    assert data_of(b"data:test\n\ndata: test\n\n") == ["test", "test"]


# --- Line endings -------------------------------------------------------------------------------


@pytest.mark.parametrize("line_end", [b"\n", b"\r", b"\r\n"])
def test_each_line_ending_separates_lines(line_end: bytes) -> None:
    stream = line_end.join([b"event: call.updated", b"data: a", b"data: b", b"", b""])

    assert parse(stream) == [Event(type="call.updated", data="a\nb", id=None, last_event_id="")]


def test_mixed_line_endings_in_one_stream() -> None:
    assert data_of(b"data: a\rdata: b\r\ndata: c\n\r\n") == ["a\nb\nc"]


def test_cr_at_end_of_chunk_and_lf_at_start_of_next_are_one_line_ending() -> None:
    parser = SSEParser()

    assert parser.feed(b"data: a\r") == []
    # Were the LF a second line ending, this blank line would dispatch "a" on its own.
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == [Event(type="message", data="a\nb", id=None, last_event_id="")]


def test_cr_then_cr_across_chunks_is_a_blank_line() -> None:
    parser = SSEParser()

    assert parser.feed(b"data: a\r") == []
    assert [event.data for event in parser.feed(b"\r")] == ["a"]


def test_lf_after_a_consumed_crlf_is_a_blank_line() -> None:
    parser = SSEParser()
    parser.feed(b"data: a\r")
    parser.feed(b"\n")

    assert [event.data for event in parser.feed(b"\n")] == ["a"]


# --- Decoding -----------------------------------------------------------------------------------


def test_utf8_character_split_across_chunks() -> None:
    stream = "data: é€😀\n\n".encode()

    assert data_of(stream, chunk_size=1) == ["é€😀"]


def test_invalid_utf8_becomes_replacement_characters() -> None:
    # A lone continuation byte, then a truncated three-byte sequence cut off by the line end.
    assert data_of(b"data: \x80a\xe2\x82\n\n") == ["\ufffda\ufffd"]


def test_one_bom_at_stream_start_is_stripped() -> None:
    assert data_of(b"\xef\xbb\xbfdata: x\n\n") == ["x"]


def test_bom_split_across_chunks_is_stripped() -> None:
    assert data_of(b"\xef\xbb\xbfdata: x\n\n", chunk_size=1) == ["x"]


def test_only_one_bom_is_stripped() -> None:
    # The second BOM makes the field name "\ufeffdata", which is unknown.
    assert parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n") == [
        Event(type="message", data="y", id=None, last_event_id="")
    ]


def test_bom_after_stream_start_is_data() -> None:
    assert data_of(b"data: \xef\xbb\xbfx\n\n") == ["\ufeffx"]
    assert data_of(b"data: a\n\xef\xbb\xbfdata: b\n\n") == ["a"]


# --- Fields -------------------------------------------------------------------------------------


def test_comment_lines_are_ignored() -> None:
    assert parse(b": keep-alive\n:\ndata: x\n: between\n\n: trailing\n\n") == [
        Event(type="message", data="x", id=None, last_event_id="")
    ]


def test_value_is_everything_after_the_first_colon() -> None:
    assert data_of(b'data: {"a": "b:c"}\n\n') == ['{"a": "b:c"}']


def test_only_one_leading_space_is_removed() -> None:
    assert data_of(b"data:   x \n\n") == ["  x "]


def test_line_without_colon_is_a_field_with_empty_value() -> None:
    assert parse(b"event: call.updated\nevent\ndata\n\n") == [
        Event(type="message", data="", id=None, last_event_id="")
    ]


def test_event_field_sets_the_type_of_this_block_only() -> None:
    events = parse(b"event: call.ringing\ndata: a\n\ndata: b\n\n")

    assert [event.type for event in events] == ["call.ringing", "message"]


def test_empty_event_field_means_message() -> None:
    assert [event.type for event in parse(b"event:\ndata: a\n\n")] == ["message"]


def test_blank_line_without_data_resets_the_event_type() -> None:
    assert [event.type for event in parse(b"event: call.ringing\n\ndata: a\n\n")] == ["message"]


def test_unknown_fields_are_ignored() -> None:
    assert parse(b"Data: no\nfoo: bar\n\ndata: x\nfoo: bar\n\n") == [
        Event(type="message", data="x", id=None, last_event_id="")
    ]


def test_unterminated_last_event_is_not_dispatched() -> None:
    parser = SSEParser()

    assert parser.feed(b"data: complete\n\ndata: pending\n") == [
        Event(type="message", data="complete", id=None, last_event_id="")
    ]
    assert parser.feed(b"data: still pending") == []


# --- id -----------------------------------------------------------------------------------------


def test_event_id_is_none_without_an_id_field_and_set_with_one() -> None:
    events = parse(b"data: a\n\nid: 7\ndata: b\n\n")

    assert [(event.id, event.last_event_id) for event in events] == [(None, ""), ("7", "7")]


def test_last_event_id_persists_across_events() -> None:
    events = parse(b"id: 1\ndata: a\n\ndata: b\n\ndata: c\n\n")

    assert [(event.id, event.last_event_id) for event in events] == [
        ("1", "1"),
        (None, "1"),
        (None, "1"),
    ]


@pytest.mark.parametrize("reset_line", [b"id", b"id:", b"id: "])
def test_empty_id_resets_last_event_id(reset_line: bytes) -> None:
    parser = SSEParser()
    events = parser.feed(b"id: 1\ndata: a\n\n" + reset_line + b"\ndata: b\n\n")

    assert [(event.id, event.last_event_id) for event in events] == [("1", "1"), ("", "")]
    assert parser.last_event_id == ""


def test_id_containing_nul_is_ignored() -> None:
    parser = SSEParser()
    events = parser.feed(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")

    assert [(event.id, event.last_event_id) for event in events] == [("1", "1"), (None, "1")]
    assert parser.last_event_id == "1"


def test_last_event_id_advances_at_blank_line_even_without_data() -> None:
    parser = SSEParser()

    assert parser.feed(b"id: 9\n\n") == []
    assert parser.last_event_id == "9"


def test_parser_last_event_id_waits_for_the_blank_line() -> None:
    # Reconnecting with "2" while its event is incomplete would make the upstream skip it.
    parser = SSEParser()
    parser.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n")

    assert parser.last_event_id == "1"
    assert parser.feed(b"\n") == [Event(type="message", data="b", id="2", last_event_id="2")]
    assert parser.last_event_id == "2"


# --- retry --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [(b"retry: 1000", 1000), (b"retry:0", 0)])
def test_retry_with_only_digits_sets_reconnection_time(line: bytes, expected: int) -> None:
    parser = SSEParser()
    parser.feed(line + b"\n")

    assert parser.retry_ms == expected


@pytest.mark.parametrize(
    "value",
    [b"10s", b"-1", b" 1000", b"", b"1e3", b"1 000", "\u0661\u0660\u00b2".encode(), b"9" * 5000],
)
def test_retry_that_is_not_only_ascii_digits_is_ignored(value: bytes) -> None:
    parser = SSEParser()
    parser.feed(b"retry: 500\nretry: " + value + b"\n")

    assert parser.retry_ms == 500


def test_retry_is_none_until_seen() -> None:
    parser = SSEParser()
    parser.feed(b"data: a\n\n")

    assert parser.retry_ms is None


# --- Long lines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4096])
def test_200kb_line_in_small_chunks(chunk_size: int) -> None:
    payload = "é" * 100_000 + "x"
    stream = f"data: {payload}\n\n".encode()

    assert data_of(stream, chunk_size) == [payload]


def test_line_longer_than_limit_raises_when_pending() -> None:
    parser = SSEParser(max_line_bytes=10)
    parser.feed(b"data: 1234")

    with pytest.raises(LineTooLong):
        parser.feed(b"5")


def test_complete_line_longer_than_limit_raises() -> None:
    with pytest.raises(LineTooLong):
        SSEParser(max_line_bytes=10).feed(b"data: 12345\n\n")


def test_line_at_the_limit_is_accepted_and_line_end_does_not_count() -> None:
    parser = SSEParser(max_line_bytes=10)

    assert [event.data for event in parser.feed(b"data: 1234\r\n\r\n")] == ["1234"]


# --- Encoder ------------------------------------------------------------------------------------


def test_encode_event_with_all_fields() -> None:
    encoded = encode_event('{"n": 1}', event="call.updated", id="42", retry_ms=3000)

    assert encoded == b'retry: 3000\nid: 42\nevent: call.updated\ndata: {"n": 1}\n\n'


def test_encode_event_data_only() -> None:
    assert encode_event("é") == "data: é\n\n".encode()


def test_encode_event_splits_data_on_every_line_ending() -> None:
    encoded = encode_event("a\r\nb\rc\nd")

    assert encoded == b"data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert data_of(encoded) == ["a\nb\nc\nd"]


def test_encode_event_empty_data_dispatches_empty_event() -> None:
    encoded = encode_event("")

    assert encoded == b"data: \n\n"
    assert data_of(encoded) == [""]


def test_encode_event_keeps_leading_spaces_of_values() -> None:
    encoded = encode_event(" a", event=" t", id=" 1")

    assert parse(encoded) == [Event(type=" t", data=" a", id=" 1", last_event_id=" 1")]


@pytest.mark.parametrize(
    ("event", "id", "retry_ms"),
    [
        ("a\nb", None, None),
        ("a\rb", None, None),
        ("", None, None),
        (None, "1\n", None),
        (None, "1\r", None),
        (None, "1\x002", None),
        (None, None, -1),
    ],
)
def test_encode_event_refuses_injection_and_bad_retry(
    event: str | None, id: str | None, retry_ms: int | None
) -> None:
    with pytest.raises(ValueError, match=r"."):
        encode_event("x", event=event, id=id, retry_ms=retry_ms)


def test_encode_comment() -> None:
    assert encode_comment() == b": \n\n"
    assert encode_comment("ping") == b": ping\n\n"


def test_encode_comment_keeps_every_line_inside_the_comment() -> None:
    encoded = encode_comment("a\ndata: injected\r\nevent: x\r")

    assert encoded == b": a\n: data: injected\n: event: x\n: \n\n"
    assert parse(encoded + encode_event("real")) == [
        Event(type="message", data="real", id=None, last_event_id="")
    ]


def test_heartbeat_between_events_changes_nothing() -> None:
    stream = encode_event("a", event="t", id="1") + encode_comment() + encode_event("b")

    assert parse(stream) == [
        Event(type="t", data="a", id="1", last_event_id="1"),
        Event(type="message", data="b", id=None, last_event_id="1"),
    ]


# --- Properties ---------------------------------------------------------------------------------

_NO_LINE_BREAK = st.characters(codec="utf-8", exclude_characters="\r\n")
_EVENT_TYPES = st.none() | st.text(_NO_LINE_BREAK, min_size=1)
_IDS = st.none() | st.text(st.characters(codec="utf-8", exclude_characters="\r\n\0"))
_RETRIES = st.none() | st.integers(min_value=0, max_value=2**64 - 1)
_EVENTS = st.lists(
    st.tuples(st.text(st.characters(codec="utf-8")), _EVENT_TYPES, _IDS, _RETRIES), max_size=8
)


@settings(max_examples=300, deadline=None)
@given(_EVENTS)
def test_encode_then_parse_round_trips(
    events: list[tuple[str, str | None, str | None, int | None]],
) -> None:
    parser = SSEParser()
    stream = b"".join(encode_event(data, event, id, retry) for data, event, id, retry in events)
    expected: list[Event] = []
    last_event_id = ""
    for data, event, id, _ in events:
        last_event_id = last_event_id if id is None else id
        normalised = re.sub(r"\r\n|\r", "\n", data)
        expected.append(Event(event or "message", normalised, id, last_event_id))
    retries = [retry for *_, retry in events if retry is not None]

    assert parser.feed(stream) == expected
    assert parser.last_event_id == last_event_id
    assert parser.retry_ms == (retries[-1] if retries else None)


_FRAGMENTS = st.sampled_from(
    [
        b"data:",
        b"data: ",
        b"event: t",
        b"id: 1",
        b"id",
        b"retry: 10",
        b": c",
        b"x",
        b" ",
        b"\r",
        b"\n",
        b"\r\n",
        b"\xef\xbb\xbf",
        "é€😀".encode(),
        b"\x00",
    ]
)
_STREAMS = st.lists(_FRAGMENTS | st.binary(max_size=4), max_size=40).map(b"".join)


def _feed_all(parser: SSEParser, chunks: list[bytes]) -> list[Event]:
    return [event for chunk in chunks for event in parser.feed(chunk)]


@settings(max_examples=300, deadline=None)
@given(_STREAMS, st.data())
def test_any_chunking_gives_the_same_events_as_feeding_whole(
    stream: bytes, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [
        stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True)
    ]
    whole, chunked, bytewise = SSEParser(), SSEParser(), SSEParser()

    expected = whole.feed(stream)

    assert _feed_all(chunked, chunks) == expected
    assert _feed_all(bytewise, [bytes([byte]) for byte in stream]) == expected
    for parser in (chunked, bytewise):
        assert (parser.last_event_id, parser.retry_ms) == (whole.last_event_id, whole.retry_ms)


@settings(max_examples=300, deadline=None)
@given(st.lists(_STREAMS | st.binary(), max_size=6))
def test_arbitrary_bytes_only_raise_line_too_long_and_dispatch_at_blank_lines(
    chunks: list[bytes],
) -> None:
    parser = SSEParser(max_line_bytes=32)
    events: list[Event] = []
    blank_lines = re.split(rb"\r\n|\r|\n", b"".join(chunks))[:-1].count(b"")
    with contextlib.suppress(LineTooLong):
        for chunk in chunks:
            events.extend(parser.feed(chunk))

    assert len(events) <= blank_lines


def test_endless_data_lines_without_a_blank_line_are_capped() -> None:
    parser = SSEParser(max_line_bytes=1000)
    for _ in range(19):  # 19 lines of 51 characters fit
        parser.feed(b"data: " + b"x" * 50 + b"\n")
    with pytest.raises(LineTooLong):
        parser.feed(b"data: " + b"x" * 50 + b"\n")
