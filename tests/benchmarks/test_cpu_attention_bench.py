"""benchmarks.cpu_attention_bench: every point timed and checked against the reference, and a wrong kernel refused."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import cpu_attention_bench
from pallas_kernels.cpu_build import unavailable_reason

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or unavailable_reason() is not None,
                                reason=f"needs the CPU kernels: {unavailable_reason()}")

TINY = ["--batches", "1", "3", "--contexts", "70", "--layers", "2", "--samples", "1"]


def test_tiny_run_writes_every_point(tmp_path):
    out = tmp_path / "attention.json"
    assert cpu_attention_bench.main([*TINY, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["device"].startswith("CPU")
    rows = result["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 70), (3, 70)]
    for r in rows:
        assert r["us_per_call"] > 0 and r["max_abs_error"] < 1e-4 and r["layers"] == 2
        kv_bytes = 2 * r["batch"] * r["context"] * cpu_attention_bench.KV_HEADS * cpu_attention_bench.HEAD_DIM * 4
        assert r["kv_gbytes_per_s"] == pytest.approx(kv_bytes / r["us_per_call"] / 1e3)


def test_a_wrong_kernel_is_refused_before_it_is_timed(monkeypatch):
    monkeypatch.setattr(cpu_attention_bench, "ragged_paged_attention_cpu", lambda q, *a, **k: jnp.zeros_like(q))
    with pytest.raises(AssertionError, match="batch 1, context 70: max error"):
        cpu_attention_bench.main(TINY)
