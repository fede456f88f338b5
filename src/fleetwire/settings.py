"""The one Settings class (contract §4). Nothing else in fleetwire reads ``os.environ``."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute)\s*$")


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Configuration from ``FLEETWIRE_*`` environment variables (a ``.env`` file may mirror it)."""

    model_config = SettingsConfigDict(env_prefix="FLEETWIRE_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("./.fleetwire")
    database_url: str | None = None
    broker_url: str = "memory://"

    jwt_secret: str | None = None
    jwt_algorithms: str = "HS256"
    jwt_public_key: str | None = None
    jwt_jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = 0.0
    jwks_cache_s: float = 300.0

    heartbeat_s: float = 20.0
    token_warning_s: float = 60.0
    allowed_origins: str = ""
    max_message_bytes: int = Field(default=262_144, ge=1024)
    max_connections: int = Field(default=100_000, ge=1)
    rate_limit: str = "200/s"
    rate_limit_close_after: int = Field(default=100, ge=1)
    send_queue: int = Field(default=1000, ge=1)
    node_id: str = Field(default_factory=_default_node_id)
    # Contract §8: the MQTT device listener on `host` (unset: none; MQTT over WebSocket at
    # /mqtt on the main port either way).
    mqtt_port: int | None = Field(default=None, ge=0, le=65535)

    # Not in the contract's table; each is a limit the contract implies (see docs/protocol.md).
    max_clock_skew_s: float = 300.0
    handshake_timeout_s: float = 10.0
    close_grace_s: float = 2.0  # after a close frame, how long a peer has to read it
    max_in_flight: int = Field(default=64, ge=1)  # requests per session awaiting their reply
    # How long a new session waits to see its predecessor's `device.connected` (13.12b).
    replace_wait_s: float = Field(default=2.0, ge=0)
    max_subscriptions: int = Field(default=100, ge=1)  # per client connection
    max_patterns: int = Field(default=1000, ge=1)  # device ids and globs per client connection
    max_pending_commands: int = Field(default=100, ge=1)  # queued commands per offline device
    max_issuing_commands: int = Field(default=16, ge=1)  # commands being issued at once per node
    max_replay: int = Field(default=500, ge=0)  # events one `resume` replays, over all devices
    # Telemetry schemas (SECURITY.md "Telemetry schemas"): what one schema may cost.
    max_schema_bytes: int = Field(default=65_536, ge=2)
    max_schema_depth: int = Field(default=32, ge=1)
    max_schema_expansion: int = Field(default=4096, ge=1)
    # Device twins (contract §6): each of desired and reported, as compact JSON; nesting.
    max_twin_bytes: int = Field(default=16_384, ge=2)
    max_twin_depth: int = Field(default=8, ge=1)
    max_header_bytes: int = 16_000
    event_history: int = Field(default=1000, ge=1)
    telemetry_retention_days: float = 30.0
    purge_interval_s: float = 3600.0
    write_queue: int = Field(default=10_000, ge=1)
    write_batch: int = Field(default=500, ge=1)
    # Group transactions in flight at once (events/writer.py, "Pipelining"): on PostgreSQL one
    # at a time left the server idle ~30 % of batch ingest waiting for the commit's round trips;
    # 2 measured 96,000-98,000 -> 99,900-116,000 points/s, 3 and 4 no better (the server is then CPU
    # bound), and each lane holds a pool connection. SQLite: the same within noise either way.
    write_pipeline: int = Field(default=2, ge=1)
    # Group commit lingering (events/writer.py, "Lingering"): with nothing in flight and fewer
    # than `write_linger_ops` ops queued, the writer lets the loop turn up to this many times
    # before it starts a group. 8 / 64 measured handshakes at 0.43 -> 0.31 ms CPU each and the
    # command p99 at 1,000/s at 5.5 -> 4.7 ms; 16 / 128 took handshakes to 0.29 ms but more
    # commands were refused. 0 turns it off.
    write_linger_turns: int = Field(default=8, ge=0)
    write_linger_ops: int = Field(default=64, ge=1)
    # PostgreSQL connections per node (the asyncpg pool): reads, and the write pipeline's lanes.
    db_pool_size: int = Field(default=10, ge=1)
    # A write transaction taking longer than this is logged (a warning with its statements /
    # COMMIT split on SQLite): every write of the node waits behind it.
    slow_write_ms: float = Field(default=200.0, ge=0)
    command_sweep_s: float = 1.0
    # Fleet jobs (contract §7; SECURITY.md limits).
    max_job_devices: int = Field(default=100_000, ge=1)  # executions of one job
    job_batch: int = Field(default=500, ge=1)  # executions one rollout step dispatches at most
    job_lease_s: float = Field(default=15.0, gt=0)  # a dead driver's jobs are taken over after this
    job_progress_s: float = Field(default=0.25, gt=0)  # `job` frames: at most one per job per this
    # MQTT (docs/protocol.md, MQTT): a keep-alive of 0 or above this becomes this (AWS IoT's 1200).
    mqtt_max_keep_alive_s: int = Field(default=1200, ge=1, le=65535)
    mqtt_session_expiry_s: int = Field(default=86_400, ge=0)  # longest a persistent session is kept
    mqtt_max_sessions: int = Field(default=100_000, ge=1)  # persistent sessions kept per node
    # The dashboard's activity counts (GET /api/v1/overview): minutes kept, and how many
    # disconnects within them make a device "flapping".
    activity_window_minutes: int = Field(default=60, ge=1, le=1440)
    flapping_disconnects: int = Field(default=3, ge=1)
    # `fleetwire serve` only (docs/architecture.md, "Garbage collection in a serving process"):
    # allocations between two young collections of Python's cycle collector; 0 keeps Python's.
    gc_threshold: int = Field(default=100_000, ge=0)
    log_level: str = "info"

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        if not _RATE.match(value):
            raise ValueError("rate_limit must look like '200/s' or '6000/min'")
        return value

    @property
    def rate_per_second(self) -> float:
        match = _RATE.match(self.rate_limit)
        assert match is not None  # checked by the validator
        amount = float(match.group(1))
        return amount if match.group(2).startswith("s") else amount / 60.0

    @property
    def algorithms(self) -> list[str]:
        return [a.strip() for a in self.jwt_algorithms.split(",") if a.strip()]

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.allowed_origins.split(",") if o.strip())

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fleetwire.db').resolve()}"
