"""The kernel benchmark runs end to end on tiny shapes (interpret mode) and writes its JSON."""

from __future__ import annotations

import json

from benchmarks import kernel_bench


def test_kernel_bench_quick(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    kernel_bench.main(["--quick", "--repeat", "1", "--samples", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "jax_version", "date", "git_commit", "copy_bandwidth_gbps"} <= result.keys()
    impls = {row["impl"] for row in result["rows"]}
    assert impls == {"pallas_decode", "pallas_ragged", "xla_model", "xla_reference"}
    assert all(row["us_per_call"] > 0 for row in result["rows"])
    assert "pallas_decode" in capsys.readouterr().out  # the table
