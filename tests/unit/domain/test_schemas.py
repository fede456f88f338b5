"""domain/schemas.py: the caps (exact at the boundary), the resolver wall (NO_FETCH), RE2 for
format regexes, and the thread-and-timeout helper for async callers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import fastjsonschema
import orjson
import pytest

from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.schemas import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_EMBEDDED_BYTES,
    MAX_SCHEMA_EXPANSION,
    NO_FETCH,
    FetchRefused,
    Re2Pattern,
    SchemaLimits,
    check_schema,
    check_schema_async,
    compile_validator,
)
from tests.listener import Listener

pytestmark = pytest.mark.anyio


def details(schema: object, limits: SchemaLimits | None = None) -> list[dict[str, Any]]:
    with pytest.raises(FleetwireError) as info:
        check_schema(schema, limits or SchemaLimits())
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    return info.value.details


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener() as running:
        yield running


def test_defaults() -> None:
    """The documented defaults (SECURITY.md): 64 KiB, 32 levels, 4096 objects, 64 KiB embedded."""
    assert (MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_EXPANSION) == (65_536, 32, 4096)
    assert MAX_SCHEMA_EMBEDDED_BYTES == 65_536
    assert SchemaLimits() == SchemaLimits(65_536, 32, 4096, 65_536)


def test_size_cap_is_exact() -> None:
    """A schema of exactly max_bytes (compact JSON) passes; one byte more is refused."""
    schema = {"type": "object", "description": "x" * 100}
    size = len(orjson.dumps(schema))
    check_schema(schema, SchemaLimits(max_bytes=size))
    assert details(schema, SchemaLimits(max_bytes=size - 1)) == [
        {"loc": ["telemetry_schema"], "msg": f"larger than {size - 1} bytes as compact JSON"}
    ]


def test_default_size_cap_refuses_a_large_schema_before_compiling() -> None:
    """A 750 KiB schema (6 s to compile) is refused by its size alone."""
    schema = {"properties": {f"k{i}": {"type": "number", "minimum": 0, "maximum": i} for i in range(16_000)}}
    assert len(orjson.dumps(schema)) > 700_000
    assert details(schema) == [
        {"loc": ["telemetry_schema"], "msg": "larger than 65536 bytes as compact JSON"}
    ]


def nested(levels: int) -> dict[str, Any]:
    """A schema whose objects nest `levels` deep under an annotation fastjsonschema ignores
    (nested keywords compile to nested Python blocks, and Python allows 20 of those: a deeper
    `not` chain is refused as "too many statically nested blocks" whatever the cap)."""
    schema: dict[str, Any] = {}
    for _ in range(levels - 1):
        schema = {"x-note": schema}
    return schema


def test_depth_cap_is_exact() -> None:
    """32 nested levels pass; the 33rd is refused where it starts; lists count as levels."""
    check_schema(nested(MAX_SCHEMA_DEPTH))
    assert details(nested(MAX_SCHEMA_DEPTH + 1)) == [
        {"loc": ["telemetry_schema", *["x-note"] * 32], "msg": "nested deeper than 32 levels"}
    ]
    assert details({"anyOf": [{"anyOf": [{}]}]}, SchemaLimits(max_depth=4)) == [
        {"loc": ["telemetry_schema", "anyOf", 0, "anyOf", 0], "msg": "nested deeper than 4 levels"}
    ]


def test_depth_is_checked_without_recursion() -> None:
    """100 000 levels (beyond Python's recursion limit) are refused like 33."""
    assert details(nested(100_000))[0]["msg"] == "nested deeper than 32 levels"


def doubling(levels: int) -> dict[str, Any]:
    """Each definition tries the previous one twice: 2^levels expansions of the leaf."""
    definitions: dict[str, Any] = {"d0": {"type": "string", "minLength": 1000}}
    for i in range(1, levels + 1):
        previous = {"$ref": f"#/definitions/d{i - 1}"}
        definitions[f"d{i}"] = {"anyOf": [previous, dict(previous)]}
    return {"definitions": definitions, "properties": {"a": {"$ref": f"#/definitions/d{levels}"}}}


def test_ref_fan_out_is_refused() -> None:
    """Nested anyOf over shared $refs (1.8 s a record at 20 levels) is refused; a few levels
    compile and validate."""
    assert details(doubling(20)) == [
        {
            "loc": ["telemetry_schema"],
            "msg": "expands to more than 4096 schema objects once every `$ref` is followed",
        }
    ]
    validate = compile_validator(doubling(5))
    assert validate({"a": "y" * 1000}) == {"a": "y" * 1000}
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        validate({"a": "y"})


def test_expansion_counts_every_ref() -> None:
    """Expansion = objects of the document plus those of every target each time it is
    referenced (a target inside the document is counted there too)."""
    schema = {"definitions": {"t": {"type": "number"}}, "properties": {"a": {"$ref": "#/definitions/t"}}}
    # root, definitions, t, properties, a: 5 objects; plus t once through the reference.
    check_schema(schema, SchemaLimits(max_expansion=6))
    assert details(schema, SchemaLimits(max_expansion=5))[0]["msg"] == (
        "expands to more than 5 schema objects once every `$ref` is followed"
    )


def bush(levels: int) -> dict[str, Any]:
    """An inline two-way anyOf tree: small as JSON, but every object's definition is written
    into the generated code at each of its checks."""
    if levels == 0:
        return {"type": "string", "minLength": 1000}
    return {"anyOf": [bush(levels - 1), bush(levels - 1)]}


def test_embedded_schema_text_is_capped() -> None:
    """The sum of every object's JSON (what the generated code embeds) is capped: a 12 KiB
    anyOf tree embedding 111 KiB is refused; the count is exact at the boundary."""
    schema = {"additionalProperties": bush(8)}
    assert len(orjson.dumps(schema)) == 12_044
    assert details(schema) == [
        {
            "loc": ["telemetry_schema"],
            "msg": "compiles to too much code: its checks embed 113689 bytes of schema text, more than 65536",
        }
    ]
    check_schema(schema, SchemaLimits(max_embedded_bytes=113_689))
    # A $ref's target is embedded at every object enclosing the reference.
    refs = {"definitions": {"b": {"enum": ["x" * 100]}}, "properties": {"a": {"$ref": "#/definitions/b"}}}
    raw = sum(len(orjson.dumps(o)) for o in (refs, refs["definitions"], refs["definitions"]["b"]))
    raw += sum(len(orjson.dumps(o)) for o in (refs["properties"], refs["properties"]["a"]))
    delta = len(orjson.dumps(refs["definitions"]["b"])) - len(orjson.dumps(refs["properties"]["a"]))
    expected = raw + 3 * delta  # root, properties and the holder itself enclose the reference
    check_schema(refs, SchemaLimits(max_embedded_bytes=expected))
    assert details(refs, SchemaLimits(max_embedded_bytes=expected - 1))[0]["msg"] == (
        f"compiles to too much code: its checks embed {expected} bytes of schema text, more than {expected - 1}"
    )


def test_refs_whose_generated_names_clash_are_refused() -> None:
    """fastjsonschema names one function per target after mangling (`-` and `_` alike, lower
    case); two targets under one name would validate one with the other, or recurse forever."""
    schema = {
        "definitions": {"a-b": {"$ref": "#/definitions/a_b"}, "a_b": {"type": "number"}},
        "properties": {"t": {"$ref": "#/definitions/a-b"}},
    }
    assert details(schema) == [
        {
            "loc": ["telemetry_schema", "properties", "t", "$ref"],
            "msg": "clashes with another reference's generated name `validate___definitions_a_b`",
        }
    ]


@pytest.mark.parametrize(
    "ref", ["{url}/s.json", "https://127.0.0.1:{port}/s.json", "s.json", "file:///dev/zero"]
)
def test_no_fetch_handlers_refuse_every_scheme(listener: Listener, ref: str) -> None:
    """The second wall on its own: given NO_FETCH, fastjsonschema itself fetches nothing for any
    scheme, a relative URI's empty one included (without it, the listener would be asked for
    the schema and `file:///dev/zero` would be read forever)."""
    target = ref.format(url=listener.url, port=listener.port)
    with pytest.raises(FetchRefused, match="refused to fetch"):
        fastjsonschema.compile({"properties": {"t": {"$ref": target}}}, handlers=NO_FETCH)
    assert listener.connections_before_sentinel() == []


def test_format_regexes_run_on_re2_where_it_can() -> None:
    """fastjsonschema's own format regexes move to RE2 (`\\Z` spelt `\\z`), except the ones with
    lookaround (email), which are fixed and linear enough; the formats still mean the same."""
    schema = {"properties": {"d": {"format": "date-time"}, "i": {"format": "ipv4"}, "e": {"format": "email"}}}
    validate = compile_validator(schema)
    patterns = validate.__globals__["REGEX_PATTERNS"]
    assert {k: type(v) for k, v in patterns.items()} == {
        "date-time_re_pattern": Re2Pattern,
        "ipv4_re_pattern": Re2Pattern,
        "email_re_pattern": re.Pattern,
    }
    validate({"d": "2025-11-25T18:00:00Z", "i": "10.0.0.1", "e": "a@b.example"})
    for bad in ({"d": "2025-02-30T18:00:00Z"}, {"d": "2025-11-25T18:00:00Z\n"}, {"i": "10.0.0.256"}):
        with pytest.raises(fastjsonschema.JsonSchemaValueException):
            validate(bad)


def test_re2_pattern_takes_lone_surrogates() -> None:
    """REST JSON may carry a lone surrogate, which is not UTF-8: matched, not a 500."""
    assert Re2Pattern("^a").search("a\ud800") is True
    assert Re2Pattern("^b").search("a\ud800") is False


def test_compiling_does_not_change_the_callers_schema() -> None:
    """fastjsonschema rewrites `$ref` in place while resolving: it gets a copy."""
    schema = {"definitions": {"t": {"type": "number"}}, "properties": {"a": {"$ref": "#/definitions/t"}}}
    before = orjson.dumps(schema)
    compile_validator(schema)
    assert orjson.dumps(schema) == before


async def test_check_schema_async() -> None:
    """The async helper passes a good schema, refuses a bad one with the same details, and
    refuses one that does not compile within its time limit."""
    await check_schema_async({"type": "object"})
    with pytest.raises(FleetwireError) as info:
        await check_schema_async({"$ref": "#"})
    assert info.value.details == [
        {"loc": ["telemetry_schema", "$ref"], "msg": "`$ref` cycle: this reference leads back to itself"}
    ]
    with pytest.raises(FleetwireError) as info:
        await check_schema_async({"type": "object"}, timeout_s=0)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert info.value.details == [{"loc": ["telemetry_schema"], "msg": "took longer than 0 s to compile"}]
