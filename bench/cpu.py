"""CPU accounting read from /proc, to tell who used the machine's cores during a run.

On a 2-core machine the load generator and the server share the CPU, so a throughput
figure means little without knowing how busy each side was. Three readings:

- the whole machine (/proc/stat): how many cores were busy at all;
- a server's process tree: the main process, its live descendants, and (through the
  cutime/cstime fields) every child it has already reaped, so short-lived Dovecot
  login and pop3 processes are counted too;
- the load generator reports its own CPU from getrusage in each worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class MachineSample:
    """Cumulative CPU seconds of the whole machine, all cores added up."""

    busy: float
    total: float


def machine_sample() -> MachineSample:
    """Read the first line of /proc/stat (the sum over all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    values = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice: guest time is
    # already inside user, so only the first eight count towards the total.
    total = sum(values[:8])
    idle = values[3] + values[4]
    return MachineSample(busy=(total - idle) / _TICKS, total=total / _TICKS)


def _children() -> dict[int, list[int]]:
    """Map each pid to its child pids, from one pass over /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _own_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, in seconds (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the ")" that closes the command name: state is field 3, so utime
    # (field 14) is at index 11 of the remainder and cstime (field 17) at index 14.
    rest = stat[stat.rindex(")") + 2 :].split()
    return sum(int(v) for v in rest[11:15]) / _TICKS


def tree_cpu(root_pid: int) -> float:
    """CPU seconds used so far by a process, its live descendants and its reaped ones."""
    tree = _children()
    total = 0.0
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        total += _own_cpu(pid)
        stack.extend(tree.get(pid, []))
    return total


def trees_cpu(pids: list[int]) -> float:
    """tree_cpu summed over several roots (popguard runs one process per service)."""
    return sum(tree_cpu(pid) for pid in pids)
