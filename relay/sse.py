"""Incremental parser and encoder for Server-Sent Events, to the WHATWG HTML spec (9.2.6).

The parser sees every upstream byte, so it works on whole chunks with C-level bytes operations
and keeps only the incomplete last line between chunks. Lines are split on bytes before they
are decoded: CR and LF never occur inside a UTF-8 sequence and end any malformed one, so
decoding each line on its own gives exactly what decoding the whole stream would, and a
multibyte character split across chunks is simply part of the pending line.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Chromium ignores a `retry` value that does not fit an unsigned 64-bit integer; doing the
# same also keeps int() away from Python's limit on the length of decimal strings.
_MAX_RETRY_MS = 2**64 - 1
_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"
# Data lines of one event are joined into a string this many at a time, so that endless short
# `data:` lines hold memory in proportion to their characters, not an object per line.
_DATA_LINES_PER_PIECE = 256


class Event(NamedTuple):  # immutable, and built in a third of a frozen dataclass's time
    type: str
    data: str
    # The `id` field of this very block, if it had one: what de-duplication keys on.
    id: str | None
    # The stream's last event ID when this event was dispatched; persists across events.
    last_event_id: str


class LineTooLong(ValueError):
    """An upstream line, or the data of one event, grew past the parser's limit; drop the stream."""


class SSEParser:
    """Turns an event stream, fed in chunks of any size, into dispatched events.

    `last_event_id` is the value a browser would send as `Last-Event-ID` on reconnection: the
    last-event-ID buffer as of the latest dispatch point (blank line). An `id` line of an event
    whose blank line has not arrived yet does not count, so a reconnect never skips that event.
    """

    def __init__(self, max_line_bytes: int = 8 * 1024 * 1024) -> None:
        self.retry_ms: int | None = None
        self.last_event_id = ""
        self._max_line_bytes = max_line_bytes
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._after_cr = False
        self._at_stream_start = True
        self._data: list[str] = []  # data lines of the current event since the last piece
        self._data_pieces: list[str] = []  # earlier data lines, joined
        # Characters of the event's data: endless `data:` lines must not grow memory either.
        self._data_size = 0
        self._event_type = ""
        self._id_buffer = ""
        self._block_id: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse `chunk` and return the events it completes, in order.

        Raises LineTooLong when a line exceeds `max_line_bytes` (line ending excluded).
        """
        if self._after_cr and chunk.startswith(b"\n"):
            # The LF of a CRLF that straddles two chunks: that line already ended at the CR.
            chunk = chunk[1:]
            self._after_cr = False
        if not chunk:
            return []
        self._after_cr = chunk.endswith(b"\r")
        # bytes.splitlines breaks on exactly CRLF, LF and CR, unlike str.splitlines.
        lines = chunk.splitlines()
        tail = b"" if chunk.endswith((b"\n", b"\r")) else lines.pop()
        continued = self._pending_size  # of the line this chunk's first one continues
        if lines and self._pending:
            self._pending.append(lines[0])
            lines[0] = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
        if tail:
            self._pending.append(tail)
            self._pending_size += len(tail)
        limit = self._max_line_bytes
        # No line can be longer than the chunk and what it continues: most chunks need no look.
        if continued + len(chunk) > limit and (
            self._pending_size > limit or max(map(len, lines), default=0) > limit
        ):
            raise LineTooLong(f"SSE line longer than {limit} bytes")
        events: list[Event] = []
        for line in lines:
            self._process_line(line.decode("utf-8", "replace"), events)
        return events

    def _process_line(self, line: str, events: list[Event]) -> None:
        if self._at_stream_start:
            self._at_stream_start = False
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            return
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self._max_line_bytes:
                raise LineTooLong(f"SSE event data longer than {self._max_line_bytes} characters")
            if len(self._data) == _DATA_LINES_PER_PIECE:
                self._data_pieces.append("\n".join(self._data))
                self._data = []
        elif field == "event":
            self._event_type = value
        elif field == "id":
            if "\0" not in value:
                self._id_buffer = value
                self._block_id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            digits = value.lstrip("0") or "0"
            if len(digits) <= 20 and int(digits) <= _MAX_RETRY_MS:
                self.retry_ms = int(digits)

    def _dispatch(self, events: list[Event]) -> None:
        self.last_event_id = self._id_buffer
        if self._data or self._data_pieces:
            # Joining the data lines is the spec's "append value and LF, then drop the last LF".
            event_type = self._event_type or "message"
            data = "\n".join([*self._data_pieces, *self._data])
            events.append(Event(event_type, data, self._block_id, self.last_event_id))
        self._data = []
        self._data_pieces = []
        self._data_size = 0
        self._event_type = ""
        self._block_id = None


def encode_event(
    data: str, event: str | None = None, id: str | None = None, retry_ms: int | None = None
) -> bytes:
    """One event block; every line break in `data` becomes a `data:` line of its own."""
    lines: list[str] = []
    if retry_ms is not None:
        if retry_ms < 0:
            raise ValueError("retry_ms must be >= 0")
        lines.append(f"retry: {retry_ms}")
    if id is not None:
        if "\r" in id or "\n" in id or "\0" in id:
            raise ValueError("SSE id must not contain CR, LF or NUL")
        lines.append(f"id: {id}")
    if event is not None:
        if not event or "\r" in event or "\n" in event:
            raise ValueError("SSE event type must be non-empty and free of CR and LF")
        lines.append(f"event: {event}")
    if "\n" in data or "\r" in data:
        lines.extend(f"data: {line}" for line in _LINE_END.split(data))
    else:  # one line, as a JSON payload is: no split
        lines.append(f"data: {data}")
    return ("\n".join(lines) + "\n\n").encode()


def encode_comment(text: str = "") -> bytes:
    """A comment block, e.g. a heartbeat; each line of `text` stays inside the comment.

    The trailing blank line makes the comment a block of its own for clients and proxies that
    frame on blank lines, so it is flushed and delivered rather than held until the next event.
    To a spec client it is a no-op: it is only ever written between events, where the data
    buffer is empty, so the blank line dispatches nothing.
    """
    lines = [f": {line}" for line in _LINE_END.split(text)]
    return ("\n".join(lines) + "\n\n").encode()
