"""Who may act on the dashboard: a secret (a token or a password) read from a file, a
signed session cookie once it is given, and a CSRF token on every form.

Without a secret the dashboard is read-only and every action is refused. With one, every
page asks for it first (the login form, or an ``Authorization: Bearer`` header), and a
form is accepted only with the CSRF token of its session and, when the browser says where
it came from (``Origin``), from the dashboard's own origin. The secret is never logged nor
stored; the cookie holds a random session id and its expiry, signed with a key drawn at
start and the secret (so a restart, or a new secret, signs everyone out).

The file is looked at again (one ``stat``) on every check: a secret written over it, or a
new file renamed over it, is the secret from the next request on. A file that cannot be
read, or holds no valid secret, refuses everyone until it is fixed, and says so once in
the log.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from durable.errors import ConfigurationError
from durable.logs import get_logger

log = get_logger("durable.ui")

COOKIE = "durable_session"
SESSION_SECONDS = 12 * 3600
MAX_SECRET = 4096


def read_secret(field: str, path: str | Path) -> str:
    """The secret in the file at ``path`` (surrounding whitespace dropped); one line
    naming ``field`` when it cannot be read or is too short."""
    try:
        with open(Path(path).expanduser(), encoding="utf-8") as f:
            text = f.read(MAX_SECRET + 1).strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigurationError(f"{field}: cannot read {str(path)!r}: {reason}") from None
    if len(text) < 8 or len(text) > MAX_SECRET:
        raise ConfigurationError(
            f"{field}: {str(path)!r} must hold a secret of 8 to {MAX_SECRET} characters"
        )
    return text


class SecretFile:
    """The secret in a file, read again when the file changes (its inode, size or times)."""

    def __init__(self, field: str, path: str | Path) -> None:
        self.field = field
        self.path = Path(path).expanduser()
        self._seen = self._stat()
        self._secret: bytes | None = _raw(read_secret(field, path))
        """None while the file holds no valid secret: everyone is refused."""

    def __repr__(self) -> str:
        return f"SecretFile({self.field}, {str(self.path)!r})"

    def current(self) -> bytes | None:
        """The secret now, or None (fail closed) when the file has none."""
        seen = self._stat()
        if seen != self._seen:
            self._seen = seen
            try:
                secret: bytes | None = _raw(read_secret(self.field, self.path))
            except ConfigurationError as exc:
                secret = None
                log.error("ui_secret_unusable", problem=str(exc))
            else:
                log.info("ui_secret_changed", source=self.field, path=str(self.path))
            self._secret = secret
        return self._secret

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Auth:
    """The dashboard's secret and the key that signs its sessions."""

    secret: str = field(repr=False)
    """The secret, when it is not read from a file (``source``)."""
    kind: str
    """"token" or "password": what the login form asks for."""
    key: bytes = field(repr=False)
    ended: dict[str, int] = field(default_factory=dict, repr=False)
    """Sessions signed out, until they would have expired: a cookie kept from before the
    sign-out opens nothing."""
    source: SecretFile | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_file(cls, field: str, path: str | Path, kind: str) -> Auth:
        return cls("", kind, secrets.token_bytes(32), source=SecretFile(field, path))

    def current(self) -> bytes | None:
        """The secret as bytes, None while its file holds none."""
        return self.source.current() if self.source is not None else _raw(self.secret)

    def check_secret(self, given: str | bytes) -> bool:
        """``given`` (the form's text, or a header's raw bytes) is the secret: compared
        as bytes in constant time, whatever characters either holds."""
        secret = self.current()
        given = given if isinstance(given, bytes) else _raw(given)
        return secret is not None and hmac.compare_digest(given, secret)

    def new_session(self, now: float | None = None) -> str:
        """A cookie value: session id, expiry, signature."""
        expires = int((now if now is not None else time.time()) + SESSION_SECONDS)
        body = f"{secrets.token_urlsafe(18)}.{expires}"
        return f"{body}.{self._sign(body)}"

    def session(self, cookie: str | None, now: float | None = None) -> str | None:
        """The session id in a valid, unexpired cookie, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        sid, expires, signature = cookie.split(".")
        expected = self._sign(f"{sid}.{expires}")
        if not expected or not hmac.compare_digest(_raw(signature), _raw(expected)):
            return None
        if not (expires.isascii() and expires.isdigit()):
            return None
        if int(expires) < (now if now is not None else time.time()) or sid in self.ended:
            return None
        return sid

    def end(self, cookie: str | None, now: float | None = None) -> None:
        """Sign the session of ``cookie`` out for good (see ``ended``)."""
        sid = self.session(cookie, now)
        if sid is None or cookie is None:
            return
        at = now if now is not None else time.time()
        for old in [s for s, until in self.ended.items() if until < at]:
            del self.ended[old]
        self.ended[sid] = int(cookie.split(".")[1])

    def csrf(self, sid: str) -> str:
        return self._sign(f"csrf:{sid}")

    def check_csrf(self, sid: str, given: str | None) -> bool:
        expected = self.csrf(sid)
        return bool(given and expected) and hmac.compare_digest(_raw(given or ""), _raw(expected))

    def _sign(self, text: str) -> str:
        """``text``'s signature by the start's key and the secret now; "" (nothing
        matches it) while the secret's file holds none."""
        secret = self.current()
        if secret is None:
            return ""
        key = hmac.new(self.key, b"sessions:" + secret, hashlib.sha256).digest()
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _raw(text: str) -> bytes:
    """``text`` as bytes for a constant-time comparison, whatever it holds (compare_digest
    refuses a str that is not ASCII)."""
    return text.encode("utf-8", "surrogatepass")
