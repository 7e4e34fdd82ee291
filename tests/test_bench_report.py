"""Repeated bench runs reduced to one result: medians for measures, the worst run for guarantees."""

from __future__ import annotations

import dataclasses

from bench.report import combined, reduced, targets
from bench.run import Latency, Result


def _result(server: str, cpu_per_delivery: float | None, **changes: object) -> Result:
    result = Result(
        scenario="fanout-1k",
        server=server,
        clients=1_000,
        accounts=1,
        expected=100_000,
        delivered=100_000,
        lost=0,
        duplicates=0,
        foreign=0,
        failures={},
        latency_ms=Latency(p50=10.0, p90=20.0, p99=30.0, max=40.0),
        connect_seconds=1.0,
        cpu_seconds=2.0,
        cpu_per_delivery_us=cpu_per_delivery,
        cpu_per_connection_us=100.0,
        rss_per_client_kb=8.0,
        rss_per_upstream_kb=None,
        peak_rss_mb=80.0,
        asked_rate=10.0,
        publish_rate=10.0,
        loadgen_cpu_seconds=1.0,
        simulator_cpu_seconds=0.1,
    )
    return dataclasses.replace(result, **changes)  # type: ignore[arg-type]


def test_one_run_is_its_own_result() -> None:
    run = _result("relay", 9.0)
    assert combined([run]) is run


def test_measures_are_the_median_of_the_runs() -> None:
    runs = [
        _result("relay", 9.0, latency_ms=Latency(1.0, 2.0, 90.0, 100.0), cpu_per_connection_us=300),
        _result("relay", 30.0, latency_ms=Latency(3.0, 4.0, 10.0, 20.0), cpu_per_connection_us=100),
        _result("relay", 10.0, latency_ms=Latency(2.0, 3.0, 20.0, 30.0), cpu_per_connection_us=200),
    ]
    result = combined(runs)
    assert result.cpu_per_delivery_us == 10.0  # one noisy run does not move it
    assert result.cpu_per_connection_us == 200.0
    assert result.latency_ms == Latency(2.0, 3.0, 20.0, 30.0)


def test_guarantees_take_the_worst_run() -> None:
    runs = [
        _result("relay", 9.0, lost=0, duplicates=2, failures={"reset": 1}),
        _result("relay", 9.0, lost=5, delivered=99_995, publish_rate=7.5, failures={"reset": 3}),
        _result("relay", 9.0, foreign=1, failures={"timeout": 1}),
    ]
    result = combined(runs)
    assert (result.lost, result.duplicates, result.foreign) == (5, 2, 1)
    assert result.delivered == 99_995
    assert result.publish_rate == 7.5
    assert result.failures == {"reset": 3, "timeout": 1}


def test_a_measure_missing_from_any_run_is_missing_from_the_median() -> None:
    assert combined([_result("relay", 9.0), _result("relay", None)]).cpu_per_delivery_us is None


def test_targets_judge_the_medians_and_show_each_pairs_ratio() -> None:
    # Interleaved as the bench runs them: relay, naive, relay, naive, relay, naive.
    runs = []
    for relay, naive in ((9.0, 30.0), (9.0, 20.0), (9.0, 30.0)):
        runs += [_result("relay", relay), _result("naive", naive)]
    assert [r.server for r in reduced(runs)] == ["relay", "naive"]
    verdicts = targets(runs)
    delivery = next(line for line in verdicts if "CPU per delivery" in line)
    # The median pair, not the one run where the baseline was cheap (9/20 = 0.45).
    assert delivery == (
        "PASS  fanout-1k: CPU per delivery 0.300 of naive's "
        "(at most 0.333; runs: 0.300, 0.450, 0.300)"
    )
