"""Secrets masked in text: a database URL's password and password=... values, wherever
they are written for people to read (logs, stored errors, command output)."""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@host. The password runs greedily to the last "@" of the
# whitespace/quote-delimited token: an unencoded "@" inside a password is common,
# and masking too much is better than leaking the tail of a password.
_URL_PASSWORD = re.compile(
    r"(?i)\b([a-z][a-z0-9+.-]*://[^:/?#@\s'\"]*:)([^\s'\"]*)(@)",
)
# password=xxx in key/value DSNs and query strings; also 'password': 'xxx' in reprs.
_KEY_PASSWORD = re.compile(
    r"(?i)\b(\w*(?:password|passwd)['\"]?\s*[=:]\s*)"
    r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&;,'\"]+)",
)


def redact(text: str) -> str:
    """`text` with URL passwords and password=... values replaced by ***."""
    if "@" in text:
        text = _URL_PASSWORD.sub(rf"\g<1>{MASK}\g<3>", text)
    if "ass" in text.lower():  # cheap pre-check before the second regex
        text = _KEY_PASSWORD.sub(rf"\g<1>{MASK}", text)
    return text


def redact_json(value: object) -> object:
    """A JSON value with every string in it redacted (the same object when none changed)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        items = [redact_json(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, dict):
        pairs = {k: redact_json(v) for k, v in value.items()}
        return value if all(pairs[k] is v for k, v in value.items()) else pairs
    return value
