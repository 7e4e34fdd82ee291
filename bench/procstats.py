"""CPU time and memory of a server process, read from /proc (Linux)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Sample:
    cpu_seconds: float  # user + system of all its threads, since the process started
    rss_bytes: int
    peak_rss_bytes: int  # high-water mark of the resident set


def sample(pid: int) -> Sample:
    """Raises OSError when the process is gone; a dead one not yet reaped has no memory."""
    cpu_seconds = time.clock_gettime(_process_cpu_clock(pid))
    memory: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            memory[key] = int(value.split()[0]) * 1024  # reported in kB
    return Sample(cpu_seconds, memory.get("VmRSS", 0), memory.get("VmHWM", 0))


def _process_cpu_clock(pid: int) -> int:
    """The clock of another process's CPU time, as clock_getcpuclockid(3) makes it on Linux
    (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)): nanoseconds, threads that ended included.
    /proc/<pid>/stat counts in clock ticks: 10 ms of error in each sample is 20 µs on each of
    1,000 connections measured, a tenth of what the relay spends on one."""
    return ((~pid) << 3) | 2
