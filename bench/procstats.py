"""CPU time and memory of a server process, read from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Sample:
    cpu_seconds: float  # user + system, since the process started
    rss_bytes: int
    peak_rss_bytes: int  # high-water mark of the resident set


def sample(pid: int) -> Sample:
    """Raises OSError when the process is gone; a dead one not yet reaped has no memory."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; every field after its closing ')' is numeric.
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    memory: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            memory[key] = int(value.split()[0]) * 1024  # reported in kB
    return Sample((utime + stime) / _CLOCK_TICKS, memory.get("VmRSS", 0), memory.get("VmHWM", 0))
