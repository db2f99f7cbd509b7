"""health/jsonl_feed.py: records another process appends, each taken once."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from popguard.health.jsonl_feed import JsonLinesFeed

records = st.lists(
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=8), max_size=3),
    max_size=8,
)


@given(records, st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_every_record_is_taken_once_however_the_writes_are_cut(
    written: list[dict[str, Any]], cuts: list[int]
) -> None:
    """The writer's bytes arrive in pieces (a line half written when the reader looks),
    and a new reader (a restarted health service) goes on where the last one stopped."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in written)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "records.jsonl"
        taken: list[dict[str, Any]] = []
        offset = 0
        for cut in sorted({min(c, len(data)) for c in cuts} | {len(data)}):
            with path.open("ab") as out:
                out.write(data[offset:cut])
            offset = cut
            JsonLinesFeed(path, "a record").take_new(taken.append)
        JsonLinesFeed(path, "a record").take_new(taken.append)
    assert taken == written


def test_a_line_that_is_not_json_is_logged_and_passed(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"n": 1}\nnot json\n{"n": 2}\n')
    taken: list[dict[str, Any]] = []
    assert JsonLinesFeed(path, "a record").take_new(taken.append) == 2
    assert taken == [{"n": 1}, {"n": 2}]
    assert JsonLinesFeed(path, "a record").take_new(taken.append) == 0
    assert JsonLinesFeed(tmp_path / "absent.jsonl", "a record").take_new(taken.append) == 0
