"""benchmarks.cpu_linear_bench: every row timed and checked against float64, and a wrong kernel refused."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import cpu_linear_bench
from pallas_kernels.cpu_build import unavailable_reason

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or unavailable_reason() is not None,
                                reason=f"needs the CPU kernels: {unavailable_reason()}")


def test_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "kernels.json"
    assert cpu_linear_bench.main(["--quick", "--rows", "1", "20", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["device"].startswith("CPU") and result["meta"]["isa"] in ("portable", "avx2", "avx512")
    rows = result["rows"]
    keys = {(r["shape"], r["rows"], r["format"], r["placement"]) for r in rows}
    assert keys == {(s, m, f, p) for s in cpu_linear_bench.QUICK for m in (1, 20)
                    for f in ("packed", "float32") for p in ("stream", "cached")}
    for r in rows:
        assert r["us_per_call"] > 0 and r["max_abs_error"] < 1e-2
        assert r["gweights_per_s"] == pytest.approx(r["K"] * r["N"] / r["us_per_call"] / 1e3)


def test_a_wrong_kernel_is_refused_before_it_is_timed(monkeypatch):
    monkeypatch.setattr(cpu_linear_bench, "linear_cpu_packed", lambda x, p, fmt, n: jnp.zeros((x.shape[0], n)))
    with pytest.raises(AssertionError, match="small packed M=1: max error"):
        cpu_linear_bench.main(["--quick", "--rows", "1"])
