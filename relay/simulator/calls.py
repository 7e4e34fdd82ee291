"""Realistic call lifecycles for one account, and the clock that plays them.

Inbound calls ring (`call.incoming`), then are answered (`call.answered`, sometimes followed by
`call.transfer`) or go unanswered, and always end (`call.end`); some calls are outbound
(`call.initiated`). Field shapes follow DialStack's documented payloads. Timings scale with
the interval between calls, so a test with a short interval sees whole lifecycles quickly.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

# Callers in the directory: some have multibyte names, which exercise UTF-8 handling downstream.
CALLER_NAMES = (
    "John Smith",
    "Emily Johnson",
    "Michael Brown",
    "Sarah Davis",
    "David Wilson",
    "Jessica Miller",
    "María García",
    "José Hernández",
    "Oliver Taylor",
    "Amelia Evans",
    "Harry Thompson",
    "Siobhán O'Brien",
    "Zoë Clarke",
    "Renée Dubois",
    "Björn Lindqvist",
    "Chloé Martin",
    "Aiyana Redcloud",
    "Priya Patel",
    "Wei Zhang",
    "Mohammed Al-Farsi",
    "WIRELESS CALLER",
    "ACME PLUMBING LLC",
)
UNKNOWN_CALLER_RATE = 0.25
UNROUTED_CALL_RATE = 0.3  # incoming calls not routed to a particular user (IVR, ring group)
OUTBOUND_RATE = 0.2
TRANSFER_RATE = 0.2
TRANSFER_EXTENSIONS = tuple(str(extension) for extension in range(1001, 1011))
MAX_ACTIVE_CALLS = 4  # per account; a short interval must not pile up calls without bound

_US_AREA_CODES = ("212", "303", "312", "404", "415", "512", "617", "206")
_ULID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _ulid(rng: random.Random) -> str:
    return "01" + "".join(rng.choice(_ULID_ALPHABET) for _ in range(24))


def _us_number(rng: random.Random) -> str:
    # 555-0100..0199 is reserved for fiction, so no real subscriber is ever shown.
    return f"+1{rng.choice(_US_AREA_CODES)}5550{rng.randint(100, 199)}"


def _uk_number(rng: random.Random) -> str:
    # Ofcom's drama ranges: 07700 900xxx (mobile) and 020 7946 0xxx (London).
    return rng.choice(("+447700900", "+442079460")) + f"{rng.randint(0, 999):03d}"


def _external_number(rng: random.Random) -> str:
    return _us_number(rng) if rng.random() < 0.7 else _uk_number(rng)


def _timestamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CallStep:
    after_seconds: float  # since the call started
    type: str
    data: dict[str, Any]


class CallPlanner:
    """Plans calls for one account; deterministic for a given random source."""

    def __init__(self, account_id: str, interval_seconds: float, rng: random.Random) -> None:
        self.account_id = account_id
        self.interval_seconds = interval_seconds
        self._rng = rng
        self.numbers = [_us_number(rng) for _ in range(2)]  # the account's own lines
        self.users = [f"user_{_ulid(rng)}" for _ in range(4)]
        self.callers = {name: _external_number(rng) for name in CALLER_NAMES}

    def gap(self) -> float:
        """Seconds until the next call starts."""
        return self.interval_seconds * self._rng.uniform(0.5, 1.5)

    def plan(self, started_at: datetime) -> list[CallStep]:
        if self._rng.random() < OUTBOUND_RATE:
            return self._outbound(started_at)
        return self._inbound(started_at)

    def _inbound(self, started_at: datetime) -> list[CallStep]:
        rng = self._rng
        base = self._base("call_" + _ulid(rng))
        name: str | None = None
        if rng.random() < UNKNOWN_CALLER_RATE:
            number = _external_number(rng)
        else:
            name = rng.choice(CALLER_NAMES)
            number = self.callers[name]
        base |= {"from_number": number, "to_number": rng.choice(self.numbers)}
        incoming = self._event("call.incoming", base) | {
            "from_name": name,
            "user_id": None if rng.random() < UNROUTED_CALL_RATE else rng.choice(self.users),
        }
        steps = [CallStep(0.0, "call.incoming", incoming)]
        ring = self.interval_seconds * rng.uniform(0.5, 1.5)
        outcome = rng.random()
        if outcome < 0.7:
            steps += self._conversation(base, "inbound", started_at, ring)
        else:
            status = "missed" if outcome < 0.9 else "voicemail"
            message = rng.uniform(0.2, 1.0) * self.interval_seconds if status == "voicemail" else 0
            ended = ring * 2 + message
            steps.append(self._end(base, "inbound", status, started_at, ended, message))
        return steps

    def _outbound(self, started_at: datetime) -> list[CallStep]:
        rng = self._rng
        base = self._base("call_" + _ulid(rng))
        base |= {"from_number": rng.choice(self.numbers), "to_number": _external_number(rng)}
        initiated = self._event("call.initiated", base) | {"user_id": rng.choice(self.users)}
        steps = [CallStep(0.0, "call.initiated", initiated)]
        ring = self.interval_seconds * rng.uniform(0.5, 1.5)
        if rng.random() < 0.75:
            steps += self._conversation(base, "outbound", started_at, ring)
        else:
            steps.append(self._end(base, "outbound", "no_answer", started_at, ring * 2, 0))
        return steps

    def _conversation(
        self, base: dict[str, Any], direction: str, started_at: datetime, ring: float
    ) -> list[CallStep]:
        rng = self._rng
        talk = self.interval_seconds * rng.uniform(1.0, 4.0)
        answered = self._event("call.answered", base) | {
            "direction": direction,
            "answered_at": _timestamp(started_at + timedelta(seconds=ring)),
        }
        steps = [CallStep(ring, "call.answered", answered)]
        if rng.random() < TRANSFER_RATE:
            transfer = self._event("call.transfer", base)
            transfer["transferred_to"] = rng.choice(TRANSFER_EXTENSIONS)
            steps.append(CallStep(ring + talk * rng.uniform(0.3, 0.7), "call.transfer", transfer))
        steps.append(self._end(base, direction, "completed", started_at, ring + talk, talk))
        return steps

    def _end(
        self,
        base: dict[str, Any],
        direction: str,
        status: str,
        started_at: datetime,
        after_seconds: float,
        duration: float,
    ) -> CallStep:
        end = self._event("call.end", base) | {
            "direction": direction,
            "status": status,
            "duration_seconds": round(duration),
            "ended_at": _timestamp(started_at + timedelta(seconds=after_seconds)),
        }
        return CallStep(after_seconds, "call.end", end)

    def _base(self, call_id: str) -> dict[str, Any]:
        return {"account_id": self.account_id, "call_id": call_id}

    @staticmethod
    def _event(event_type: str, base: dict[str, Any]) -> dict[str, Any]:
        return {"event": event_type, **base}


Emit = Callable[[str, dict[str, Any]], None]


async def play_calls(planner: CallPlanner, emit: Emit) -> None:
    """Start a call every `planner.gap()` seconds and emit each step on time, until cancelled.

    One task per account: pending steps of overlapping calls wait in a heap, so calls
    interleave without a task per call.
    """
    loop = asyncio.get_running_loop()
    order = itertools.count()  # ties on due time keep plan order
    pending: list[tuple[float, int, CallStep]] = []
    next_call = loop.time() + planner.gap()
    while True:
        due = min(next_call, pending[0][0]) if pending else next_call
        await asyncio.sleep(max(0.0, due - loop.time()))
        now = loop.time()
        if now >= next_call:
            active = sum(1 for _, _, step in pending if step.type == "call.end")
            if active < MAX_ACTIVE_CALLS:
                for step in planner.plan(datetime.now(UTC)):
                    heapq.heappush(pending, (now + step.after_seconds, next(order), step))
            next_call = now + planner.gap()
        while pending and pending[0][0] <= now:
            _, _, step = heapq.heappop(pending)
            emit(step.type, step.data)
