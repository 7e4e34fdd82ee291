"""An event as the relay keeps and sends it: relay id, type, data, and its SSE frame encoded once."""

from __future__ import annotations

import json
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Stored:
    id: str
    type: str
    data: str
    user_id: str | None
    key: tuple[int, int]  # `id` as a comparable pair
    frame: bytes  # `id:` / `event:` / `data:` lines, encoded once for every subscriber

    @classmethod
    def create(cls, relay_id: str, type: str, data: str) -> Stored:
        frame = encode_event(data, event=type, id=relay_id)
        return cls(relay_id, type, data, user_of(data), id_key(relay_id), frame)
