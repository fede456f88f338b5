"""domain.twin: RFC 7396 merge patch, the delta, metadata, limits and parsing (no I/O)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetwire.domain.clock import format_ms
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.twin import (
    Section,
    Twin,
    TwinLimits,
    TwinWrite,
    apply,
    check_patch,
    delta,
    depth,
    json_equal,
    merge,
    parse_write,
)

ENVELOPE = frozenset({"type", "id"})
KEYS = st.sampled_from(["a", "b", "c", "d.e", "f:g", "h-i"])
SCALARS = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
PATCHES = st.dictionaries(KEYS, VALUES, max_size=5)
DOCUMENTS = st.dictionaries(KEYS, VALUES.filter(lambda v: v is not None), max_size=5).map(
    lambda d: merge({}, d)
)


# -- RFC 7396 ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7396 Appendix A, the section-object cases
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ],
)
def test_merge_follows_rfc_7396(
    target: dict[str, Any], patch: dict[str, Any], result: dict[str, Any]
) -> None:
    assert merge(target, patch) == result


def test_merge_changes_neither_argument() -> None:
    target = {"a": {"b": 1}}
    patch = {"a": {"c": 2}}
    assert merge(target, patch) == {"a": {"b": 1, "c": 2}}
    assert (target, patch) == ({"a": {"b": 1}}, {"a": {"c": 2}})


@settings(max_examples=100, deadline=None)
@given(DOCUMENTS, PATCHES)
def test_merge_is_idempotent(document: dict[str, Any], patch: dict[str, Any]) -> None:
    """Applying the same patch twice is applying it once."""
    once = merge(document, patch)
    assert json_equal(merge(once, patch), once)


@settings(max_examples=100, deadline=None)
@given(DOCUMENTS, PATCHES)
def test_merge_result_holds_no_null(document: dict[str, Any], patch: dict[str, Any]) -> None:
    def nulls(value: Any) -> bool:
        if isinstance(value, dict):
            return any(v is None or nulls(v) for v in value.values())
        return False

    assert not nulls(merge(document, patch))


# -- the delta -------------------------------------------------------------------------------
def test_delta_compares_objects_key_by_key() -> None:
    desired = {"led": {"on": True, "lvl": 3}, "fan": [1, 2], "mode": "eco", "empty": {}}
    reported = {"led": {"on": True, "lvl": 2}, "fan": [1, 2], "extra": 1, "mode": 7}
    assert delta(desired, reported) == {"led": {"lvl": 3}, "mode": "eco"}
    assert delta({"a": {"b": 1}}, {"a": 5}) == {"a": {"b": 1}}
    assert delta({"a": [1, 2]}, {"a": [1]}) == {"a": [1, 2]}
    assert delta({"a": 1}, {}) == {"a": 1}


def test_json_equality_is_not_pythons() -> None:
    assert not json_equal(True, 1)
    assert not json_equal(1, True)
    assert not json_equal(0, False)
    assert json_equal(1, 1.0)
    assert not json_equal("1", 1)
    assert not json_equal([1], [1, 2])
    assert not json_equal({"a": 1}, {"b": 1})
    assert not json_equal({"a": 1}, [1])
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})
    assert delta({"flag": True}, {"flag": 1}) == {"flag": True}


@settings(max_examples=100, deadline=None)
@given(DOCUMENTS, DOCUMENTS)
def test_delta_is_empty_when_reported_covers_desired(desired: dict[str, Any], extra: dict[str, Any]) -> None:
    """Reported holding every desired leaf (and more) leaves nothing to do."""
    assert delta(desired, merge(extra, desired)) == {}


@settings(max_examples=100, deadline=None)
@given(DOCUMENTS, DOCUMENTS)
def test_reporting_the_delta_empties_it(desired: dict[str, Any], reported: dict[str, Any]) -> None:
    """A device that applies the delta and reports it converges (no endless delta loop)."""
    assert delta(desired, merge(reported, delta(desired, reported))) == {}


# -- a write ---------------------------------------------------------------------------------
def test_apply_versions_metadata_and_no_change() -> None:
    twin = Twin.empty("d1")
    first = apply(twin, Section.DESIRED, {"led": {"on": True}, "n": 1}, 1000)
    assert (first.changed, first.delta_changed, first.refused) == (True, True, None)
    assert first.twin.version == 2
    assert first.twin.metadata == {
        "desired": {"led": {"on": {"updated_at": format_ms(1000)}}, "n": {"updated_at": format_ms(1000)}},
        "reported": {},
    }
    second = apply(first.twin, Section.DESIRED, {"led": {"on": True, "c": "r"}, "n": 1.0}, 2000)
    meta = second.twin.metadata["desired"]
    assert meta["led"] == {"on": {"updated_at": format_ms(1000)}, "c": {"updated_at": format_ms(2000)}}
    assert meta["n"] == {"updated_at": format_ms(1000)}  # 1.0 is 1: not a change
    leaf_to_object = apply(second.twin, Section.DESIRED, {"n": {"x": 1}, "led": None}, 3000)
    assert leaf_to_object.twin.metadata["desired"] == {"n": {"x": {"updated_at": format_ms(3000)}}}
    same = apply(leaf_to_object.twin, Section.DESIRED, {"n": {"x": 1}, "gone": None}, 4000)
    assert (same.changed, same.twin) == (False, leaf_to_object.twin)
    reported = apply(leaf_to_object.twin, Section.REPORTED, {"other": 1}, 5000)
    assert (reported.changed, reported.delta_changed) == (True, False)
    assert reported.event_data(Section.REPORTED, {"other": 1}) == {
        "version": 5,
        "reported": {"other": 1},
        "delta": {"n": {"x": 1}},
    }
    assert reported.twin.public()["delta"] == {"n": {"x": 1}}


def test_apply_refusals_change_nothing() -> None:
    twin = apply(Twin.empty("d1"), Section.DESIRED, {"a": 1}, 1000).twin
    conflict = apply(twin, Section.DESIRED, {"a": 2}, 2000, if_version=1)
    assert conflict.refused is not None
    assert (conflict.refused.code, conflict.twin, conflict.changed) == (ErrorCode.CONFLICT, twin, False)
    big = apply(twin, Section.REPORTED, {"b": "x" * 20}, 2000, limits=TwinLimits(max_bytes=16))
    assert big.refused is not None
    assert (big.refused.code, big.twin) == (ErrorCode.TOO_LARGE, twin)
    deep = apply(twin, Section.REPORTED, {"a": {"b": {"c": 1}}}, 2000, limits=TwinLimits(max_depth=2))
    assert deep.refused is not None
    assert (deep.refused.code, deep.twin) == (ErrorCode.INVALID_MESSAGE, twin)
    exactly = apply(twin, Section.REPORTED, {"a": {"b": 1}}, 2000, limits=TwinLimits(max_depth=2))
    assert exactly.changed
    assert apply(twin, Section.DESIRED, {"a": 2}, 2000, if_version=2).changed


# -- limits and parsing ------------------------------------------------------------------------
def test_depth() -> None:
    assert [depth(1), depth({}), depth({"a": 1}), depth({"a": [{"b": 1}]}), depth([])] == [0, 1, 1, 3, 1]


@pytest.mark.parametrize(
    "patch",
    [
        {"bad key": 1},
        {"": 1},
        {"k" * 65: 1},
        {"a": {"é": 1}},
        {"a": [{"b c": 1}]},
        {"a": float("nan")},
        {"a": [float("inf")]},
        {"a": -float("inf")},
        {"a": 2**64},
        {"a": -(2**63) - 1},
        {"a": {1, 2}},
        {"a": {"b": {"c": 1}}},  # three levels, two allowed below
        {"a": [[1]]},
    ],
)
def test_check_patch_refuses(patch: dict[str, Any]) -> None:
    with pytest.raises(FleetwireError) as caught:
        check_patch(patch, "desired", TwinLimits(max_depth=2))
    assert caught.value.code is ErrorCode.INVALID_MESSAGE
    assert caught.value.details[0]["loc"][0] == "desired"


def test_check_patch_accepts_json_within_the_limits() -> None:
    patch = {"a": {"b": [1, 2.5, True, None, "s"]}, "k" * 64: -(2**63), "u": 2**64 - 1}
    assert check_patch(patch, "reported") is patch
    with pytest.raises(FleetwireError):
        check_patch([patch], "reported")


def test_parse_write() -> None:
    assert parse_write(
        {"type": "twin_report", "reported": {"a": 1}}, Section.REPORTED, ENVELOPE
    ) == TwinWrite({"a": 1})
    update = {"type": "twin_update", "device_id": "d1", "desired": {}, "if_version": 3}
    assert parse_write(update, Section.DESIRED, ENVELOPE, with_device=True) == TwinWrite({}, 3, "d1")
    for bad, with_device in (
        ({"reported": {}, "desired": {}}, False),
        ({"reported": []}, False),
        ({}, False),
        ({"reported": {}, "if_version": True}, False),
        ({"reported": {}, "if_version": -1}, False),
        ({"reported": {}, "if_version": 2**63}, False),
        ({"reported": {}, "if_version": 1.0}, False),
        ({"reported": {}, "device_id": "d1"}, False),
        ({"reported": {}}, True),
        ({"reported": {}, "device_id": ""}, True),
    ):
        with pytest.raises(FleetwireError) as caught:
            parse_write(bad, Section.REPORTED, ENVELOPE, with_device=with_device)
        assert caught.value.code is ErrorCode.INVALID_MESSAGE, bad
