"""benchmarks.sampler_bench: a tiny run writes one row per batch and setting; the baseline agrees on greedy."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from benchmarks import sampler_bench
from jpaged.runner.sampler import sample


def test_tiny_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert sampler_bench.main(["--batch", "2", "3", "--vocab", "300", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["setting"]) for r in rows] == [(b, s) for b in (2, 3) for s in sampler_bench.SETTINGS]
    assert all(r["jpaged_ms"] > 0 and r["baseline_ms"] > 0 for r in rows)
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(rows)


def test_baseline_and_ours_agree_on_greedy():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 300)), jnp.float32)
    s = sampler_bench.arrays(4)
    ours = np.asarray(sample(logits, s).token_ids)
    theirs = np.asarray(sampler_bench.baseline(logits, s)[0])
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, np.asarray(logits).argmax(-1))
