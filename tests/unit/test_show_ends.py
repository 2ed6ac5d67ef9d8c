"""The event log `durable show` prints: the ends of a long one and a count between."""

from __future__ import annotations

from durable.cli.show import ends


def rows(k: int) -> list[dict[str, object]]:
    return [{"seq": i, "kind": "step", "outcome": "ok"} for i in range(k)]


def test_a_log_no_longer_than_both_ends_and_the_gap_line_is_printed_whole() -> None:
    assert ends(rows(0), 3) == []
    assert ends(rows(7), 3) == rows(7)  # a gap line would hide a single event


def test_a_longer_log_keeps_its_first_and_last_rows_and_counts_the_rest() -> None:
    out = ends(rows(8), 3)
    assert [r["seq"] for r in out] == [0, 1, 2, "...", 5, 6, 7]
    assert out[3] == {"seq": "...", "kind": "", "outcome": "2 more events (--full prints all)"}
    big = ends(rows(12_345), 20)
    assert len(big) == 41 and big[20]["outcome"] == "12,305 more events (--full prints all)"
