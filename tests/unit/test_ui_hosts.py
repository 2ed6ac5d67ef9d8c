"""Which Host headers the dashboard answers to (its defence against DNS rebinding)."""

from __future__ import annotations

import pytest

from durable.ui.hosts import Hosts, is_loopback, name_of


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8080", "localhost"),
        ("LocalHost", "localhost"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("dash.example.com.", "dash.example.com"),
        (" dash.example.com ", "dash.example.com"),
        ("host:port", None),
        ("host:", None),
        ("host:1234567", None),
        ("[::1", None),
        ("[::1]junk", None),
        ("[]", None),
        (":8080", None),
        ("", None),
    ],
)
def test_the_name_of_a_host_header(header: str, name: str | None) -> None:
    assert name_of(header) == name


@pytest.mark.parametrize(
    ("name", "loopback"),
    [
        ("localhost", True),
        ("app.localhost", True),
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("::1", True),
        ("localhost.evil.example", False),
        ("evillocalhost", False),
        ("127.0.0.1.nip.io", False),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("::", False),
    ],
)
def test_loopback_names(name: str, loopback: bool) -> None:
    assert is_loopback(name) is loopback


def test_on_a_loopback_address_only_loopback_names_are_answered() -> None:
    for bound in ("127.0.0.1", "::1", "localhost"):
        hosts = Hosts(bound)
        assert hosts.checked
        for header in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "app.localhost"):
            assert hosts.answers(header), (bound, header)
        for header in ("rebind.example:8080", "127.0.0.1.nip.io:8080", "bad:header", ""):
            assert not hosts.answers(header), (bound, header)


def test_allowed_names_are_answered_too_in_any_case() -> None:
    hosts = Hosts("127.0.0.1", ["Dash.Example.com."])
    assert hosts.answers("dash.example.COM:443")
    assert hosts.answers("localhost:8080")
    assert not hosts.answers("other.example.com")


def test_elsewhere_any_name_unless_names_are_given() -> None:
    assert not Hosts("0.0.0.0").checked
    assert Hosts("0.0.0.0").answers("whatever.example:8080")
    assert Hosts("").answers("10.0.0.5:8080")
    limited = Hosts("0.0.0.0", ["dash.example.com"])
    assert limited.answers("dash.example.com") and limited.answers("localhost")
    assert not limited.answers("10.0.0.5:8080")


def test_a_request_without_host_is_no_rebinding() -> None:
    assert Hosts("127.0.0.1").answers(None)
