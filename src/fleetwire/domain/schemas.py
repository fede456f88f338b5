"""Telemetry JSON Schemas as untrusted input (security review): refused unless they are safe to
compile and to run on every record; compiled so that nothing is fetched, no record is changed
and every regex runs in linear time. No I/O.

An admin sets a device's `telemetry_schema` over REST, and fastjsonschema compiles it into Python
code that runs on the ingest path. Left alone, fastjsonschema fetches any non-local `$ref` with
urllib (http, https, file…) synchronously and without a timeout, fills `default` values into the
validated data, compiles `pattern` with the backtracking `re` engine, and follows `$ref` cycles
into a RecursionError on every record. So `check_schema`:

- refuses every `$ref` that does not start with `#`, every string-valued `$id`/`id` (they change
  what a reference resolves to), `#name` fragments, references that do not resolve, `$ref` cycles
  and references whose expansion exceeds `max_expansion` schema objects;
- caps the schema's size (compact JSON bytes) and nesting depth;
- refuses every `pattern`/`patternProperties` regex RE2 cannot run, and the compiled validator
  runs them on RE2;
- compiles with `handlers` that refuse every URI scheme (a second wall: nothing above lets a
  remote reference through) and `use_default=False`;
- reports every failure, whatever the library raised, as `invalid_message` with `details`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urldefrag, urljoin

import fastjsonschema
import orjson
import re2
from fastjsonschema.ref_resolver import RefResolver, resolve_path

from fleetwire.domain.errors import FleetwireError, invalid

# Defaults of SchemaLimits (SECURITY.md, limits). A real telemetry schema is a few hundred bytes
# to a few KiB: 256 keys with a type and a range each are about 12 KiB.
MAX_SCHEMA_BYTES: Final = 65_536
MAX_SCHEMA_DEPTH: Final = 32
# Schema objects once every `$ref` is replaced by its target: the work of validating one value.
# Without refs it is the schema's own object count (a 64 KiB schema has at most ~4000); with refs
# two-way `anyOf` nesting doubles it at each level, which this bound stops.
MAX_SCHEMA_EXPANSION: Final = 4096
# fastjsonschema writes each object's definition (its `$ref`s replaced by their targets) into the
# generated code at every check that can fail, for the exception, and builds it again when that
# check fails: code size and the cost of a failing record grow with the sum, over objects, of
# their expanded JSON text. An inline two-way `anyOf` tree of 48 KiB sums to 540 KiB: 3.4 MB of
# code, 1.3 s to compile, 150 ms to refuse one record; at this cap the worst measured is 50 ms to
# compile and 2.5 ms to refuse a record. 256 typed properties with ranges sum to about 37 KiB.
MAX_SCHEMA_EMBEDDED_BYTES: Final = 65_536
COMPILE_TIMEOUT_S: Final = 5.0

FIELD: Final = "telemetry_schema"

Validator = Callable[[Any], Any]
Loc = tuple[str | int, ...]

MSG_REMOTE_REF: Final = "only local references starting with `#` are allowed; nothing is fetched"
MSG_PLAIN_NAME: Final = (
    "a `#name` fragment needs `$id`, which is not allowed; use a JSON pointer like `#/definitions/x`"
)
MSG_UNRESOLVED: Final = "does not resolve to a part of this schema"
MSG_NOT_OBJECT: Final = "must point at a schema object"
MSG_CYCLE: Final = "`$ref` cycle: this reference leads back to itself"


def msg_identifier(keyword: str) -> str:
    return f"`{keyword}` with a string value is not allowed (schema identifiers are not resolved)"


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """Bounds on one telemetry schema; the defaults are the module constants above."""

    max_bytes: int = MAX_SCHEMA_BYTES
    max_depth: int = MAX_SCHEMA_DEPTH
    max_expansion: int = MAX_SCHEMA_EXPANSION
    max_embedded_bytes: int = MAX_SCHEMA_EMBEDDED_BYTES


DEFAULT_LIMITS: Final = SchemaLimits()


class FetchRefused(Exception):
    """Raised by NO_FETCH: fastjsonschema wanted to fetch a URI."""


def _refuse_fetch(uri: str) -> Any:
    raise FetchRefused(f"refused to fetch {uri!r}")


class _NoFetch(Mapping[str, Callable[[str], Any]]):
    """fastjsonschema's `handlers`: it fetches a URI with urllib unless `scheme in handlers`
    (ref_resolver.resolve_remote), so this mapping claims every scheme, the empty one of a
    relative URI included, and answers each with a refusal."""

    def __getitem__(self, scheme: str) -> Callable[[str], Any]:
        return _refuse_fetch

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


NO_FETCH: Final = _NoFetch()


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is answered to the caller, not logged to stderr
    return options


_RE2_OPTIONS: Final = _re2_options()


class Re2Pattern:
    """Stands in for a compiled `re.Pattern` in fastjsonschema's generated code, which calls
    `REGEX_PATTERNS[p].search(value)` (`match` for formats): RE2 answers in time linear in the
    text whatever the pattern. An `re2.Set` of one pattern is used because it only says whether
    there is a match: about 0.9 µs a call against 2.8 µs for `re2.compile(p).search`, which
    also builds a match object."""

    __slots__ = ("_set", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._set = re2.Set.SearchSet(_RE2_OPTIONS)
        self._set.Add(pattern)
        self._set.Compile()

    def search(self, text: str) -> bool:
        try:
            return self._set.Match(text) is not None
        except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): not valid UTF-8
            return self._set.Match(text.encode("utf-8", "surrogatepass")) is not None

    # fastjsonschema calls `match` only for its format regexes, which all start with `^`.
    match = search


def re2_error(pattern: str) -> str | None:
    """Why RE2 cannot run this pattern, or None if it can."""
    try:
        re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
    return None


@dataclass
class _Walk:
    """What one pass over the document found."""

    problems: list[dict[str, Any]] = field(default_factory=list)
    refs: list[tuple[Loc, str]] = field(default_factory=list)  # where (the dict holding it), the ref
    patterns: set[str] = field(default_factory=set)


def _problem(loc: Loc, msg: str) -> dict[str, Any]:
    return {"loc": [FIELD, *loc], "msg": msg}


def _walk(schema: dict[str, Any], max_depth: int) -> _Walk:
    """One iterative pass in document order (a recursive one would overflow on deep input before
    the depth check). fastjsonschema's resolver looks at `$ref`, `$id` and `id` in every object
    it reaches, `const` and `default` values included, so this does too."""
    found = _Walk()
    stack: list[tuple[Any, Loc, int]] = [(schema, (), 1)]
    while stack:
        node, loc, depth = stack.pop()
        if depth > max_depth:
            return _Walk(problems=[_problem(loc, f"nested deeper than {max_depth} levels")])
        if isinstance(node, list):
            stack.extend((item, (*loc, i), depth + 1) for i, item in reversed(list(enumerate(node))))
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref.startswith("#"):
                found.refs.append((loc, ref))
            else:
                found.problems.append(_problem((*loc, "$ref"), MSG_REMOTE_REF))
        for keyword in ("$id", "id"):
            if isinstance(node.get(keyword), str):
                found.problems.append(_problem((*loc, keyword), msg_identifier(keyword)))
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            found.patterns.add(pattern)
            why = re2_error(pattern)
            if why is not None:
                found.problems.append(_problem((*loc, "pattern"), _re2_message(why)))
        by_pattern = node.get("patternProperties")
        if isinstance(by_pattern, dict):
            for key in by_pattern:
                found.patterns.add(key)
                why = re2_error(key)
                if why is not None:
                    found.problems.append(_problem((*loc, "patternProperties", key), _re2_message(why)))
        children = [(value, (*loc, key), depth + 1) for key, value in node.items()]
        stack.extend(reversed(children))
    return found


def _re2_message(why: str) -> str:
    return f"pattern not supported by the linear-time regex engine (RE2): {why}"


def _resolve(schema: dict[str, Any], ref: str) -> tuple[Any, str | None]:
    """The target of a local `$ref`, resolved as fastjsonschema does (urljoin on the empty base,
    then its own JSON-pointer walk), or why it does not resolve."""
    _, fragment = urldefrag(urljoin("", ref))
    if fragment and not fragment.startswith("/"):
        return None, MSG_PLAIN_NAME
    try:
        target = resolve_path(schema, fragment)
    except Exception:  # JsonSchemaDefinitionException, IndexError, ValueError…: all "no such part"
        return None, MSG_UNRESOLVED
    if not isinstance(target, dict):
        return None, MSG_NOT_OBJECT
    return target, None


def _function_name(ref: str) -> tuple[str, str]:
    """(uri, generated function name) as fastjsonschema derives them for a `$ref`."""
    resolver = RefResolver("", {}, store={}, handlers=NO_FETCH)
    with resolver.in_scope(ref):
        return resolver.get_uri(), resolver.get_scope_name()


def _subtree(node: Any) -> Iterator[Any]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_refs(
    schema: dict[str, Any], refs: list[tuple[Loc, str]], limits: SchemaLimits
) -> list[dict[str, Any]]:
    """Resolve every `$ref`, then refuse cycles and an expansion beyond `max_expansion`.

    A target's expansion is its own objects plus the expansion of every reference inside it. A
    reference is counted from every target whose subtree holds it, definitions included, so this
    may overcount (never undercount) and treats a cycle even in an unused definition as a cycle.
    """
    problems: list[dict[str, Any]] = []
    target_of: dict[int, dict[str, Any]] = {}  # id of the dict holding a `$ref` -> its target
    names: dict[str, str] = {"validate": ""}  # the root's function: fastjsonschema's main name
    holders = list(_holders(schema, refs))
    for (loc, ref), holder in zip(refs, holders, strict=True):
        target, why = _resolve(schema, ref)
        if why is not None:
            problems.append(_problem((*loc, "$ref"), why))
            continue
        target_of[id(holder)] = target
        uri, name = _function_name(ref)
        if names.setdefault(name, uri) != uri:
            # fastjsonschema names one function per target; two targets with one name would
            # silently validate one with the other (or recurse forever).
            problems.append(
                _problem((*loc, "$ref"), f"clashes with another reference's generated name `{name}`")
            )
    if problems:
        return problems

    # The targets' graph: root -> every reference in its subtree, and so on. Found lazily.
    loc_of = {id(holder): loc for (loc, _), holder in zip(refs, holders, strict=True)}
    local: dict[int, int] = {}
    edges: dict[int, list[tuple[int, dict[str, Any]]]] = {}

    def explore(target: dict[str, Any]) -> None:
        count = 0
        out: list[tuple[int, dict[str, Any]]] = []
        for item in _subtree(target):
            count += 1
            child = target_of.get(id(item))
            if child is not None:
                out.append((id(item), child))
        local[id(target)] = count
        edges[id(target)] = out

    max_expansion = limits.max_expansion
    cap = max_expansion + 1
    visiting: set[int] = set()
    value: dict[int, int] = {}
    explore(schema)
    visiting.add(id(schema))
    stack: list[tuple[dict[str, Any], Iterator[tuple[int, dict[str, Any]]], list[int]]] = [
        (schema, iter(edges[id(schema)]), [local[id(schema)]])
    ]
    while stack:
        target, pending, total = stack[-1]
        for holder_id, child in pending:
            if id(child) in visiting:
                return [_problem((*loc_of[holder_id], "$ref"), MSG_CYCLE)]
            if id(child) in value:
                total[0] = min(cap, total[0] + value[id(child)])
                continue
            if id(child) not in edges:
                explore(child)
            visiting.add(id(child))
            stack.append((child, iter(edges[id(child)]), [local[id(child)]]))
            break
        else:
            stack.pop()
            visiting.discard(id(target))
            value[id(target)] = total[0]
            if stack:
                parent_total = stack[-1][2]
                parent_total[0] = min(cap, parent_total[0] + total[0])
    if value[id(schema)] > max_expansion:
        return [
            _problem((), f"expands to more than {max_expansion} schema objects once every `$ref` is followed")
        ]
    embedded = _embedded_bytes(schema, refs, holders, target_of)
    if embedded > limits.max_embedded_bytes:
        return [
            _problem(
                (),
                f"compiles to too much code: its checks embed {embedded} bytes of schema text, "
                f"more than {limits.max_embedded_bytes}",
            )
        ]
    return []


def _embedded_bytes(
    schema: dict[str, Any], refs: list[tuple[Loc, str]], holders: list[Any], target_of: dict[int, Any]
) -> int:
    """The sum over schema objects of their compact JSON with every `$ref` inside replaced by its
    target (one level, as fastjsonschema's `_expand_refs` does): what the generated code embeds.
    Bounded before it is computed: depth x size of the document."""
    raw: dict[int, int] = {}
    total = 0
    for item in _subtree(schema):
        raw[id(item)] = size = len(orjson.dumps(item))
        total += size
    for (loc, _), holder in zip(refs, holders, strict=True):
        delta = raw[id(target_of[id(holder)])] - raw[id(holder)]
        node: Any = schema
        enclosing = 1 if isinstance(node, dict) else 0
        for part in loc:
            node = node[part]
            enclosing += isinstance(node, dict)
        total += delta * enclosing
    return total


def _holders(schema: dict[str, Any], refs: list[tuple[Loc, str]]) -> Iterator[Any]:
    for loc, _ in refs:
        node: Any = schema
        for part in loc:
            node = node[part]
        yield node


def _refusal(problems: list[dict[str, Any]]) -> FleetwireError:
    return invalid(f"{FIELD} refused: {problems[0]['msg']}", problems)


def inspect_schema(schema: object, limits: SchemaLimits = DEFAULT_LIMITS) -> tuple[bytes, set[str]]:
    """Refuse what is unsafe to compile; return the schema's compact JSON and its regexes."""
    if not isinstance(schema, dict):
        raise _refusal([_problem((), "must be a JSON Schema object")])
    text: bytes | None = None
    unencodable: str | None = None
    try:
        text = orjson.dumps(schema)
    except orjson.JSONEncodeError as exc:  # integers beyond 64 bits, non-string keys, deep nesting
        unencodable = str(exc)
    if text is not None and len(text) > limits.max_bytes:
        raise _refusal([_problem((), f"larger than {limits.max_bytes} bytes as compact JSON")])
    found = _walk(schema, limits.max_depth)
    if found.problems:
        raise _refusal(found.problems)
    if text is None:
        raise _refusal([_problem((), f"not representable as JSON: {unencodable}")])
    problems = _check_refs(schema, found.refs, limits)
    if problems:
        raise _refusal(problems)
    return text, found.patterns


def _use_re2(validate: Any, user_patterns: set[str]) -> None:
    """Swap the generated code's regexes (its global `REGEX_PATTERNS`) for RE2 ones.

    User patterns are compiled from their source as written: RE2's `$` is the end of the text as
    in ECMA 262, so fastjsonschema's `$` -> `\\Z` rewrite is not needed. fastjsonschema's own
    format regexes end in `\\Z`, which RE2 spells `\\z`; the three that use lookaround (email,
    idn-hostname, duration) stay on `re`: they are fixed, not the schema author's, and take
    under 0.4 ms on the longest telemetry string (1024 chars).
    """
    patterns: dict[str, Any] = validate.__globals__["REGEX_PATTERNS"]
    for key, compiled in list(patterns.items()):
        if key in user_patterns:
            patterns[key] = Re2Pattern(key)
            continue
        source: str = compiled.pattern
        if source.startswith("^") and source.endswith("\\Z") and not source.endswith("\\\\Z"):
            translated = source[:-2] + "\\z"
            if re2_error(translated) is None:
                patterns[key] = Re2Pattern(translated)


def compile_validator(schema: object, limits: SchemaLimits = DEFAULT_LIMITS) -> Validator:
    """A validator for telemetry `data`: never fetches, never changes its input, regexes on RE2.
    Raises FleetwireError(invalid_message) with details for any schema it refuses."""
    text, user_patterns = inspect_schema(schema, limits)
    # A private copy: fastjsonschema rewrites `$ref` values in place while resolving.
    document = orjson.loads(text)
    try:
        validate = fastjsonschema.compile(document, handlers=NO_FETCH, use_default=False)
        _use_re2(validate, user_patterns)
    except Exception as exc:  # whatever the library raises (re.error, TypeError…) is the schema's
        raise _refusal([_problem((), f"not a valid JSON Schema: {_describe(exc)}")]) from exc
    return validate


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, re.error):
        return f"bad regular expression: {text}"
    return text


def check_schema(schema: object, limits: SchemaLimits = DEFAULT_LIMITS) -> None:
    """Refuse a telemetry_schema that is unsafe or does not compile (invalid_message)."""
    compile_validator(schema, limits)


async def check_schema_async(
    schema: object, limits: SchemaLimits = DEFAULT_LIMITS, timeout_s: float = COMPILE_TIMEOUT_S
) -> None:
    """`check_schema` in a worker thread, so compiling does not stall the event loop, refused
    if it takes longer than `timeout_s`. A thread cannot be stopped: after a timeout it runs to
    its end in the background, which the size, depth and expansion caps keep short."""
    try:
        await asyncio.wait_for(asyncio.to_thread(check_schema, schema, limits), timeout_s)
    except TimeoutError as exc:
        raise _refusal([_problem((), f"took longer than {timeout_s:g} s to compile")]) from exc


__all__ = [
    "DEFAULT_LIMITS",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_EMBEDDED_BYTES",
    "MAX_SCHEMA_EXPANSION",
    "NO_FETCH",
    "FetchRefused",
    "Re2Pattern",
    "SchemaLimits",
    "check_schema",
    "check_schema_async",
    "compile_validator",
    "inspect_schema",
]
