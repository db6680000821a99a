"""benchmarks.datasets and `jpaged bench throughput`: workloads exact, parsing, and tiny end-to-end runs
whose token counts, KV accounting and JSON are checked against the workload."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import throughput
from benchmarks.datasets import FIRST_ORDINARY_ID, issue_workload, make_workload
from jpaged.cli import main as cli_main


def test_fixed_dataset_is_exact_and_seeded():
    w = make_workload("fixed", num_prompts=5, input_len=7, output_len=3, range_ratio=0.5, seed=1, vocab_size=300)
    assert [len(p) for p in w.prompts] == [7] * 5 and w.output_lens == [3] * 5  # range_ratio ignored
    assert all(FIRST_ORDINARY_ID <= t < 300 for p in w.prompts for t in p)
    again = make_workload("fixed", num_prompts=5, input_len=7, output_len=3, seed=1, vocab_size=300)
    assert again.prompts == w.prompts
    other = make_workload("fixed", num_prompts=5, input_len=7, output_len=3, seed=2, vocab_size=300)
    assert other.prompts != w.prompts


def test_random_dataset_lengths_stay_in_range():
    w = make_workload("random", num_prompts=400, input_len=100, output_len=20, range_ratio=0.25, seed=0)
    in_lens, out_lens = np.array([len(p) for p in w.prompts]), np.array(w.output_lens)
    assert in_lens.min() >= 75 and in_lens.max() <= 125 and len(set(in_lens)) > 20
    assert out_lens.min() >= 15 and out_lens.max() <= 25
    assert w.num_prompt_tokens == in_lens.sum() and w.num_output_tokens == out_lens.sum()


def test_issue_workloads():
    uniform, variable = issue_workload("uniform"), issue_workload("variable")
    assert len(uniform.prompts) == 32 and set(uniform.output_lens) == {128}
    assert len(variable.prompts) == 64 and 16 <= min(variable.output_lens) < max(variable.output_lens) <= 256
    assert all(32 <= len(p) <= 256 for p in uniform.prompts + variable.prompts)


@pytest.mark.parametrize("kwargs, field", [
    (dict(dataset="sharegpt"), "dataset"), (dict(num_prompts=0), "num_prompts"), (dict(input_len=0), "input_len"),
    (dict(range_ratio=1.0), "range_ratio"),
])
def test_bad_workload_arguments_name_the_field(kwargs, field):
    args = dict(dataset="random", num_prompts=2, input_len=4, output_len=4) | kwargs
    with pytest.raises(ValueError, match=field):
        make_workload(**args)


def test_parser_defaults_and_unknown_dummy_config(capsys):
    args = throughput.build_parser().parse_args([])
    assert (args.backend, args.dataset, args.max_num_seqs, args.dtype) == ("jpaged", "random", 32, "auto")
    assert throughput.vocab_size_of(None, "llama-3-8b") == 128256
    assert cli_main(["bench", "throughput", "--dummy-config", "gpt-99"]) == 1
    err = capsys.readouterr().err.strip()
    assert "gpt-99" in err and "llama-3-8b" in err and len(err.splitlines()) == 1


def test_kv_slots_of_static_batches():
    w = make_workload("fixed", num_prompts=3, input_len=4, output_len=2)
    w.prompts[1] = w.prompts[1] + [200, 201]  # batch 0 pads to 6 prompt tokens
    assert throughput._hf_kv_slots(w, 2) == 2 * (6 + 2) + 1 * (4 + 2)


@pytest.mark.parametrize("backend", ["jpaged", "hf"])
def test_tiny_end_to_end(tiny_models, tmp_path, backend, capsys):
    """Both backends on the same tiny model through the CLI: every requested token generated and counted."""
    _, hf_folder, _ = tiny_models["llama"]
    out = tmp_path / "res.json"
    argv = ["bench", "throughput", "--backend", backend, "--model", str(hf_folder), "--dataset", "random",
            "--num-prompts", "5", "--input-len", "48", "--output-len", "6", "--range-ratio", "0.5",
            "--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--output-json", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    work = make_workload("random", num_prompts=5, input_len=48, output_len=6, range_ratio=0.5, vocab_size=160)
    assert res["output_tokens"] == work.num_output_tokens and res["prompt_tokens"] == work.num_prompt_tokens
    assert res["output_tokens_per_s"] == pytest.approx(res["output_tokens"] / res["seconds"])
    assert f"{res['output_tokens_per_s']:.2f} output tokens/s" in printed and "Throughput:" in printed
    assert res["meta"]["jax"] and res["meta"]["date"]
    assert 0 <= res["kv_waste"] < 1
    if backend == "jpaged":
        assert res["num_compiles_after_warmup"] == 0
        assert 0 < res["padding_efficiency"] <= 1
        assert res["kv_peak_slots_allocated"] % 16 == 0 and res["kv_peak_slots_allocated"] > 0
        # the untimed warm-up batch must not leave the timed prompts' blocks in the prefix cache
        assert res["prefix_cache_hits"] == 0


def test_scaling_grid_runs_each_cell(tiny_models, tmp_path, capsys):
    from benchmarks import scaling

    _, hf_folder, _ = tiny_models["llama"]
    out = tmp_path / "scaling.json"
    # One size against two backends: each cell is a process (~10 s of imports), and a second size
    # runs the same code again.
    assert scaling.main(["--num-prompts", "3", "--input-len", "8", "--output-len", "3", "--backends", "jpaged",
                         "hf", "--max-num-seqs", "2", "--model", str(hf_folder), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["num_prompts"], r["backend"]) for r in rows] == [(3, "jpaged"), (3, "hf")]
    for r in rows:
        assert "error" not in r, r
        assert r["output_tokens"] == 3 * r["num_prompts"] and r["prompt_tokens"] == 8 * r["num_prompts"]
    assert len(capsys.readouterr().out.splitlines()) >= 5
