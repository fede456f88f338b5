"""The device twin (contract §6) without I/O: merge patches, the delta, metadata, limits.

A twin holds what operators want (`desired`) and what the device says it has (`reported`),
each a JSON object changed only by RFC 7396 merge patches; `version` counts the writes that
changed something. Every store applies a write with `apply`, so memory and SQL cannot
disagree on what a patch does.

JSON equality here is JSON's, not Python's: `true` is not `1` (Python says it is), while
`1` and `1.0` are the same number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import orjson

from fleetwire.domain.clock import format_ms
from fleetwire.domain.errors import ErrorCode, FleetwireError, invalid

KEY: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class Section(StrEnum):
    DESIRED = "desired"
    REPORTED = "reported"


@dataclass(frozen=True, slots=True)
class TwinLimits:
    """Contract §6: each section ≤ 16 KiB as compact JSON, nesting ≤ 8 levels."""

    max_bytes: int = 16_384
    max_depth: int = 8


DEFAULT_LIMITS: Final = TwinLimits()


@dataclass(frozen=True, slots=True)
class Twin:
    """One device's twin as stored; metadata mirrors each section's leaves with
    `{"updated_at": RFC 3339}` (objects mirror key by key)."""

    device_id: str
    version: int
    desired: dict[str, Any]
    reported: dict[str, Any]
    metadata: dict[str, Any]  # {"desired": {...}, "reported": {...}}

    @classmethod
    def empty(cls, device_id: str) -> Twin:
        return cls(device_id, 1, {}, {}, {"desired": {}, "reported": {}})

    @property
    def delta(self) -> dict[str, Any]:
        return delta(self.desired, self.reported)

    def section(self, section: Section) -> dict[str, Any]:
        return self.desired if section is Section.DESIRED else self.reported

    def public(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "desired": self.desired,
            "reported": self.reported,
            "delta": self.delta,
            "version": self.version,
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a write did: `twin` is the twin after it (as before when nothing changed or it
    was refused); `refused` is the conflict or limit error, with nothing changed."""

    twin: Twin
    changed: bool = False
    delta_changed: bool = False
    refused: FleetwireError | None = None

    def event_data(self, section: Section, patch: dict[str, Any]) -> dict[str, Any]:
        """The `twin.updated` data: the new version, the applied patch, the whole delta."""
        return {"version": self.twin.version, section.value: patch, "delta": self.twin.delta}


# -- JSON values ---------------------------------------------------------------------------


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: booleans are not numbers; 1 equals 1.0."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(json_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float):
        return isinstance(b, int | float) and a == b
    return type(a) is type(b) and a == b


def check_patch(patch: object, name: str, limits: TwinLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """A section patch as a peer sent it: a JSON object with valid keys, finite numbers and
    at most `max_depth` levels; FleetwireError `invalid_message` (with every problem) else."""
    if not isinstance(patch, dict):
        raise invalid(
            f"`{name}` must be a JSON object (a merge patch)", [{"loc": [name], "msg": "not an object"}]
        )
    problems: list[dict[str, Any]] = []
    _check_value(patch, [name], 1, limits.max_depth, problems)
    if problems:
        raise invalid(f"invalid `{name}` patch", problems[:32])
    return patch


def _check_value(
    value: Any, loc: list[Any], depth: int, max_depth: int, problems: list[dict[str, Any]]
) -> None:
    if isinstance(value, dict):
        if depth > max_depth:
            problems.append({"loc": loc, "msg": f"nested deeper than {max_depth} levels"})
            return
        for key, item in value.items():
            if not isinstance(key, str) or not KEY.match(key):
                problems.append({"loc": [*loc, key], "msg": "key must match ^[A-Za-z0-9_.:-]{1,64}$"})
                continue
            _check_value(item, [*loc, key], depth + 1, max_depth, problems)
    elif isinstance(value, list):
        if depth > max_depth:
            problems.append({"loc": loc, "msg": f"nested deeper than {max_depth} levels"})
            return
        for index, item in enumerate(value):
            _check_value(item, [*loc, index], depth + 1, max_depth, problems)
    elif isinstance(value, float):
        if not math.isfinite(value):
            problems.append({"loc": loc, "msg": "numbers must be finite (no NaN or Infinity)"})
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**64:
            problems.append({"loc": loc, "msg": "integers must fit in 64 bits"})
    elif value is not None and not isinstance(value, str | bool):
        problems.append({"loc": loc, "msg": f"not a JSON value ({type(value).__name__})"})


def compact_size(value: Any) -> int:
    return len(orjson.dumps(value))


@dataclass(frozen=True, slots=True)
class TwinWrite:
    """A write as a transport parsed it; the patch's content is checked by the service
    (check_patch, with the node's limits)."""

    patch: dict[str, Any]
    if_version: int | None = None
    device_id: str | None = None  # twin_update names its device; twin_report is the sender's


MAX_VERSION: Final = 2**63 - 1  # versions are BIGINT in the store


def parse_if_version(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_VERSION:
        raise invalid(
            "`if_version` must be a non-negative integer", [{"loc": ["if_version"], "msg": "not a version"}]
        )
    return value


def parse_write(
    message: dict[str, Any], section: Section, envelope: frozenset[str], *, with_device: bool = False
) -> TwinWrite:
    """`{section: {patch}, "if_version"?}` (and `device_id` for twin_update): the shape only."""
    allowed = {section.value, "if_version"} | ({"device_id"} if with_device else set())
    extra = message.keys() - allowed - envelope
    if extra:
        raise invalid("unknown field(s)", [{"loc": [k], "msg": "unknown field"} for k in sorted(extra)])
    patch = message.get(section.value)
    if not isinstance(patch, dict):
        raise invalid(
            f"`{section.value}` must be a JSON object (a merge patch)",
            [{"loc": [section.value], "msg": "required object"}],
        )
    device_id = None
    if with_device:
        device_id = message.get("device_id")
        if not isinstance(device_id, str) or not 0 < len(device_id) <= 128:
            raise invalid("`device_id` must be a string", [{"loc": ["device_id"], "msg": "required string"}])
    return TwinWrite(patch, parse_if_version(message.get("if_version")), device_id)


# -- merge patch (RFC 7396) ----------------------------------------------------------------


def merge(target: Any, patch: Any) -> Any:
    """RFC 7396 §2 MergePatch: a new value; neither argument is changed."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def _metadata(
    meta: Any, before: dict[str, Any], after: dict[str, Any], patch: dict[str, Any], at: str
) -> dict[str, Any]:
    """The section's metadata after `patch` turned `before` into `after`: a leaf whose value
    changed gets `updated_at` = at; deleted keys lose theirs; the rest keep theirs."""
    result: dict[str, Any] = dict(meta) if isinstance(meta, dict) else {}
    for key, value in patch.items():
        if key not in after:
            result.pop(key, None)
            continue
        new = after[key]
        old = before.get(key)
        if isinstance(value, dict) and isinstance(new, dict):
            if isinstance(old, dict):
                result[key] = _metadata(result.get(key), old, new, value, at)
            else:  # a leaf (or nothing) became an object: its leaves are all new
                result[key] = _metadata({}, {}, new, value, at)
        elif key not in before or not json_equal(old, new):
            result[key] = {"updated_at": at}
    return result


# -- delta -----------------------------------------------------------------------------------


def delta(desired: dict[str, Any], reported: Any) -> dict[str, Any]:
    """Every leaf of `desired` absent from `reported` or different there; objects compared
    key by key; keys only in `reported` are not in it (contract §6)."""
    reported = reported if isinstance(reported, dict) else {}
    out: dict[str, Any] = {}
    for key, want in desired.items():
        if isinstance(want, dict):
            sub = delta(want, reported.get(key))
            if sub:
                out[key] = sub
        elif key not in reported or not json_equal(want, reported[key]):
            out[key] = want
    return out


def depth(value: Any) -> int:
    """Levels of nesting: 0 for a scalar, 1 for a flat object or array."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


# -- a write -----------------------------------------------------------------------------------


def apply(
    twin: Twin,
    section: Section,
    patch: dict[str, Any],
    at_ms: int,
    *,
    if_version: int | None = None,
    limits: TwinLimits = DEFAULT_LIMITS,
) -> Outcome:
    """One write: `if_version` first (conflict), then the merge; a patch that changes
    nothing leaves the twin (and its version) as it was; a result over the limits is
    refused (too_large, or invalid_message for depth) and changes nothing either."""
    if if_version is not None and if_version != twin.version:
        return Outcome(
            twin,
            refused=FleetwireError(
                ErrorCode.CONFLICT, f"if_version {if_version} is not the current version {twin.version}"
            ),
        )
    before = twin.section(section)
    after = merge(before, patch)
    if json_equal(before, after):
        return Outcome(twin)
    size = compact_size(after)
    if size > limits.max_bytes:
        return Outcome(
            twin,
            refused=FleetwireError(
                ErrorCode.TOO_LARGE,
                f"`{section.value}` would be {size} bytes as compact JSON; at most {limits.max_bytes}",
            ),
        )
    if depth(after) > limits.max_depth:
        return Outcome(
            twin, refused=invalid(f"`{section.value}` would nest deeper than {limits.max_depth} levels")
        )
    meta = dict(twin.metadata)
    meta[section.value] = _metadata(twin.metadata.get(section.value), before, after, patch, format_ms(at_ms))
    desired, reported = (after, twin.reported) if section is Section.DESIRED else (twin.desired, after)
    changed = Twin(twin.device_id, twin.version + 1, desired, reported, meta)
    return Outcome(changed, changed=True, delta_changed=not json_equal(twin.delta, changed.delta))
