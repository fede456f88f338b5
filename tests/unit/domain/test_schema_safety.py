"""Hostile telemetry schemas (security review): `check_schema` refuses what could fetch, loop
or backtrack, with `invalid_message` and details; `SchemaCache.check` never mutates records,
never fetches, and runs patterns on a linear-time engine."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.telemetry import SchemaCache, check_schema, parse_batch, parse_single
from tests.listener import Listener

NOW = 1_764_093_600_000
SKEW = 300_000


def refusal(schema: object) -> FleetwireError:
    with pytest.raises(FleetwireError) as info:
        check_schema(schema)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert info.value.details, "every refusal names what was refused"
    return info.value


@pytest.fixture
def listener() -> Any:
    with Listener() as running:
        yield running


@pytest.mark.parametrize(
    "ref",
    [
        "{url}/schema.json",
        "{url}/schema.json#/definitions/x",
        "//127.0.0.1:{port}/schema.json",
        "https://127.0.0.1:{port}/schema.json",
        "ftp://127.0.0.1:{port}/schema.json",
        "schema.json",
    ],
)
def test_non_local_refs_are_refused_and_nothing_connects(listener: Listener, ref: str) -> None:
    """A `$ref` not starting with `#` is refused before compiling; the listener it names sees
    no connection (the sentinel is the first one)."""
    target = ref.format(url=listener.url, port=listener.port)
    error = refusal({"type": "object", "properties": {"t": {"$ref": target}}})
    assert error.details == [
        {
            "loc": ["telemetry_schema", "properties", "t", "$ref"],
            "msg": "only local references starting with `#` are allowed; nothing is fetched",
        }
    ]
    assert listener.connections_before_sentinel() == []


def test_file_refs_are_refused(tmp_path: Path) -> None:
    """`file:` references are refused: the file (a valid schema) is never read."""
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"type": "string"}))
    error = refusal({"$ref": secret.as_uri()})
    assert error.details == [
        {
            "loc": ["telemetry_schema", "$ref"],
            "msg": "only local references starting with `#` are allowed; nothing is fetched",
        }
    ]


def test_refs_hidden_in_data_keywords_are_refused(listener: Listener) -> None:
    """fastjsonschema expands `$ref` even inside `const`/`default` when it writes error
    messages, so a remote `$ref` anywhere in the document is refused."""
    error = refusal({"properties": {"t": {"minimum": 1, "default": {"$ref": f"{listener.url}/x"}}}})
    assert [d["loc"] for d in error.details] == [["telemetry_schema", "properties", "t", "default", "$ref"]]
    assert listener.connections_before_sentinel() == []


@pytest.mark.parametrize(
    ("schema", "loc", "keyword"),
    [
        ({"$id": "http://127.0.0.1:9/s.json", "type": "object"}, ["$id"], "$id"),
        ({"properties": {"t": {"id": "http://127.0.0.1:9/t.json"}}}, ["properties", "t", "id"], "id"),
        ({"definitions": {"a": {"$id": "#a"}}, "properties": {"t": {"$ref": "#a"}}}, None, "$id"),
    ],
)
def test_identifiers_are_refused(schema: dict[str, Any], loc: list[str] | None, keyword: str) -> None:
    """`$id` (and draft-04 `id`) with a string value changes how references resolve: refused."""
    error = refusal(schema)
    messages = {d["msg"] for d in error.details}
    assert f"`{keyword}` with a string value is not allowed (schema identifiers are not resolved)" in messages
    if loc is not None:
        assert error.details[0]["loc"] == ["telemetry_schema", *loc]


def test_a_property_named_id_is_fine() -> None:
    """A property called `id` (its value a schema, not a string) is an ordinary property."""
    check_schema({"type": "object", "properties": {"id": {"type": "string"}, "$id": {"type": "number"}}})


@pytest.mark.parametrize(
    ("schema", "loc"),
    [
        ({"$ref": "#"}, ["$ref"]),
        ({"properties": {"t": {"$ref": "#"}}}, ["properties", "t", "$ref"]),
        (
            {
                "definitions": {
                    "a": {"$ref": "#/definitions/b"},
                    "b": {"anyOf": [{"$ref": "#/definitions/a"}]},
                },
                "properties": {"t": {"$ref": "#/definitions/a"}},
            },
            None,
        ),
    ],
)
def test_ref_cycles_are_refused(schema: dict[str, Any], loc: list[str] | None) -> None:
    """A `$ref` that leads back to itself (directly or through others) is refused at
    registration instead of failing every telemetry message with a RecursionError."""
    error = refusal(schema)
    assert error.details[0]["msg"] == "`$ref` cycle: this reference leads back to itself"
    if loc is not None:
        assert error.details[0]["loc"] == ["telemetry_schema", *loc]


def test_local_refs_work() -> None:
    """JSON-pointer references into the same document compile and validate."""
    schema = {
        "definitions": {"temp": {"type": "number", "maximum": 50}},
        "properties": {"t1": {"$ref": "#/definitions/temp"}, "t2": {"$ref": "#/definitions/temp"}},
    }
    check_schema(schema)
    cache = SchemaCache()
    cache.check(schema, parse_single({"data": {"t1": 1, "t2": 2}}, NOW, SKEW, frozenset()), batch=False)
    with pytest.raises(FleetwireError) as info:
        cache.check(schema, parse_single({"data": {"t1": 1, "t2": 99}}, NOW, SKEW, frozenset()), batch=False)
    assert info.value.details == [
        {"loc": ["data"], "msg": "telemetry schema: data.t2 must be smaller than or equal to 50"}
    ]


@pytest.mark.parametrize(
    ("ref", "msg"),
    [
        ("#/definitions/missing", "does not resolve to a part of this schema"),
        (
            "#name",
            "a `#name` fragment needs `$id`, which is not allowed; use a JSON pointer like `#/definitions/x`",
        ),
    ],
)
def test_unresolvable_local_refs_are_refused(ref: str, msg: str) -> None:
    """A local reference must point at a part of the document."""
    error = refusal({"properties": {"t": {"$ref": ref}}})
    assert error.details == [{"loc": ["telemetry_schema", "properties", "t", "$ref"], "msg": msg}]


@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"s": {"pattern": "("}}},
        {"patternProperties": {"[": {"type": "number"}}},
        {"properties": {"s": {"pattern": 5}}},
        {"type": "object", "properties": 5},
        {"$ref": 5},
        {"minimum": "x"},
        {"type": ["number", 7]},
        {"required": "t"},
        {"properties": {"t": {"$ref": "#/properties/t/type"}, "u": {"type": "number"}}},
        {"items": [1, 2]},
        {"dependencies": {"a": 5}},
        {"enum": 5},
        {"big": 2**70},
    ],
)
def test_every_failure_is_invalid_message(schema: dict[str, Any]) -> None:
    """Whatever fastjsonschema or the regex engine raise (re.error, TypeError, KeyError...)
    reaches the caller as `invalid_message` with details, never as a 500."""
    error = refusal(schema)
    assert all(set(d) == {"loc", "msg"} and d["loc"][0] == "telemetry_schema" for d in error.details)


def test_defaults_never_change_records() -> None:
    """A `default` for a missing property is not filled into the record being validated."""
    schema = {
        "type": "object",
        "properties": {"t": {"type": "number"}, "extra": {"default": {"x": 1}}, "n": {"default": 3}},
    }
    check_schema(schema)
    records = parse_batch([{"data": {"t": 1}}, {"data": {"t": 2, "n": 4}}], NOW, SKEW)
    SchemaCache().check(schema, records, batch=True)
    assert [r.values for r in records] == [{"t": 1}, {"t": 2, "n": 4}]


def test_schema_cache_refuses_a_stored_hostile_schema(listener: Listener) -> None:
    """A hostile schema stored before these checks existed is refused when telemetry arrives
    (invalid_message), not fetched and not compiled."""
    records = parse_single({"data": {"t": 1}}, NOW, SKEW, frozenset())
    cache = SchemaCache()
    for _ in range(2):  # the refusal is remembered like a compiled validator
        with pytest.raises(FleetwireError) as info:
            cache.check({"properties": {"t": {"$ref": f"{listener.url}/x"}}}, records, batch=False)
        assert info.value.code is ErrorCode.INVALID_MESSAGE
        assert info.value.message == (
            "the device's telemetry_schema is refused; none stored: "
            "only local references starting with `#` are allowed; nothing is fetched"
        )
    assert listener.connections_before_sentinel() == []


CATASTROPHIC = "^(a+)+$"  # exponential for a backtracking engine on "aaa...a!"


def test_patterns_run_on_re2() -> None:
    """Every `pattern` and `patternProperties` regex of a compiled validator runs on RE2 (linear
    time): none is a backtracking `re.Pattern`. With backtracking, the 64-char string below
    would take about 2^64 steps; on RE2 it is answered at once."""
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": CATASTROPHIC}},
        "patternProperties": {"^(x+x+)+y$": {"type": "number"}},
    }
    check_schema(schema)
    validate = SchemaCache().validator(schema)
    patterns = validate.__globals__["REGEX_PATTERNS"]
    assert sorted(patterns) == ["^(a+)+$", "^(x+x+)+y$"]
    assert not any(isinstance(p, re.Pattern) for p in patterns.values())
    cache = SchemaCache()
    ok = parse_batch([{"data": {"s": "a" * 64}}, {"data": {"x" * 60 + "y": 1}}], NOW, SKEW)
    cache.check(schema, ok, batch=True)
    bad = parse_batch([{"data": {"s": "a" * 64 + "!"}}, {"data": {"x" * 60 + "y": "no"}}], NOW, SKEW)
    with pytest.raises(FleetwireError) as info:
        cache.check(schema, bad, batch=True)
    assert [d["loc"] for d in info.value.details] == [["records", 0, "data"], ["records", 1, "data"]]


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("(a)\\1", "invalid escape sequence: \\1"),
        ("^(?=a)a", "invalid perl operator: (?="),
        ("a{1001}", "invalid repetition size: {1001}"),
    ],
)
def test_patterns_re2_cannot_run_are_refused(pattern: str, why: str) -> None:
    """Backreferences, lookaround and huge repetitions have no linear-time form: refused."""
    error = refusal({"properties": {"s": {"type": "string", "pattern": pattern}}})
    assert error.details == [
        {
            "loc": ["telemetry_schema", "properties", "s", "pattern"],
            "msg": f"pattern not supported by the linear-time regex engine (RE2): {why}",
        }
    ]


def test_pattern_semantics_on_re2() -> None:
    """`$` is the end of the string (ECMA 262), so a trailing newline does not match; a
    pattern is unanchored unless it says so."""
    schema = {"properties": {"s": {"pattern": "^ab$"}, "u": {"pattern": "b"}}}
    cache = SchemaCache()
    cache.check(schema, parse_batch([{"data": {"s": "ab", "u": "abc"}}], NOW, SKEW), batch=True)
    for data in ({"s": "ab\n"}, {"u": "a"}):
        with pytest.raises(FleetwireError):
            cache.check(schema, parse_batch([{"data": data}], NOW, SKEW), batch=True)
