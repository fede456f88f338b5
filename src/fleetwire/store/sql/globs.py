"""The `devices` claim globs (fnmatchcase semantics) as SQLite GLOB or PostgreSQL regex."""

from __future__ import annotations

import string
from fnmatch import fnmatchcase
from typing import Final

# Characters of a device id (domain.devices.DEVICE_ID); bracket sets are resolved against them.
ID_CHARS: Final = string.ascii_letters + string.digits + "_.:-"
_Token = tuple[str, str]  # ("*", ""), ("?", ""), ("lit", char), ("set", chars)


def glob_tokens(pattern: str) -> list[_Token] | None:
    """A glob as tokens with fnmatchcase semantics; None if it can match no device id.

    A bracket set becomes the explicit id characters that fnmatchcase itself says it
    matches, so negation, ranges, reversed ranges and a literal `]` or `^` need no
    translation into either database's dialect.
    """
    tokens: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c in "*?":
            tokens.append((c, ""))
        elif c != "[":
            tokens.append(("lit", c))
        else:
            j = i + (1 if i < n and pattern[i] == "!" else 0)
            j += 1 if j < n and pattern[j] == "]" else 0
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                tokens.append(("lit", "["))  # fnmatch: an unclosed bracket is a literal
                continue
            bracket = pattern[i - 1 : j + 1]
            i = j + 1
            chars = "".join(ch for ch in ID_CHARS if fnmatchcase(ch, bracket))
            if not chars:
                return None
            tokens.append(("set", chars))
    return tokens


def glob_sqlite(pattern: str) -> str | None:
    """An fnmatchcase pattern as a SQLite GLOB (case-sensitive), None if it matches nothing."""
    tokens = glob_tokens(pattern)
    if tokens is None:
        return None
    out: list[str] = []
    for kind, text in tokens:
        if kind in "*?":
            out.append(kind)
        elif kind == "lit":
            out.append("[" + text + "]" if text in "*?[" else text)
        else:  # `-` last is a literal in a GLOB set; `]` and `^` are not id characters
            out.append("[" + text.replace("-", "") + ("-" if "-" in text else "") + "]")
    return "".join(out)


def glob_regex(pattern: str) -> str | None:
    """An fnmatchcase pattern as an anchored PostgreSQL regex, None if it matches nothing."""
    tokens = glob_tokens(pattern)
    if tokens is None:
        return None

    def escape(text: str) -> str:  # in an ARE, backslash + non-alphanumeric is that character
        return "".join(ch if ch.isascii() and ch.isalnum() else "\\" + ch for ch in text)

    out = ["^"]
    for kind, text in tokens:
        if kind == "*":
            out.append(".*")
        elif kind == "?":
            out.append(".")
        elif kind == "lit":
            out.append(escape(text))
        else:
            out.append("[" + escape(text) + "]")
    out.append("$")
    return "".join(out)


def has_wildcard(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")
