"""Summaries of `py-spy record --threads --format raw` output: a `py-spy top`-like table.

A raw file has one line per distinct stack, `thread (tid): name;frame;…;leaf COUNT`, each
frame written `function (path:line)`. `top` reports the share of each thread, then for the
main thread (the event loop) each function's own samples (it was the leaf) and total (anywhere
on the stack, counted once per stack), and the hottest lines. Time in C code (uvloop, picows'
Cython, orjson, the kernel's socket calls) counts as own time of the innermost Python frame that
called it: `Runner.run` own time is uvloop's loop itself (reads, picows' frame parsing, writes).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?):(?P<line>\d+)\)$")
_PREFIXES = ("/site-packages/", "/src/", "/lib/python3.11/")


def _short(path: str) -> str:
    for prefix in _PREFIXES:
        index = path.rfind(prefix)
        if index >= 0:
            return path[index + len(prefix) :]
    return path


def _split(frame: str) -> tuple[str, str]:
    """(function with file, function with file:line)."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, frame
    file = _short(match["file"])
    return f"{match['func']} ({file})", f"{match['func']} ({file}:{match['line']})"


def top(raw_path: Path, limit: int = 15) -> str:
    """Per-thread sample shares, then the main thread's functions (own and total) and lines.
    Expects `py-spy record --threads` output (each stack starts with `thread (tid): name`)."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    main_samples = 0
    for text in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = text.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        thread = "MainThread"
        if parts and parts[0].startswith("thread ("):
            thread = parts[0].split(": ", 1)[-1]
            parts = parts[1:]
        if parts and parts[0].startswith("process "):
            parts = parts[1:]
        threads[thread] += count
        if thread != "MainThread" or not parts:
            continue
        main_samples += count
        seen: set[str] = set()
        for frame in parts:
            function, _ = _split(frame)
            if function not in seen:
                seen.add(function)
                total[function] += count
        function, line = _split(parts[-1])
        own[function] += count
        lines[line] += count
    samples = sum(threads.values())
    if samples == 0:
        return f"{raw_path.name}: no samples"
    shares = ", ".join(f"{name} {count / samples:.0%}" for name, count in threads.most_common(4))
    out = [
        f"{raw_path.name}: {samples} non-idle samples at 100/s; by thread: {shares}",
        "main thread (the event loop), % of its samples:",
        "  %own  %total  function",
    ]
    if main_samples == 0:
        return "\n".join(out)
    for function, count in own.most_common(limit):
        out.append(
            f"{100 * count / main_samples:6.1f} {100 * total[function] / main_samples:6.1f}  {function}"
        )
    out.append("  hottest lines (%own):")
    for line, count in lines.most_common(limit // 2):
        out.append(f"{100 * count / main_samples:6.1f}         {line}")
    out.append("  fleetwire functions by %total:")
    ours = [(f, c) for f, c in total.most_common() if "fleetwire/" in f and "benchmarks/" not in f]
    for function, count in ours[:limit]:
        out.append(f"{100 * own[function] / main_samples:6.1f} {100 * count / main_samples:6.1f}  {function}")
    return "\n".join(out)
