"""`jpaged bench startup` on a tiny llama: cold, warm and HF processes, phases that add up to each
process's wall time, and the same greedy tokens from all three and from HF in this process."""

from __future__ import annotations

import json

import pytest

from benchmarks import startup
from benchmarks.startup_job import HF_PHASES, JPAGED_PHASES

PROMPT_IDS = [1, 17, 42, 99, 5, 63]
MAX_TOKENS = 4


def _reference_tokens(hf_model) -> list[int]:
    import torch

    with torch.inference_mode():
        ids = torch.tensor([PROMPT_IDS])
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT_IDS):].tolist()


def test_tiny_cold_warm_and_hf(tiny_models, tmp_path, capsys):
    hf_model, hf_folder, _ = tiny_models["llama"]
    out = tmp_path / "startup.json"
    # The HF folder on both sides: the cold run converts it into its empty JPAGED_HOME. XLA's ops,
    # not the C++ kernels: their cold build (tests/kernels' business) would double this test's time.
    status = startup.main(["--model", str(hf_folder), "--prompt-token-ids", ",".join(map(str, PROMPT_IDS)),
                           "--max-tokens", str(MAX_TOKENS), "--runs", "1", "--max-model-len", "64",
                           "--max-num-seqs", "2", "--attn-backend", "xla", "--linear-backend", "xla",
                           "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert status == 0, printed
    assert [r["configuration"] for r in res["runs"]] == ["jpaged cold", "jpaged warm", "hf"]
    for run in res["runs"]:
        assert "error" not in run, run
        expected = JPAGED_PHASES if run["backend"] == "jpaged" else HF_PHASES
        assert set(run["phases"]) == set(expected)
        # resolve_model .. compile come from the engine; every other phase is measured here
        for name, seconds in run["phases"].items():
            assert seconds is not None and seconds >= 0, (run["configuration"], name, seconds)
        assert sum(run["phases"].values()) <= run["wall"] + 1e-6
        assert 0 < run["seconds_to_first_token"] < run["wall"]
        assert run["prompt_token_ids"] == PROMPT_IDS
    cold, warm, hf = res["runs"]
    reference = _reference_tokens(hf_model)
    assert cold["token_ids"] == warm["token_ids"] == hf["token_ids"] == reference
    assert res["jpaged_cold_warm_tokens_equal"] is True and res["hf_tokens_equal"] is True
    # The warm run found the converted model and the executables the cold run left.
    assert warm["model_dir"] == cold["model_dir"]
    assert cold["phases"]["resolve_model"] > 10 * warm["phases"]["resolve_model"]  # converted once, cold
    assert warm["counters"]["num_compiles"] == 0 and warm["counters"]["num_traces"] == 0
    assert warm["counters"]["num_executables_loaded"] > 0 and cold["counters"]["num_compiles"] > 0
    assert set(res["summary"]) == {"jpaged cold", "jpaged warm", "hf"}
    assert res["summary"]["hf"]["wall"]["median"] == pytest.approx(hf["wall"])
    assert res["ratios"]["jpaged_warm_over_hf_wall"] == pytest.approx(warm["wall"] / hf["wall"])
    assert res["meta"]["device"] and res["meta"]["jax"] and res["meta"]["date"]
    for label in ("jpaged cold", "jpaged warm", "hf"):
        assert label in printed


def _run(label: str, wall: float, **phases) -> dict:
    return dict(configuration=label, wall=wall, seconds_to_first_token=wall / 2, phases=phases, counters={})


def test_summary_and_table_of_runs_with_gaps():
    runs = [_run("jpaged warm", 3.0, imports=1.0, load_weights=0.5, compile=None),
            _run("jpaged warm", 1.0, imports=0.5, load_weights=0.25, compile=None),
            _run("jpaged warm", 2.0, imports=2.0, load_weights=1.0, compile=None)]
    summary = startup.summarize(runs)
    assert summary["wall"] == dict(median=2.0, min=1.0, max=3.0)
    assert summary["weights"] == dict(median=0.5, min=0.25, max=1.0)
    assert "compile" not in summary  # no run reported it
    hf = startup.summarize([_run("hf", 4.0, imports=2.0, load=1.5)])
    assert startup.ratios({"jpaged warm": summary, "hf": hf}) == {
        "jpaged_warm_over_hf_wall": 0.5, "jpaged_warm_over_hf_to_first_token": 0.5}
    text = startup.table({"jpaged warm": summary, "hf": hf}, {"jpaged warm": 3, "hf": 1}, {"hf": ["boom"]})
    warm_row = next(line for line in text.splitlines() if line.startswith("jpaged warm"))
    assert "2.00 [1.00-3.00]" in warm_row and "0.50 [0.25-1.00]" in warm_row
    assert "hf: error: boom" in text


def test_job_arguments_pass_engine_options_to_jpaged_only():
    args = startup.build_parser().parse_args(["--model", "m", "--hf-model", "h.gguf", "--max-model-len", "64",
                                              "--warmup", "lazy"])
    jp, hf = startup.job_args(args, "jpaged"), startup.job_args(args, "hf")
    assert jp[jp.index("--model") + 1] == "m" and hf[hf.index("--model") + 1] == "h.gguf"
    assert "--max-model-len" in jp and "--warmup" in jp
    assert "--max-model-len" not in hf and "--warmup" not in hf
