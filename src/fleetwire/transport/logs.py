"""The query-string token never reaches the logs (contract §2): one redaction function, and the
logging filter `transport/server.py` installs on every logger that can see a request target."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Final

__all__ = ["REDACTED_LOGGERS", "RedactAccessToken", "install_log_redaction", "redact_access_token"]

# The transport's logger keeps its historical name: log configurations already filter on it.
TRANSPORT_LOGGER: Final = "fleetwire.realtime.transport"
REDACTED_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", TRANSPORT_LOGGER)

# The parameter name as the query parser reads it: any of its characters may be percent-encoded
# (`access%5Ftoken=` is the same parameter), in either case.
_TOKEN_NAME: Final = "".join(f"(?:{re.escape(c)}|%{ord(c):02x})" for c in "access_token")
_TOKEN_RE: Final = re.compile(rf"({_TOKEN_NAME}=)[^&\s\"'#]*", re.IGNORECASE)


def redact_access_token(text: str) -> str:
    """`...?access_token=eyJ...&x=1` -> `...?access_token=[REDACTED]&x=1` (contract §2)."""
    if "access_token" not in text.lower() and "%" not in text:
        return text
    return _TOKEN_RE.sub(r"\1[REDACTED]", text)


class RedactAccessToken(logging.Filter):
    """Replaces `access_token=<value>` in a record's message and string arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_access_token(record.msg)
        args = record.args
        if isinstance(args, tuple):
            if any(isinstance(arg, str) and redact_access_token(arg) != arg for arg in args):
                record.args = tuple(redact_access_token(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, Mapping):
            record.args = {k: redact_access_token(v) if isinstance(v, str) else v for k, v in args.items()}
        return True


def install_log_redaction() -> None:
    """Idempotent: one `RedactAccessToken` filter on each logger that can see a request target.
    Logger filters apply to records logged on that logger itself, hence the explicit list."""
    for name in REDACTED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactAccessToken) for f in target.filters):
            target.addFilter(RedactAccessToken())
