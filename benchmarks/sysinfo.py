"""What the benchmark reads from the kernel: CPU time and RSS of a process, busy time per core.

Everything comes from /proc (Linux), so neither side needs psutil. CPU figures are in
percent of one core over a measured window, so "100" means that process saturated its core.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard limit (10k connections need the headroom)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1_048_576)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def proc_cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15)


def proc_loop_cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process's main thread: the event loop of a fleetwire
    node; the rest of `proc_cpu_s` is its other threads (the SQLite writer and reader,
    libuv's workers), so a figure per operation can say which side it comes from."""
    if pid == "self":
        pid = os.getpid()
    return proc_cpu_s(f"{pid}/task/{pid}")


def proc_rss_kb(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def core_times() -> dict[str, tuple[int, int, int, int]]:
    """(busy, total, irq + softirq, steal) jiffies per core, from /proc/stat."""
    result: dict[str, tuple[int, int, int, int]] = {}
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if not line.startswith(b"cpu") or line.startswith(b"cpu "):
                    continue
                parts = line.split()
                values = [int(v) for v in parts[1:]] + [0] * 8
                idle = values[3] + values[4]  # idle + iowait
                total = sum(values[:8])  # guest time is already counted in user
                result[parts[0].decode()] = (total - idle, total, values[5] + values[6], values[7])
    except OSError:
        pass
    return result


def find_pids(fragment: str) -> list[int]:
    """Processes whose command line contains `fragment` (e.g. the PostgreSQL backends serving
    one database: their process title names it)."""
    found: list[int] = []
    needle = fragment.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@dataclass
class CpuWindow:
    """CPU use of some processes, of this process and of every core between start and stop;
    `services` (name -> command-line fragment) adds up the processes matching each fragment
    at the start (database backends, Redis)."""

    pids: dict[str, int]
    services: dict[str, str] = field(default_factory=dict)
    _t0: float = 0.0
    _cpu0: dict[str, float] = field(default_factory=dict)
    _loop0: dict[str, float] = field(default_factory=dict)
    _self0: float = 0.0
    _cores0: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    _service0: dict[str, dict[int, float]] = field(default_factory=dict)

    def start(self) -> CpuWindow:
        self._service0 = {
            name: {pid: proc_cpu_s(pid) for pid in find_pids(fragment)}
            for name, fragment in self.services.items()
        }
        self._t0 = time.monotonic()
        self._cpu0 = {name: proc_cpu_s(pid) for name, pid in self.pids.items()}
        self._loop0 = {name: proc_loop_cpu_s(pid) for name, pid in self.pids.items()}
        self._self0 = proc_cpu_s()
        self._cores0 = core_times()
        return self

    def stop(self) -> dict[str, Any]:
        wall = max(time.monotonic() - self._t0, 1e-9)
        processes = {
            name: round(100.0 * (proc_cpu_s(pid) - self._cpu0[name]) / wall, 1)
            for name, pid in self.pids.items()
        }
        loops = {
            name: round(100.0 * (proc_loop_cpu_s(pid) - self._loop0[name]) / wall, 1)
            for name, pid in self.pids.items()
        }
        cores: dict[str, float] = {}
        softirq: dict[str, float] = {}
        steal: dict[str, float] = {}
        for name, (busy, total, irq, stolen) in core_times().items():
            busy0, total0, irq0, stolen0 = self._cores0.get(name, (0, 0, 0, 0))
            if total > total0:
                cores[name] = round(100.0 * (busy - busy0) / (total - total0), 1)
                softirq[name] = round(100.0 * (irq - irq0) / (total - total0), 1)
                steal[name] = round(100.0 * (stolen - stolen0) / (total - total0), 1)
        services = {  # a process that ended meanwhile counts as 0, not negative
            name: round(100.0 * sum(max(proc_cpu_s(pid) - t0, 0.0) for pid, t0 in pids.items()) / wall, 1)
            for name, pids in self._service0.items()
        }
        return {
            "wall_s": round(wall, 3),
            "server_cpu_pct": processes,
            "server_loop_cpu_pct": loops,  # of which the main thread (the event loop)
            "loadgen_cpu_pct": round(100.0 * (proc_cpu_s() - self._self0) / wall, 1),
            "core_busy_pct": cores,  # everything but idle and iowait
            "core_irq_pct": softirq,  # of which interrupts and softirqs (loopback TCP work)
            "core_steal_pct": steal,  # time the hypervisor gave to other guests
            "service_cpu_pct": services,
        }
