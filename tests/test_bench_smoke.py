"""The benchmark harness, run small so it cannot rot: 100 clients and 20 events against both servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_fanout_delivers_everything_through_both_servers(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench", "--scenario", "fanout-1k", "--quick"]
    # Its own session, so a timeout takes the servers and workers it started down with it.
    bench = subprocess.Popen(
        [*command, "--output", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        table, log = bench.communicate(timeout=90)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    assert bench.returncode == 0, table + log

    document = json.loads((tmp_path / "results.json").read_text())
    results = {r["server"]: r for r in document["results"]}
    assert set(results) == {"relay", "naive"}
    for server, result in results.items():
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
    assert (tmp_path / "fanout-1k-relay" / "relay.log").exists()
