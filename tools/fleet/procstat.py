"""Reading a process's CPU time and memory from /proc (parsing is pure, reading is thin)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcSample:
    cpu_seconds: float  # user + system
    rss_bytes: int
    threads: int


def parse_stat(text: str, ticks: int = CLOCK_TICKS) -> float:
    """User plus system CPU seconds from the text of /proc/PID/stat.

    The command name (field 2) is in parentheses and may hold spaces or parentheses itself,
    so fields are counted from the last ')'.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / ticks


def parse_status(text: str) -> tuple[int, int]:
    """(VmRSS in bytes, Threads) from the text of /proc/PID/status."""
    rss = 0
    threads = 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            rss = int(parts[1]) * (1024 if parts[2].lower() == "kb" else 1)
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


def sample(pid: int, proc: Path = Path("/proc")) -> ProcSample:
    base = proc / str(pid)
    cpu = parse_stat((base / "stat").read_text())
    rss, threads = parse_status((base / "status").read_text())
    return ProcSample(cpu, rss, threads)


def find_pid(*needles: str, proc: Path = Path("/proc")) -> int | None:
    """The first process whose command line contains every needle (not this one)."""
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(n in cmdline for n in needles):
            return int(entry.name)
    return None
