"""The faults a simulated DialStack can inject, and how they shape the bytes of an event stream.

Every byte-level fault keeps the stream valid for a WHATWG parser as far as the well-formed
events go: junk lines are comments or fields a spec parser ignores, and a stream cut in the
middle of a frame never reaches the blank line that would dispatch it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

LineEnding = Literal["\n", "\r\n", "\r"]

# Lines a spec parser must ignore. None is a bare `data`, `event`, `id` or a valid `retry`,
# which would change the events. Field names are case-sensitive and include leading spaces,
# so `Event` and ` data` are unknown fields too.
GARBAGE_LINES = (
    ": junk",
    ":",
    ": 日本語のコメント — commentaire été",
    "foo: bar",
    "x-dialstack-trace: 8f14e45fceea167a",
    "nonsense",
    "retry: abc",
    "retry: 12x",
    "Event: wrong-case field names are not fields",
    " data: a leading space makes this an unknown field",
)

# Data of the extra `call.garbled` events: well-formed frames whose data is not JSON, which a
# relay must forward as they are.
GARBLED_DATA = (
    '{"event":"call.incoming","from_number":"+1415',
    "not json at all",
    "{'event': 'call.end'}",
    '{"event":"call.answered",}',
)

_GARBAGE_BEFORE_FRAME = 0.5
_GARBAGE_AFTER_LINE = 0.3
_MAX_PIECE_BYTES = 7


@dataclass
class Faults:
    """What goes wrong, all off by default; a live simulator reads it afresh on every decision."""

    drop_every_seconds: float | None = None  # close each /v1/events stream after this long
    drop_mid_event: bool = False  # when dropping, cut the next call event's frame in two
    split_writes: bool = False  # write frames in random pieces of a few bytes
    line_ending: LineEnding = "\n"
    garbage_lines: bool = False  # junk lines in and between frames, and `call.garbled` events
    session_lifetime_seconds: float = 3600.0  # lifetime given to new sessions
    # Switching it on revokes every session issued so far (401, and their streams close);
    # sessions issued afterwards are valid, so a client that refetches its session recovers.
    expire_sessions_early: bool = False
    fail_status: int | None = None  # answer /v1/events with this status ...
    fail_count: int = 0  # ... for this many next requests (then normally again)
    retry_after_seconds: int | None = None  # Retry-After sent with a 429 or 503 failure
    first_byte_delay_seconds: float = 0.0  # wait before the response headers of /v1/events
    send_ids: bool = True  # `id:` line on each call event
    heartbeat_seconds: float | None = None  # `: keep-alive` comments this often


def render_frame(
    lines: list[str], line_ending: LineEnding, garbage: random.Random | None = None
) -> bytes:
    """One frame: `lines`, each ended by `line_ending`, then the blank line that dispatches it.

    With a `garbage` random source, junk lines go before the frame (that is, between frames)
    and after some of its lines.
    """
    out: list[str] = []
    if garbage is not None and garbage.random() < _GARBAGE_BEFORE_FRAME:
        out.append(garbage.choice(GARBAGE_LINES))
    for line in lines:
        out.append(line)
        if garbage is not None and garbage.random() < _GARBAGE_AFTER_LINE:
            out.append(garbage.choice(GARBAGE_LINES))
    return ("".join(line + line_ending for line in out) + line_ending).encode()


def event_lines(event_type: str, data: str, id: str | None) -> list[str]:
    lines = [] if id is None else [f"id: {id}"]
    lines.append(f"event: {event_type}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return lines


def cut_frame(frame: bytes, line_ending: LineEnding, rng: random.Random) -> bytes:
    """A non-empty prefix of `frame` that stops before its dispatching blank line.

    The cut may fall anywhere else, including inside a CRLF pair or a multibyte character.
    """
    return frame[: rng.randint(1, len(frame) - len(line_ending))]


def split_pieces(chunk: bytes, rng: random.Random) -> list[bytes]:
    """`chunk` in pieces of 1 to a few bytes, so boundaries fall inside CRLF and UTF-8 sequences."""
    pieces: list[bytes] = []
    start = 0
    while start < len(chunk):
        end = start + rng.randint(1, _MAX_PIECE_BYTES)
        pieces.append(chunk[start:end])
        start = end
    return pieces
