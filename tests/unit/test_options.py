"""The option table is the one source: Settings, the `run` flags and their help follow it."""

from __future__ import annotations

import argparse
from dataclasses import fields

from durable.cli import build_parser
from durable.options import OPTIONS
from durable.settings import Settings


def run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["run"]
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def test_settings_defaults_are_the_tables() -> None:
    defaults = Settings()
    for option in OPTIONS:
        if option.field != "database_url_file":
            assert getattr(defaults, option.field) == option.default, option.field
    assert Settings.from_env({}) == defaults


def test_every_field_but_the_derived_ones_has_an_option() -> None:
    derived = {"use_libpq_env", "database_url_source"}
    assert {f.name for f in fields(Settings)} - derived == {
        o.field for o in OPTIONS if o.field != "database_url_file"
    }


def test_run_has_a_flag_per_option_with_its_variable_in_the_help() -> None:
    actions = {a.dest: a for a in run_parser()._actions}
    for option in OPTIONS:
        assert option.flag is not None
        action = actions[option.field]
        assert action.option_strings == [option.flag]
        assert action.help is not None and option.env in action.help


def test_run_flags_reach_settings_through_the_table() -> None:
    args = run_parser().parse_args(["--lease", "45s", "--app", "a", "--app", "b.c"])
    overrides = {o.field: getattr(args, o.field) for o in OPTIONS}
    s = Settings.from_env({}, **overrides)
    assert s.lease == 45.0 and s.apps == ("a", "b.c")
