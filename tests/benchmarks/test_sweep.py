"""`jpaged bench sweep`: the table's ratios, the chart file, parsing, prompts; the GPU script's dry run
(tests/benchmarks/test_gpu_run.py) runs a tiny sweep end to end."""

from __future__ import annotations

from benchmarks import sweep


def _row(system, c, rps, ttft=100.0, mem=1000.0):
    return dict(system=system, concurrency=c, num_requests=2 * c, failed=0, seconds=1.0, requests_per_s=rps,
                output_tokens_per_s=rps * 128, mean_ttft_ms=ttft, p99_ttft_ms=ttft * 2, mean_tpot_ms=None,
                peak_memory_mib=mem)


def test_table_gives_ratio_per_level():
    rows = [_row("hf", 1, 0.5), _row("jpaged", 1, 1.5), _row("hf", 4, 1.0), _row("jpaged", 4, 4.0)]
    lines = sweep.table(rows).splitlines()
    assert len(lines) == 5
    assert lines[1].split()[:2] == ["1", "jpaged"] and lines[1].endswith("3.00x")
    assert lines[3].split()[:2] == ["4", "jpaged"] and lines[3].endswith("4.00x")
    assert not lines[2].endswith("x")


def test_plot_writes_a_png(tmp_path):
    rows = [_row(s, c, r) for s, k in (("jpaged", 2.0), ("hf", 1.0)) for c, r in ((1, k), (4, 3 * k), (8, 5 * k))]
    path = tmp_path / "chart.png"
    sweep.plot(rows, "title", "concurrency", path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_parser_defaults():
    args = sweep.build_parser().parse_args([])
    assert args.concurrency == [1, 4, 8, 16, 32] and (args.input_len, args.output_len) == (512, 128)
    assert args.systems == ["jpaged", "hf"]


def test_levels_share_no_prompt_block():
    """A prompt reused across levels would hit the server's prefix cache and skip its prefill."""
    from benchmarks.datasets import make_workload

    seen: set[tuple[int, ...]] = set()
    for c in sweep.CONCURRENCY:
        work = make_workload("fixed", num_prompts=2 * c, input_len=32, output_len=1, seed=sweep.level_seed(0, c))
        first_blocks = {tuple(p[:16]) for p in work.prompts}
        assert not first_blocks & seen, f"level {c} repeats a prompt of an earlier level"
        seen |= first_blocks
