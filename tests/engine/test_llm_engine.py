"""The engine end to end on a tiny model: scheduling choices never change greedy outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jpaged import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def hf_generate(hf_model, ids: list[int], n: int, **kw) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kw,
        )
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def model(tiny_models):
    hf_model, _, converted = tiny_models["llama"]
    return str(converted), hf_model


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 160, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(model):
    """HF greedy continuations of 12 prompts: the independent reference."""
    _, hf_model = model
    ps = prompts(12)
    return ps, [hf_generate(hf_model, p, GREEDY.max_tokens) for p in ps]


@pytest.mark.parametrize("budget", [16, 64, 512])
def test_chunk_sizes_give_identical_outputs(model, reference, budget):
    ps, ref = reference
    llm = LLM(model[0], max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=64, warmup="full")
    assert token_ids(llm.generate(ps, GREEDY, use_tqdm=False)) == ref
    stats = llm.get_stats()
    assert stats["num_compiles_after_warmup"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]  # every block came back


def test_preemption_keeps_outputs(model, reference):
    ps, ref = reference
    # 8 sequences of up to 51 tokens would need up to 32 blocks of 16; 10 force preemptions.
    llm = LLM(model[0], max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, num_kv_blocks=11)
    assert token_ids(llm.generate(ps, GREEDY, use_tqdm=False)) == ref
    stats = llm.get_stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_alone_equals_inside_a_mixed_batch_of_32(model):
    llm = LLM(model[0], max_num_seqs=32, max_num_batched_tokens=128, max_model_len=64)
    ps = prompts(32, seed=1)
    mixed = [SamplingParams(temperature=[0, 0.8, 1.3][i % 3], top_p=0.9, max_tokens=4 + i % 9, ignore_eos=True,
                            seed=i) for i in range(32)]
    mixed[7] = GREEDY
    batched = llm.generate(ps, mixed, use_tqdm=False)
    alone = llm.generate([ps[7]], GREEDY, use_tqdm=False)
    assert batched[7].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert alone[0].outputs[0].token_ids == hf_generate(model[1], ps[7], GREEDY.max_tokens)
    seeded = llm.generate([ps[4]], mixed[4], use_tqdm=False)  # a seeded sample, alone vs in the batch
    assert seeded[0].outputs[0].token_ids == batched[4].outputs[0].token_ids


def test_identical_prompt_hits_the_prefix_cache(model):
    llm = LLM(model[0], max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    p = [7, 8, 9] + list(range(3, 40))  # 40 tokens: 2 full blocks of 16
    first = llm.generate([p], GREEDY, use_tqdm=False)
    hits_before = llm.get_stats()["prefix_cache_hits"]
    second = llm.generate([p], GREEDY, use_tqdm=False)
    assert llm.get_stats()["prefix_cache_hits"] - hits_before >= 32
    assert token_ids(second) == token_ids(first) == [hf_generate(model[1], p, GREEDY.max_tokens)]


def test_no_compiles_after_warm_up_on_a_varied_workload(model):
    llm = LLM(model[0], max_num_seqs=16, max_num_batched_tokens=64, max_model_len=64, warmup="full")
    rng = np.random.default_rng(3)
    for round_ in range(3):
        ps = prompts(int(rng.integers(1, 20)), seed=round_)
        params = [SamplingParams(temperature=float(rng.choice([0, 0.7])), top_k=int(rng.choice([0, 5])),
                                 min_p=float(rng.choice([0, 0.05])), presence_penalty=float(rng.choice([0, 0.5])),
                                 repetition_penalty=float(rng.choice([1, 1.2])), logprobs=int(rng.choice([0, 3])),
                                 n=int(rng.choice([1, 2])), max_tokens=int(rng.integers(1, 20)), ignore_eos=True)
                  for _ in ps]
        llm.generate(ps, params, use_tqdm=False)
    stats = llm.get_stats()
    assert stats["num_compiles_after_warmup"] == 0
    assert 0 < stats["padding_efficiency"] <= 1


def test_n_sequences_share_the_prompt(model):
    llm = LLM(model[0], max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    p = list(range(3, 40))
    out = llm.generate([p], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct random streams
    assert llm.get_stats()["prefix_cache_hits"] >= 2 * 32  # two siblings found the first one's 2 full blocks


def test_top_k_1_is_greedy_and_stop_token_ids_stop(model, reference):
    ps, ref = reference
    llm = LLM(model[0], max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    outs = llm.generate(ps[:4], SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True, seed=3),
                        use_tqdm=False)
    assert token_ids(outs) == ref[:4]
    stop_at = ref[0][5]
    out = llm.generate([ps[0]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[0][: ref[0].index(stop_at) + 1]


def test_logprobs_match_hf(model, reference):
    ps, ref = reference
    llm = LLM(model[0], max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    out = llm.generate([ps[1]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        logits = model[1](torch.tensor([ps[1] + ref[1][:4]])).logits[0]
    ref_lp = torch.log_softmax(logits, -1)[len(ps[1]) - 1 :].numpy()
    for step, entry in enumerate(out.logprobs):
        top = np.argsort(-ref_lp[step])[:3]
        assert set(entry) == set(top.tolist()) | {out.token_ids[step]}
        for tok, lp in entry.items():
            assert lp == pytest.approx(float(ref_lp[step, tok]), abs=1e-4)


def test_repetition_penalty_matches_hf(model, reference):
    ps, _ = reference
    llm = LLM(model[0], max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    outs = llm.generate(ps[:3], SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.8, ignore_eos=True),
                        use_tqdm=False)
    for p, out in zip(ps[:3], outs):
        assert out.outputs[0].token_ids == hf_generate(model[1], p, 12, repetition_penalty=1.8)


def test_too_long_request_is_rejected_and_nothing_is_queued(model):
    llm = LLM(model[0], max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    with pytest.raises(ValueError, match=r"prompt 1: This model's maximum context length is 64 tokens"):
        llm.generate([[5, 6], list(range(3, 53))], SamplingParams(max_tokens=20), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert llm.get_stats()["kv_blocks_free"] == llm.get_stats()["kv_blocks_total"]
