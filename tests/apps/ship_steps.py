"""The step functions every version of workflow `ship` calls (tests.apps.ship_*)."""

from __future__ import annotations


def label(order: str) -> str:
    return f"L-{order}"


def notify(order: str) -> bool:
    return True


def insure(order: str) -> str:
    return f"I-{order}"
