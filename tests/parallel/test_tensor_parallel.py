"""Tensor parallelism end to end: N = 4 devices against N = 1 of the same model.

Each architecture runs once in a child with 4 host devices (tests/parallel/tp_job.py says why
a child); the assertions here compare its N > 1 engines with its N = 1 engine: greedy tokens
over prefill, chunked prefill, decode, a prefix-cache hit and preemption; seeded sampling;
logits to float tolerance; no compile after a full warm-up; the KV pool's bytes per device; and
the collectives XLA put in each compiled step.
"""

from __future__ import annotations

import numpy as np
import pytest

from jpaged import LLM
from jpaged.models.config import ModelConfig
from tests.conftest import TINY_MODELS
from tests.parallel.tp_job import run_job

# N = 4 only: with these models' 1, 2 and 4 KV heads it repeats each KV head 4 times, repeats
# each twice, and splits them, the cases N = 2 has and more (N = 2 cost the suite a minute of
# compiles; tests/parallel/test_multihost.py and the default model below run N = 3).
TPS = [1, 4]
# Every architecture, and between them every feature the split touches: KV heads repeated
# (1 KV head < N) and split (4 KV heads), tied and untied embeddings, q/k/v and MLP biases, a
# sliding window, q/k norms and a head_dim of its own. (The plain llama and mistral variants add
# nothing here but minutes: every N compiles its own executables.)
MODELS = ["llama3-rope-tied", "llama-bias", "mistral-window", "qwen2", "qwen3"]
XLA_ATTENTION = ["mistral-window"]  # the XLA attention path per shard; the others the C++ kernel
assert set(MODELS) <= set(TINY_MODELS)


@pytest.fixture(scope="module")
def all_runs(tiny_models, tmp_path_factory):
    """{model: {N: that engine's report}}, N = 1 and 4, every model in one child."""
    models = {name: str(tiny_models[name][2]) for name in MODELS}
    return run_job("tiny_all", {"models": models, "tps": TPS, "xla_attention": XLA_ATTENTION}, num_devices=4,
                   tmp_path=tmp_path_factory.mktemp("tp"))


@pytest.fixture(params=MODELS)
def runs(request, all_runs):
    """(model, {N: report}) for one architecture."""
    return request.param, all_runs[request.param]


@pytest.mark.parametrize("tp", [4])
def test_greedy_tokens_equal_one_device(runs, tp):
    name, r = runs
    one, many = r[1], r[tp]
    assert many["tokens"] == one["tokens"], f"{name}: prefill, chunked prefill and decode"
    assert many["repeat_tokens"] == one["repeat_tokens"] == one["tokens"][-1]
    assert many["prefix_hits"] == one["prefix_hits"] > 0, "the repeated prompt must hit the prefix cache"
    assert many["num_preemptions"] == one["num_preemptions"] > 0, "8 KV blocks must force preemptions"
    assert many["preempt_tokens"] == one["preempt_tokens"]


@pytest.mark.parametrize("tp", [4])
def test_seeded_sampling_and_logprobs_do_not_depend_on_n(runs, tp):
    _, r = runs
    one, many = r[1], r[tp]
    assert many["sampled_tokens"] == one["sampled_tokens"]
    for seq_one, seq_many in zip(one["sampled_logprobs"], many["sampled_logprobs"]):
        for step_one, step_many in zip(seq_one, seq_many):
            assert step_one.keys() == step_many.keys()
            np.testing.assert_allclose([step_many[t] for t in step_one], list(step_one.values()), atol=1e-4)


@pytest.mark.parametrize("tp", [4])
def test_logits_match_one_device(runs, tp):
    _, r = runs
    ref, ours = r[1]["logits"], r[tp]["logits"]
    assert ours.shape == ref.shape and ref.shape[0] == 10  # every position of a 3- and a 7-token prompt
    # Only the order of the all-reduced partial sums differs from one device.
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(ref).max() > 0.1, "logits of a model that does something"


@pytest.mark.parametrize("tp", [4])
def test_full_warmup_leaves_nothing_to_compile(runs, tp):
    assert runs[1][tp]["compiles_after_warmup"] == 0


@pytest.mark.parametrize("tp", [4])
def test_kv_pool_per_device_is_its_share(runs, tp):
    name, r = runs
    one, many = r[1]["kv"], r[tp]["kv"]
    num_kv_heads = one["global_shape"][2]  # the model's K
    assert one["num_pages"] == many["num_pages"], "every device holds every block id"
    assert many["num_shards"] == many["devices"] == tp
    # Each device holds K / N heads, or one repeated head when K < N (the replicated share).
    heads_per_device = max(num_kv_heads // tp, 1)
    assert many["shard_shape"] == one["global_shape"][:2] + (heads_per_device,) + one["global_shape"][3:]
    assert many["bytes_per_device"] * num_kv_heads == one["bytes_per_device"] * heads_per_device
    if num_kv_heads >= tp:
        assert many["bytes_per_device"] * tp == one["bytes_per_device"], f"{name}: exactly 1/N of N = 1"


@pytest.mark.parametrize("tp", [4])
def test_parameters_placed_by_the_table(runs, tp):
    _, r = runs
    specs = r[tp]["param_specs"]
    for name, spec in specs.items():
        if name.endswith((".q_proj.kernel", ".k_proj.kernel", ".v_proj.kernel", "gate_proj.kernel", "up_proj.kernel")):
            assert spec == (None, "tp"), name
        elif name.endswith(("o_proj.kernel", "down_proj.kernel")) or name == "embed":
            assert spec == ("tp", None), name
        elif name.endswith(".scale"):
            assert spec == (), name


@pytest.mark.parametrize("tp", [4])
def test_step_collectives(runs, tp):
    """Per layer exactly two all-reduces (after o_proj and after down_proj), plus one for the
    vocabulary-split embedding lookup; nothing gathered in the forward step (the logits stay
    split by vocabulary). The sampler exchanges [B] reductions and B x k candidates only."""
    name, r = runs
    many = r[tp]
    layers = many["num_layers"]
    forwards = {k: v for k, v in many["collectives"].items() if k.startswith("forward")}
    assert forwards
    for program, ops in forwards.items():
        assert ops == {"all-reduce": 2 * layers + 1}, f"{name} {program}: {ops}"
    # At most tp x 64 top-k candidates or the inverse-CDF's 256-token block per row. (This tiny
    # vocabulary of 160 is no bigger than that; test_sampler_collectives checks a real one.)
    for program, shapes in many["gathered_shapes"].items():
        for shape in shapes:
            rows, *cols = (int(d) for d in shape[shape.index("[") + 1: shape.index("]")].split(","))
            assert cols and max(cols) <= max(tp * 64, 256), f"{program} gathers {shape}"


def test_heads_that_do_not_split_are_refused_at_start(tmp_path):
    """SmolLM2's 9 query / 3 KV heads on 2 devices: refused before any weight is read or any
    device is asked for (so this runs on one device)."""
    config = tmp_path / "config.json"
    config.write_text("""{"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 144,
        "intermediate_size": 1536, "num_hidden_layers": 1, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": true}""")
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 does not divide the model's 9 attention heads"
                                          r".*sizes that work: 1, 3"):
        LLM(str(config), load_format="dummy", tensor_parallel_size=2)


def test_bench_throughput_with_tensor_parallelism(tiny_models, tmp_path):
    _, hf_folder, _ = tiny_models["llama"]
    out = tmp_path / "res.json"
    argv = ["--model", str(hf_folder), "--num-prompts", "4", "--input-len", "24", "--output-len", "5",
            "--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--tensor-parallel-size", "2",
            "--output-json", str(out)]
    res = run_job("bench", {"argv": argv}, num_devices=2, tmp_path=tmp_path)
    assert res["tensor_parallel_size"] == 2
    assert res["output_tokens"] == 4 * 5 and res["num_compiles_after_warmup"] == 0
    # The roofline counts what one device reads: its half of every split weight (the norms whole).
    config = ModelConfig.from_file(hf_folder / "config.json")
    read_by_all = (config.num_params() - config.vocab_size * config.hidden_size) * 4  # float32, embed only gathered
    norms = (2 * config.num_layers + 1) * config.hidden_size * 4
    assert res["decode_roofline"]["weight_mib"] * 2**20 == (read_by_all - norms) / 2 + norms


def test_serve_passes_the_size_to_the_engine(monkeypatch):
    import serve

    from jpaged.cli import main as cli_main

    seen = {}
    monkeypatch.setattr(serve, "run_server", lambda settings: seen.setdefault("settings", settings) and 0)
    cli_main(["serve", "--model", "some/model", "-tp", "3"])
    assert seen["settings"].engine.tensor_parallel_size == 3
    seen.clear()
    cli_main(["serve", "--model", "some/model", "--tensor-parallel-size", "2"])
    assert seen["settings"].engine.tensor_parallel_size == 2


@pytest.mark.default_model
def test_default_model_at_three_devices_equals_one(tmp_path):
    """SmolLM2-135M (9 heads, 3 KV heads) split 3 ways: the same greedy tokens as on one device."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    r = run_job("default_model", {"tps": [1, 3], "prompts": prompts, "max_tokens": 12}, num_devices=3,
                tmp_path=tmp_path)
    assert r[3]["tokens"] == r[1]["tokens"]
    assert all(len(t) == 12 for t in r[1]["tokens"])
    assert r[3]["kv"]["shard_shape"][2] == 1 and r[1]["kv"]["shard_shape"][2] == 3
    print({n: (x["kv_capacity_tokens"], x["kv"]) for n, x in r.items()})
