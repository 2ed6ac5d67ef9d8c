"""The one-line outcome of an action, carried by the redirect back to its page.

It travels in the query string (``?flash=``), so the page shows it after a reload and a
live refresh, but signed with a key drawn at start, for the session that acted, and for
a minute only: a link someone else made (a forged value, one of their own session's, or
an old one) shows nothing, so nobody can have the real dashboard say what they like.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

PARAM = "flash"
FLASH_SECONDS = 60
"""How long after the action its outcome shows."""
MAX_TEXT = 1000
"""Characters of an outcome kept; the rest is cut."""
KINDS = ("ok", "error")


@dataclass(frozen=True)
class Flashes:
    """Seals outcomes for one session and opens only those sealed for it."""

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def seal(self, sid: str, kind: str, text: str, now: float | None = None) -> str:
        """A ``flash`` value saying ``text`` (``kind`` "ok" or "error") to session ``sid``."""
        assert kind in KINDS, kind
        expires = int((now if now is not None else time.time()) + FLASH_SECONDS)
        body = base64.urlsafe_b64encode(
            json.dumps([kind, text[:MAX_TEXT], expires], ensure_ascii=False).encode()
        ).decode().rstrip("=")  # fmt: skip
        return f"{body}.{self._sign(sid, body)}"

    def open(self, sid: str, value: str | None, now: float | None = None) -> tuple[str, str] | None:
        """(kind, text) of a value sealed for ``sid`` that has not expired, else None."""
        if not value or value.count(".") != 1:
            return None
        body, signature = value.split(".")
        expected = self._sign(sid, body)
        if not hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), expected.encode()):
            return None
        try:
            kind, text, expires = json.loads(
                base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            )
        except (binascii.Error, ValueError, TypeError):
            return None
        if kind not in KINDS or not isinstance(text, str) or not isinstance(expires, int):
            return None
        if expires < (now if now is not None else time.time()):
            return None
        return kind, text

    def _sign(self, sid: str, body: str) -> str:
        message = f"{sid}\x00{body}".encode("utf-8", "surrogatepass")
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()


def with_flash(target: str, value: str) -> str:
    """``target`` (a path and query) saying ``value``, any flash it had dropped. The path
    is kept as given: ``urlsplit`` would drop a tab and make "/\\t/x" "//x", another site."""
    path, _, query = target.partition("?")
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != PARAM]
    return f"{path}?{urlencode([*kept, (PARAM, value)])}"
