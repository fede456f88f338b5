"""`fleetwire bench`: the benchmark suite (runner, load generator, bare reference servers).

- `run`: the command (`fleetwire bench SCENARIO …`, also `python -m benchmarks`);
- `loadgen`: the picows + uvloop load generator process;
- `bare`: bare picows servers with no application logic, the reference of every ratio;
- `sysinfo`, `profile`, `common`: /proc readings, py-spy summaries, latency and progress helpers.
"""
