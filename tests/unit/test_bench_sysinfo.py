"""What `fleetwire bench` reads from /proc: a process's CPU, and how much of it is its main thread."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from benchmarks.sysinfo import CpuWindow, proc_cpu_s, proc_loop_cpu_s

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux's /proc/PID/task (per-thread CPU)")


def _burn(cpu_s: float) -> None:
    """Spend `cpu_s` of this thread's own CPU time (bounded by CPU, not by wall time)."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def test_cpu_of_another_thread_counts_for_the_process_not_its_main_thread() -> None:
    window = CpuWindow({"self": 0}).start()  # pid 0 is never a process: 0.0 throughout
    total0, loop0 = proc_cpu_s(), proc_loop_cpu_s()
    worker = threading.Thread(target=_burn, args=(0.3,))
    worker.start()
    worker.join()
    total, loop = proc_cpu_s() - total0, proc_loop_cpu_s() - loop0
    # /proc counts in clock ticks (10 ms): 0.3 s of the worker's is at least 0.25 of the process's.
    assert total >= 0.25
    assert loop < total - 0.2  # the main thread only waited in join()
    cpu = window.stop()
    assert cpu["server_cpu_pct"] == {"self": 0.0}
    assert cpu["server_loop_cpu_pct"] == {"self": 0.0}


def test_main_thread_cpu_is_its_own() -> None:
    loop0 = proc_loop_cpu_s()
    _burn(0.3)
    assert proc_loop_cpu_s() - loop0 >= 0.25
