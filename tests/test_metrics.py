"""relay/metrics.py: the per-event tally reads back as Prometheus counters and a histogram."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import FANOUT_BUCKETS, Metrics


def scraped(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_events_in_by_source_and_deliveries_are_counted() -> None:
    metrics = Metrics()
    assert ("relay_events_out_total", ()) in scraped(metrics)  # present from the start, at 0
    for source in ("upstream", "upstream", "webhook"):
        metrics.tally.took(source)
    metrics.tally.fanned_out(10, 0.0001)
    metrics.tally.fanned_out(3, 0.0001)
    samples = scraped(metrics)
    assert samples[("relay_events_in_total", (("source", "upstream"),))] == 2
    assert samples[("relay_events_in_total", (("source", "webhook"),))] == 1
    assert samples[("relay_events_out_total", ())] == 13


def test_fanout_buckets_are_cumulative_and_a_bound_holds_what_equals_it() -> None:
    metrics = Metrics()
    for seconds in (FANOUT_BUCKETS[0], FANOUT_BUCKETS[0] * 1.01, 0.003, 7.0):
        metrics.tally.fanned_out(1, seconds)
    samples = scraped(metrics)

    def bucket(le: str) -> float:
        return samples[("relay_fanout_seconds_bucket", (("le", le),))]

    assert bucket(str(FANOUT_BUCKETS[0])) == 1  # `le`: at most the bound
    assert bucket(str(FANOUT_BUCKETS[1])) == 2
    assert bucket("0.0025") == 2
    assert bucket("0.005") == 3
    assert bucket(str(FANOUT_BUCKETS[-1])) == 3
    assert bucket("+Inf") == samples[("relay_fanout_seconds_count", ())] == 4
    assert samples[("relay_fanout_seconds_sum", ())] == sum(
        (FANOUT_BUCKETS[0], FANOUT_BUCKETS[0] * 1.01, 0.003, 7.0)
    )
