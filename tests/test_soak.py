"""Issue 8's soak, CI-sized: a minute of client churn plus event traffic against the relay as a process.

`python -m bench.soak --minutes 30` is the full version; this one asks the same of a minute: every
event reaches every long-lived reader once, and the relay's memory, descriptors, tasks and upstream
connections stay flat while clients come and go, and return to where they started once they are gone.
"""

from __future__ import annotations

from pathlib import Path

from bench.soak import SoakPlan, render, soak

SECONDS = 55.0  # plus start and finish: a minute of wall time


async def test_a_minute_of_churn_and_traffic_leaves_the_relay_flat(tmp_path: Path) -> None:
    plan = SoakPlan(seconds=SECONDS)
    result = await soak(plan, tmp_path)
    print(render(result))
    assert result.baseline is not None
    assert result.after is not None
    assert result.events_sent > 0.8 * SECONDS * plan.events_per_second
    assert result.churned > 0.8 * SECONDS * plan.churn_per_second
    assert result.resumed > 0
    assert result.deliveries == plan.readers_per_account * result.events_sent
    assert (result.lost, result.duplicates, result.errors) == (0, 0, {})

    # Steady state: the first third warms caches and arenas up, then nothing may trend upwards.
    steady = result.series[len(result.series) // 3 :]
    rss = [p.rss_mb for p in steady]
    assert max(rss) - min(rss) < 4, rss
    assert max(rss) - rss[0] < 4, rss
    # Descriptors move with the churning clients in flight, within a band.
    assert max(p.fds for p in steady) - min(p.fds for p in steady) < 40
    assert all(p.upstreams == plan.accounts for p in steady)  # one per account, never more
    # Everyone gone: descriptors and tasks back where they started, memory near it.
    assert result.after.clients == 0
    assert result.after.upstreams == 0
    # Kept alive: the status poller's connection, and one per account to the session endpoint.
    assert result.after.fds <= result.baseline.fds + 1 + plan.accounts
    assert result.after.tasks <= result.baseline.tasks
    assert result.after.rss_mb - result.baseline.rss_mb < 12
