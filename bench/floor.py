"""What a delivery and a connection cost on this machine before any relay logic: two floors.

    uv run python -m bench.floor [--clients 1000 5000 10000]

Write floor: N loopback connections are held by a reader process that drains them; this process
sends one SSE frame (the size of the bench's events) to each of them, 50 times 0.1 s apart, as a
fan-out at 10 events/s does, and reports its CPU time per write. No HTTP, no asyncio, no Python
beyond the `send` loop: what is left is the kernel's cost of a write on loopback, which every relay
pays once per delivery however it is written.

Connection floor: the bench's own clients connect to bench/empty_sse.py (uvicorn as the relay runs
it, with an app that only sends `connected`), and its CPU per connection is read from /proc as the
bench reads the relay's: what uvicorn, ASGI and the kernel cost before a token is checked.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import secrets
import selectors
import socket
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.synchronize import Event
from pathlib import Path

import uvloop

from bench import servers
from bench.fleet import Fleet
from bench.procstats import sample
from bench.run import HOST, worker_plans
from bench.scenarios import Scenario

ROUNDS = 50
ROUND_SECONDS = 0.1
READY_TIMEOUT_SECONDS = 60
_DATA = b'{"n": 1, "sent": 1763900000.123456, "call_id": "call_0123456789", "pad": "xxxxxxxx"}'
FRAME = b"id: 1763900000000-42\nevent: call.incoming\ndata: " + _DATA + b"\n\n"
CHUNK = b"%x\r\n%s\r\n" % (len(FRAME), FRAME)  # as it goes out in a chunked HTTP response


def raise_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def drain(port: int, clients: int, ready: Event) -> None:
    """The reader process: hold `clients` connections and read until the other side closes."""
    raise_file_limit()
    selector = selectors.EpollSelector()
    for _ in range(clients):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, data=sock)
    ready.set()
    open_count = clients
    while open_count:
        for key, _ in selector.select(timeout=5):
            sock = key.data
            if not sock.recv(65536):
                selector.unregister(sock)
                sock.close()
                open_count -= 1


def cpu_per_write(clients: int, rounds: int = ROUNDS) -> float:
    """Microseconds of this process's CPU per `send` of one frame to one client."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        ready = multiprocessing.Event()
        reader = multiprocessing.Process(
            target=drain, args=(listener.getsockname()[1], clients, ready)
        )
        reader.start()
        connections = []
        try:
            listener.settimeout(READY_TIMEOUT_SECONDS)
            for _ in range(clients):
                sock, _ = listener.accept()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvloop does
                connections.append(sock)
            if not ready.wait(READY_TIMEOUT_SECONDS):
                raise RuntimeError("the reader process did not connect")
            before = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(rounds):
                for sock in connections:
                    sock.send(CHUNK)
                time.sleep(ROUND_SECONDS)
            after = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            for sock in connections:
                sock.close()
            reader.join(READY_TIMEOUT_SECONDS)
            if reader.is_alive():
                reader.kill()
                reader.join()
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu / (clients * rounds) * 1e6


async def cpu_per_connection(clients: int) -> float:
    """Microseconds of bench/empty_sse.py's CPU per client connected, as the bench counts them."""
    scenario = Scenario("floor", clients, accounts=1, events_per_account=0, rate_per_account=0)
    with tempfile.TemporaryDirectory(prefix="relay-floor-") as workdir:
        async with servers.empty(Path(workdir), HOST) as server:
            plans = worker_plans(scenario, server.port, secrets.token_urlsafe(32))
            async with Fleet.started(plans) as fleet:
                before = sample(server.pid)
                connected = await fleet.connect(below=clients)
                after = sample(server.pid)
    if connected.opened < clients:
        raise RuntimeError(f"only {connected.opened} of {clients} clients connected")
    return (after.cpu_seconds - before.cpu_seconds) / clients * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1_000, 5_000, 10_000])
    args = parser.parse_args(argv)
    raise_file_limit()
    for clients in args.clients:
        write = cpu_per_write(clients)
        connection = uvloop.run(cpu_per_connection(clients))
        print(
            f"{clients:>6,} clients: {write:.1f} µs CPU per write, "
            f"{connection:.0f} µs CPU per connection (uvicorn, empty SSE app)",
            flush=True,
        )


if __name__ == "__main__":
    main()
