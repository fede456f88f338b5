"""The rules of fleetwire with no I/O: devices, telemetry, commands, events, errors."""
