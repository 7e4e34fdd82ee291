"""The benchmark harness, run small so it cannot rot: 100 clients and 20 events against both servers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.client import BenchClient, Recorder, SSEConnection
from bench.floor import cpu_per_write

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _bench(output: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m bench --quick ARGS` in its own session: whatever it started is killed with it if
    it is still running when the test ends (a timeout, a failed assertion)."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", *args, "--output", str(output)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield bench
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()


def test_quick_fanout_delivers_everything_through_both_servers(tmp_path: Path) -> None:
    with _bench(tmp_path, "--scenario", "fanout-1k", "--repeat", "2") as bench:
        table, log = bench.communicate(timeout=90)
    assert bench.returncode == 0, table + log

    document = json.loads((tmp_path / "results.json").read_text())
    results = {r["server"]: r for r in document["results"]}  # the medians
    assert set(results) == {"relay", "naive"}
    runs = document["runs"]
    assert [r["server"] for r in runs] == ["relay", "naive", "relay", "naive"]
    for server, result in [*results.items(), *((r["server"], r) for r in runs)]:
        assert (result["clients"], result["expected"]) == (100, 2_000), server
        assert result["delivered"] == result["expected"], server
        assert (result["lost"], result["duplicates"], result["foreign"]) == (0, 0, 0), server
        assert result["failures"] == {}, server
        assert result["latency_ms"]["p99"] > 0, server
        assert result["cpu_per_delivery_us"] > 0, server
        assert result["cpu_per_connection_us"] > 0, server

    assert "| fanout-1k | relay " in table
    assert "| fanout-1k | naive " in table
    assert "| relay/naive " in table
    assert "Medians of 2 runs" in table
    assert re.search(
        r"CPU per delivery [\d.]+ of naive's \(at most 0\.333; runs: [\d.]+, [\d.]+\)", table
    )
    for run in (1, 2):
        assert (tmp_path / f"fanout-1k-relay-{run}" / "relay.log").exists()


def _session_members(session: int) -> list[int]:
    """The live processes of a session (zombies, already exited, are not)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # exited while being read
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # after the name: state, ppid, pgrp, sid
            members.append(int(stat.parent.name))
    return members


def test_sigterm_stops_the_bench_with_every_server_and_worker_it_started(tmp_path: Path) -> None:
    with _bench(tmp_path, "--scenario", "idle-10k", "--repeat", "1") as bench:
        relay_log = tmp_path / "idle-10k-relay" / "relay.log"
        deadline = time.monotonic() + 60
        while not (relay_log.exists() and "Uvicorn running" in relay_log.read_text()):
            assert bench.poll() is None, bench.communicate()
            assert time.monotonic() < deadline, "the relay did not start within 60 s"
            time.sleep(0.05)
        assert len(_session_members(bench.pid)) >= 3  # the bench, the simulator, the relay
        bench.send_signal(signal.SIGTERM)
        _, log = bench.communicate(timeout=60)
    assert bench.returncode == 128 + signal.SIGTERM, log
    assert "stopped by SIGTERM" in log
    # multiprocessing's resource tracker (spawn starts one) exits when it reads EOF from the bench,
    # so it may still be on its way out for a moment after the bench itself has gone.
    deadline = time.monotonic() + 10
    while (left := _session_members(bench.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


def _chunked(frames: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(frame), frame) for frame in frames)


@pytest.mark.parametrize("separator", ["\n", "\r\n"])
@pytest.mark.parametrize("piece", [0, 1, 7, 64, 100_000])  # 0: one read per chunk
async def test_the_bench_client_counts_events_however_the_stream_is_cut(
    separator: str, piece: int
) -> None:
    """The fast paths (one chunk per read) and the slow ones (any cut) count the same."""
    recorder = Recorder()
    client = BenchClient(0, "acct_a", "token", 3, recorder)
    connection = SSEConnection(client, b"")

    def frame(*lines: str) -> bytes:
        return (separator.join(lines) + separator * 2).encode()

    frames = [frame("retry: 3000", "event: connected", "data: {}")]
    for seq in (0, 1, 1, 2):  # 1 twice: a duplicate
        data = json.dumps({"seq": seq, "sent": time.time(), "account_id": "acct_a"})
        frames.append(frame(f"id: 17-{seq}", "event: call.incoming", f"data: {data}"))
    other = json.dumps({"seq": 0, "sent": time.time(), "account_id": "acct_b"})
    frames.append(frame("id: 17-9", "event: call.incoming", f"data: {other}"))
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    if piece:
        stream = head + _chunked(frames)
        reads = [stream[at : at + piece] for at in range(0, len(stream), piece)]
    else:
        reads = [head, *(_chunked([frame]) for frame in frames)]
    for read in reads:
        connection.data_received(read)

    assert client.is_open
    assert (client.distinct, client.duplicates, recorder.foreign) == (3, 1, 1)
    assert client.last_event_id == b"17-9"
    assert len(recorder.latencies) == 3
    assert b"Last-Event-ID: 17-9\r\n" in client.request("127.0.0.1", 1)


def test_the_write_floor_measures_something() -> None:
    assert (
        0 < cpu_per_write(50, rounds=5) < 10_000
    )  # µs per write: the command runs and reports a figure


def _run_module(*argv: str, timeout: float) -> str:
    """`python -m ARGV` in a process of its own, its standard output; it must exit 0. Its
    load-generator workers (and multiprocessing's resource tracker) are its children, not the
    suite's, and are killed with it if the test ends first."""
    command = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = command.communicate(timeout=timeout)
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()
    assert command.returncode == 0, out + err
    return out


def test_the_floor_command_reports_both_floors() -> None:
    # 500 clients: enough CPU for the 10 ms ticks of /proc to count on a fast machine too.
    out = _run_module("bench.floor", "--clients", "500", timeout=90)
    match = re.fullmatch(
        r"\s*500 clients: ([\d.]+) µs CPU per write, (\d+) µs CPU per connection \(uvicorn, "
        r"empty SSE app\)\n",
        out,
    )
    assert match, out
    assert float(match[1]) > 0
    assert int(match[2]) > 0


def test_the_instruction_count_runs_the_relay_under_callgrind() -> None:
    # valgrind is installed by .ci/run.
    out = _run_module("bench.instructions", "--clients", "20", timeout=240)
    match = re.fullmatch(
        r"([\d,]+) instructions per connection \(relay, user space, 19 clients\)\n", out
    )
    assert match is not None, out
    # A connection is some hundreds of thousands of instructions (about 300,000 in 2026-12).
    assert 10_000 < int(match[1].replace(",", "")) < 10_000_000
