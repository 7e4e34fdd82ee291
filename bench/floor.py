"""The least a delivery can cost on this machine: one small write per client on bare sockets.

    uv run python -m bench.floor [--clients 1000 5000 10000]

N loopback connections are held by a reader process that drains them; this process sends one SSE
frame (the size of the bench's events) to each of them, 50 times 0.1 s apart, as a fan-out at
10 events/s does, and reports its CPU time per write. No HTTP, no asyncio, no Python beyond the
`send` loop: what is left is the kernel's cost of a write on loopback, which every relay pays once
per delivery however it is written.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import selectors
import socket
import time
from collections.abc import Sequence
from multiprocessing.synchronize import Event

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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[1_000, 5_000, 10_000])
    args = parser.parse_args(argv)
    raise_file_limit()
    for clients in args.clients:
        print(f"{clients:>6,} clients: {cpu_per_write(clients):.1f} µs CPU per write", flush=True)


if __name__ == "__main__":
    main()
