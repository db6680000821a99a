"""benchmarks.quantized_throughput: ratios are taken within a round and their median reported."""

from __future__ import annotations

import pytest

from benchmarks.quantized_throughput import main, ratios, table


def _row(workload, round_, quantization, tok_s, weight_bytes):
    return dict(workload=workload, round=round_, quantization=quantization, output_tokens_per_s=tok_s,
                weight_bytes=weight_bytes, weight_format=quantization, linear_backend="cpu",
                decode_roofline=dict(mean_step_ms=1000 / tok_s, roofline_fraction=0.5))


def test_ratios_pair_formats_within_each_round_and_take_the_median():
    rows = [
        # Round 0 is slow for both formats, round 1 fast for both: pairing within a round
        # keeps the ratio, crossing rounds would not.
        _row("one-stream", 0, "none", 20.0, 400), _row("one-stream", 0, "auto", 50.0, 100),
        _row("one-stream", 1, "none", 40.0, 400), _row("one-stream", 1, "auto", 80.0, 100),
        _row("one-stream", 2, "none", 30.0, 400), _row("one-stream", 2, "auto", 90.0, 100),
        # A round whose packed run failed has no ratio.
        _row("uniform", 0, "none", 100.0, 400), dict(workload="uniform", round=0, quantization="auto", error="boom"),
        _row("uniform", 1, "none", 100.0, 400), _row("uniform", 1, "auto", 110.0, 100),
    ]
    out = ratios(rows)
    assert out["one-stream"]["speedups"] == pytest.approx([2.5, 2.0, 3.0])
    assert out["one-stream"]["speedup"] == pytest.approx(2.5)
    assert out["one-stream"]["weight_bytes_fraction"] == pytest.approx(0.25)
    assert out["uniform"]["speedups"] == pytest.approx([1.1])
    lines = table(rows).splitlines()
    assert len(lines) == 1 + len(rows) and "error: boom" in lines[8]


def test_rounds_below_one_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err
