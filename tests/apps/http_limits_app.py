"""Imported by the daemons of tests/faults/test_http_limits.py (never by the tests' own
process): their HTTP endpoint gives a client 300 s to send its request instead of 5 s, so a
connection that sends nothing keeps its slot for the whole test, whatever the machine's load."""

from __future__ import annotations

import durable.http

durable.http.READ_TIMEOUT = 300.0
