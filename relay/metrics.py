"""Prometheus metrics, one registry per relay instance (so tests can run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.events_in = Counter(
            "relay_events_in",
            "Events accepted into account channels",
            ["source"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "relay_duplicates_dropped",
            "Events dropped as repeats of an upstream id",
            registry=self.registry,
        )
        self.events_out = Counter(
            "relay_events_out", "Event deliveries queued to clients", registry=self.registry
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
        self.fanout_seconds = Histogram(
            "relay_fanout_seconds",
            "Time to hand one batch of events (usually one) to every local subscriber of its account",
            buckets=(
                0.00005,
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
            ),
            registry=self.registry,
        )
