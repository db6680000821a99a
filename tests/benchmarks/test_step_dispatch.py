"""benchmarks.step_dispatch: a child per tree, every decode step counted, the dispatch inside the step."""

from __future__ import annotations

import json
import pathlib

from benchmarks import step_dispatch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_one_tree_one_round(tmp_path):
    out = tmp_path / "dispatch.json"
    assert step_dispatch.main(["--trees", str(ROOT), "--generations", "1", "--new-tokens", "4",
                               "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["device"]
    (row,) = result["rows"]
    assert row["decode_steps"] == 3  # 4 new tokens: the prefill step gives the first
    assert row["kv_arrays"] == 2  # every layer's K pages in one array, V in another
    assert row["arrays_per_call"] > row["kv_arrays"]
    assert 0 < row["dispatch_ms"] < row["step_ms"]


def test_a_tree_that_fails_is_a_row_with_its_error(tmp_path):
    rows_out = tmp_path / "dispatch.json"
    assert step_dispatch.main(["--trees", str(tmp_path), "--quantization", "nonsense", "--out", str(rows_out)]) == 1
    (row,) = json.loads(rows_out.read_text())["rows"]
    assert row["tree"] == str(tmp_path) and row["error"]
