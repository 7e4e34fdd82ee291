"""Prometheus metrics, one registry per relay instance (so tests can run several in one process)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

FANOUT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class EventTally(Collector):
    """What every event moves (events in, deliveries, fan-out time), kept in plain numbers and
    turned into Prometheus counters and a histogram when scraped.

    prometheus_client's `Counter.inc` and `Histogram.observe` each take a lock and run a few
    Python calls; three of them per upstream event were about 7% of the CPU an event costs the
    relay with 1,000 accounts (bench, alternating runs). The relay's loop is the only writer and
    the scrape runs on it too, so nothing here needs a lock.
    """

    def __init__(self) -> None:
        self._events_in: dict[str, int] = {}  # by source
        self._events_out = 0
        self._fanouts = [0] * (len(FANOUT_BUCKETS) + 1)  # by bucket, the last above them all
        self._fanout_sum = 0.0

    def took(self, source: str) -> None:
        self._events_in[source] = self._events_in.get(source, 0) + 1

    def fanned_out(self, deliveries: int, seconds: float) -> None:
        self._events_out += deliveries
        self._fanouts[bisect_left(FANOUT_BUCKETS, seconds)] += 1  # `le`: at most the bound
        self._fanout_sum += seconds

    def collect(self) -> Iterator[Metric]:
        events_in = CounterMetricFamily(
            "relay_events_in", "Events accepted into account channels", labels=["source"]
        )
        for source, count in self._events_in.items():
            events_in.add_metric([source], count)
        yield events_in
        yield CounterMetricFamily(
            "relay_events_out", "Event deliveries queued to clients", value=self._events_out
        )
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, FANOUT_BUCKETS), "+Inf"], self._fanouts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "relay_fanout_seconds",
            "Time to hand one batch of events (usually one) to every local subscriber of its account",
            buckets=buckets,
            sum_value=self._fanout_sum,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.clients = Gauge(
            "relay_clients_connected", "SSE clients connected now", registry=self.registry
        )
        self.upstreams = Gauge(
            "relay_upstreams",
            "Upstream connections by state",
            ["state"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "relay_duplicates_dropped",
            "Events dropped as repeats of an upstream id",
            registry=self.registry,
        )
        self.replays = Counter(
            "relay_replays", "Reconnects resumed from the replay window", registry=self.registry
        )
        self.resets = Counter(
            "relay_resets",
            "Reconnects outside the replay window (relay.reset sent)",
            registry=self.registry,
        )
        self.slow_disconnects = Counter(
            "relay_slow_client_disconnects",
            "Clients cut because their buffer filled",
            registry=self.registry,
        )
        self.rejected = Counter(
            "relay_clients_rejected", "Connections refused", ["reason"], registry=self.registry
        )
        self.tally = EventTally()
        self.registry.register(self.tally)
