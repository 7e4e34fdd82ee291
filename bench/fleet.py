"""The load generator as the bench drives it: worker processes told the same command in step."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TypeVar

from bench.worker import (
    Collect,
    Collected,
    Command,
    Connect,
    Connected,
    Disconnect,
    Done,
    Ready,
    Reply,
    Stop,
    WorkerPlan,
    worker_main,
)

START_TIMEOUT_SECONDS = 60.0
# Each handshake is bounded by the worker; this only catches a worker that hangs or dies.
CONNECT_TIMEOUT_SECONDS = 900.0
STOP_TIMEOUT_SECONDS = 15.0

_R = TypeVar("_R", Ready, Connected, Collected, Done)


class BenchError(Exception):
    """The load generator itself failed (not the server under test)."""


@dataclass(frozen=True, slots=True)
class ConnectResult:
    opened: int
    seconds: float  # from the command until the last client saw its `connected` event


@dataclass(slots=True)
class Delivery:
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    foreign: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    failures: Counter[str] = field(default_factory=Counter)


class Fleet:
    def __init__(self, workers: list[tuple[BaseProcess, Connection]]) -> None:
        self._workers = workers

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, plans: Sequence[WorkerPlan]) -> AsyncIterator[Fleet]:
        """Worker processes with their clients ready (tokens minted), stopped on exit."""
        # Spawned, not forked: the bench runs an event loop and threads that a fork would copy.
        context = multiprocessing.get_context("spawn")
        workers: list[tuple[BaseProcess, Connection]] = []
        fleet = cls(workers)
        try:
            for plan in plans:
                ours, theirs = context.Pipe()
                process = context.Process(target=worker_main, args=(plan, theirs), daemon=True)
                process.start()
                theirs.close()
                workers.append((process, ours))
            await fleet._ask(None, START_TIMEOUT_SECONDS, Ready)
            yield fleet
        finally:
            await fleet._stop()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers if process.pid is not None]

    async def connect(self, below: int) -> ConnectResult:
        """Open the clients numbered below `below` that are not open."""
        started = time.perf_counter()
        replies = await self._ask(Connect(below), CONNECT_TIMEOUT_SECONDS, Connected)
        seconds = time.perf_counter() - started
        return ConnectResult(sum(r.opened for r in replies), seconds)

    async def collect(self, expected: int, timeout_seconds: float) -> Delivery:
        """Once every open client has `expected` events, or after `timeout_seconds`."""
        replies = await self._ask(
            Collect(expected, timeout_seconds), timeout_seconds + 60, Collected
        )
        total = Delivery()
        for reply in replies:
            total.delivered += reply.delivered
            total.duplicates += reply.duplicates
            total.lost += reply.lost
            total.foreign += reply.foreign
            total.latencies.frombytes(reply.latencies)
            total.failures.update(reply.failures)
        return total

    async def disconnect(self) -> None:
        await self._ask(Disconnect(), STOP_TIMEOUT_SECONDS, Done)

    async def _ask(self, command: Command | None, timeout: float, expected: type[_R]) -> list[_R]:
        if command is not None:
            for _, pipe in self._workers:
                pipe.send(command)
        replies = await asyncio.gather(*(self._reply(p, timeout) for _, p in self._workers))
        checked: list[_R] = []
        for reply in replies:
            if not isinstance(reply, expected):
                raise BenchError(f"a worker answered {reply!r} where {expected.__name__} was due")
            checked.append(reply)
        return checked

    @staticmethod
    async def _reply(pipe: Connection, timeout: float) -> Reply:
        if not await asyncio.to_thread(pipe.poll, timeout):
            raise BenchError(f"a load-generator worker did not answer within {timeout:.0f} s")
        try:
            reply: Reply = pipe.recv()
        except EOFError:
            raise BenchError("a load-generator worker died") from None
        return reply

    async def _stop(self) -> None:
        for _, pipe in self._workers:
            with contextlib.suppress(OSError):
                pipe.send(Stop())
        for process, pipe in self._workers:
            with contextlib.suppress(OSError, EOFError):
                await asyncio.to_thread(pipe.poll, STOP_TIMEOUT_SECONDS)
            await asyncio.to_thread(process.join, 5)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5)
            pipe.close()
