"""An event as the relay keeps and sends it: relay id, type, data, and its SSE frame encoded once."""

from __future__ import annotations

import enum
import json
from typing import Final

from relay.sse import encode_event


def user_of(data: str) -> str | None:
    """The `user_id` of a JSON object payload, for per-user scoping; None when absent or not JSON."""
    if not data.startswith("{") or '"user_id"' not in data:
        return None
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    user = payload.get("user_id") if isinstance(payload, dict) else None
    return user if isinstance(user, str) else None


def id_key(relay_id: str) -> tuple[int, int]:
    """Relay ids are `<milliseconds>-<sequence>` (the shape of a Redis Stream id); they order as pairs.

    Raises ValueError for anything else, so a made-up Last-Event-ID is told apart from a real one.
    """
    ms, sep, seq = relay_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit() or len(relay_id) > 41:
        raise ValueError(f"not a relay id: {relay_id[:41]!r}")
    return int(ms), int(seq)


class _Unread(enum.Enum):
    UNREAD = enum.auto()


class Stored:
    """Immutable (its fields are Final) and shared by every subscriber and replay of the event.

    `user_id` is read from the payload the first time a per-user filter asks for it: an account
    whose clients all take every user's events never has its payloads parsed.
    """

    __slots__ = ("_user_id", "data", "frame", "id", "key", "type")

    def __init__(self, relay_id: str, type: str, data: str) -> None:
        self.id: Final = relay_id
        self.type: Final = type
        self.data: Final = data
        self.key: Final = id_key(relay_id)  # `id` as a comparable pair
        # `id:` / `event:` / `data:` lines, encoded once for every subscriber.
        self.frame: Final = encode_event(data, event=type, id=relay_id)
        self._user_id: str | _Unread | None = _Unread.UNREAD

    @property
    def user_id(self) -> str | None:
        user = self._user_id
        if user is _Unread.UNREAD:
            user = self._user_id = user_of(self.data)
        return user
