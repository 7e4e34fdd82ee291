"""Results as a Markdown table with relay/naive ratio rows, issue 7's targets, and JSON; repeated
runs of a scenario on a server are reduced to one result of medians first."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.run import Latency, Result


@dataclass(frozen=True, slots=True)
class Measure:
    title: str
    value: Callable[[Result], float | None]
    digits: int
    compared: bool = True  # gets a relay/naive ratio


MEASURES = (
    Measure("p50 ms", lambda r: r.latency_ms.p50 if r.latency_ms else None, 1),
    Measure("p90 ms", lambda r: r.latency_ms.p90 if r.latency_ms else None, 1),
    Measure("p99 ms", lambda r: r.latency_ms.p99 if r.latency_ms else None, 1),
    Measure("max ms", lambda r: r.latency_ms.max if r.latency_ms else None, 1),
    Measure("connect s", lambda r: r.connect_seconds, 2),
    Measure("CPU s", lambda r: r.cpu_seconds, 2),
    Measure("CPU/delivery µs", lambda r: r.cpu_per_delivery_us, 1),
    Measure("CPU/conn µs", lambda r: r.cpu_per_connection_us, 0),
    Measure("RSS/client KB", lambda r: r.rss_per_client_kb, 1),
    Measure("RSS/upstream KB", lambda r: r.rss_per_upstream_kb, 1),
    Measure("peak RSS MB", lambda r: r.peak_rss_mb, 0),
    # What shared the two cores with the server: the load generator and the simulator.
    Measure("bench CPU s", lambda r: r.loadgen_cpu_seconds, 1, compared=False),
    Measure("sim CPU s", lambda r: r.simulator_cpu_seconds, 1, compared=False),
)
HEADER = ("scenario", "server", "clients", "delivered/expected", "lost", "dup", "errors")


def _median(values: list[float | None]) -> float | None:
    """None if any run lacked the measure (then no run's value stands for all)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if len(present) == len(values) else None


def _median_latency(latencies: list[Latency | None]) -> Latency | None:
    present = [latency for latency in latencies if latency is not None]
    if len(present) < len(latencies):
        return None
    return Latency(
        **{
            field.name: statistics.median(getattr(latency, field.name) for latency in present)
            for field in dataclasses.fields(Latency)
        }
    )


def combined(runs: list[Result]) -> Result:
    """One result for repeated runs of one scenario on one server: each measure's median, and for
    what must hold in every run (nothing lost, duplicated, foreign or failed; publishing at the
    rate asked) the worst run's figure."""
    first = runs[0]
    if len(runs) == 1:
        return first
    failures: Counter[str] = Counter()
    for run in runs:
        failures |= Counter(run.failures)  # per reason, the most any run had

    def median(field: str) -> float:
        return statistics.median(float(getattr(r, field)) for r in runs)

    return dataclasses.replace(
        first,
        delivered=min(r.delivered for r in runs),
        lost=max(r.lost for r in runs),
        duplicates=max(r.duplicates for r in runs),
        foreign=max(r.foreign for r in runs),
        failures=dict(failures),
        latency_ms=_median_latency([r.latency_ms for r in runs]),
        connect_seconds=median("connect_seconds"),
        cpu_seconds=median("cpu_seconds"),
        cpu_per_delivery_us=_median([r.cpu_per_delivery_us for r in runs]),
        cpu_per_connection_us=median("cpu_per_connection_us"),
        rss_per_client_kb=median("rss_per_client_kb"),
        rss_per_upstream_kb=_median([r.rss_per_upstream_kb for r in runs]),
        peak_rss_mb=median("peak_rss_mb"),
        publish_rate=min(
            (r.publish_rate for r in runs if r.publish_rate is not None), default=None
        ),
        loadgen_cpu_seconds=median("loadgen_cpu_seconds"),
        simulator_cpu_seconds=median("simulator_cpu_seconds"),
    )


def reduced(runs: list[Result]) -> list[Result]:
    """Each scenario's runs on each server as one result, in the order of their first runs."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for run in runs:
        groups.setdefault((run.scenario, run.server), []).append(run)
    return [combined(group) for group in groups.values()]


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def errors(result: Result) -> int:
    """Clients not open at the end, events of another account, and other problems."""
    return sum(result.failures.values()) + result.foreign


def _row(result: Result) -> list[str]:
    return [
        result.scenario,
        result.server,
        f"{result.clients:,}",
        f"{result.delivered:,}/{result.expected:,}",
        f"{result.lost:,}",
        f"{result.duplicates:,}",
        f"{errors(result):,}",
        *(_number(m.value(result), m.digits) for m in MEASURES),
    ]


def _ratio(relay: Result, naive: Result) -> list[str]:
    cells = ["", "relay/naive", "", "", "", "", ""]
    for measure in MEASURES:
        ours, theirs = measure.value(relay), measure.value(naive)
        if measure.compared and ours is not None and theirs:
            cells.append(f"{ours / theirs:.2f}x")
        else:
            cells.append("")
    return cells


def _pairs(results: list[Result]) -> Iterator[tuple[Result, Result | None]]:
    """Each relay result with the naive result of the same scenario, if any."""
    naive = {r.scenario: r for r in results if r.server == "naive"}
    for result in results:
        if result.server == "relay":
            yield result, naive.get(result.scenario)


def table(results: list[Result]) -> str:
    rows = [[*HEADER, *(m.title for m in MEASURES)]]
    for result in results:
        rows.append(_row(result))
        if result.server == "naive":
            relay = next(
                (r for r in results if r.scenario == result.scenario and r.server == "relay"), None
            )
            if relay is not None:
                rows.append(_ratio(relay, result))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        padded = (
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def failures(results: list[Result]) -> list[str]:
    """Errors, and publishing slower than asked (then latencies include the simulator's lag)."""
    lines = []
    for result in results:
        if result.publish_rate is not None and result.publish_rate < 0.9 * result.asked_rate:
            lines.append(
                f"{result.scenario} / {result.server}: events published at "
                f"{result.publish_rate:,.0f}/s of the {result.asked_rate:,.0f}/s asked"
            )
        for reason, count in sorted(result.failures.items()):
            lines.append(f"{result.scenario} / {result.server}: {count:,} x {reason}")
        if result.foreign:
            lines.append(f"{result.scenario} / {result.server}: {result.foreign:,} foreign events")
    return lines


def _run_ratios(runs: list[Result], scenario: str, value: Callable[[Result], float | None]) -> str:
    """Each run's own ratio, the relay's n-th run against the naive's n-th (measured next to it),
    when the scenario ran more than once: how far the machine's noise moves the verdict."""
    relay = [value(r) for r in runs if r.scenario == scenario and r.server == "relay"]
    naive = [value(r) for r in runs if r.scenario == scenario and r.server == "naive"]
    ratios = [f"{a / b:.3f}" for a, b in zip(relay, naive, strict=False) if a is not None and b]
    return f"; runs: {', '.join(ratios)}" if len(ratios) > 1 else ""


def _checks(relay: Result, naive: Result | None, runs: list[Result]) -> Iterator[tuple[str, bool]]:
    if naive is not None:
        if relay.cpu_per_delivery_us and naive.cpu_per_delivery_us:
            ratio = relay.cpu_per_delivery_us / naive.cpu_per_delivery_us
            spread = _run_ratios(runs, relay.scenario, lambda r: r.cpu_per_delivery_us)
            yield (
                f"CPU per delivery {ratio:.3f} of naive's (at most 0.333{spread})",
                ratio <= 1 / 3,
            )
        if naive.cpu_per_connection_us:
            ratio = relay.cpu_per_connection_us / naive.cpu_per_connection_us
            spread = _run_ratios(runs, relay.scenario, lambda r: r.cpu_per_connection_us)
            yield (
                f"CPU per connection {ratio:.3f} of naive's (at most 0.200{spread})",
                ratio <= 1 / 5,
            )
    yield (
        f"RSS per client {relay.rss_per_client_kb:.1f} KB (at most 20)",
        relay.rss_per_client_kb <= 20,
    )
    if relay.scenario == "fanout-1k" and relay.latency_ms is not None:
        yield f"p99 latency {relay.latency_ms.p99:.1f} ms (under 50)", relay.latency_ms.p99 < 50
    if relay.scenario in ("fanout-10k", "storm-10k", "accounts-1k"):
        yield (
            f"{relay.lost:,} lost, {relay.duplicates:,} duplicated (0 and 0)",
            not relay.lost and not relay.duplicates,
        )
    if relay.scenario == "accounts-1k" and relay.rss_per_upstream_kb is not None:
        yield (
            f"{relay.accounts:,} upstreams held, {relay.rss_per_upstream_kb:.1f} KB each "
            "(under 50), no errors",
            relay.rss_per_upstream_kb < 50 and not errors(relay),
        )


def targets(runs: list[Result]) -> list[str]:
    """The verdicts on the runs' medians (`reduced`)."""
    return [
        f"{'PASS' if passed else 'FAIL'}  {relay.scenario}: {text}"
        for relay, naive in _pairs(reduced(runs))
        for text, passed in _checks(relay, naive, runs)
    ]


def write_json(
    path: Path, command: str, runs: list[Result], problems: list[str], machine: dict[str, Any]
) -> None:
    document = {
        "command": command,
        "machine": machine,
        "results": [dataclasses.asdict(r) for r in reduced(runs)],
        "runs": [dataclasses.asdict(r) for r in runs],
        "problems": problems,
        "targets": targets(runs),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
