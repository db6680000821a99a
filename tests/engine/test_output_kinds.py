"""LLMEngine output kinds: deltas add up to the cumulative outputs step by step, and the final-only
output equals the cumulative one (the same seeded requests run side by side in one engine)."""

from __future__ import annotations

import pytest

from jpaged import SamplingParams
from jpaged.outputs import RequestOutputKind

KINDS = list(RequestOutputKind)


def run_side_by_side(engine, prompt: str, params: SamplingParams) -> list[dict]:
    """Each kind's outputs per step: [{kind: RequestOutput}] for the steps that returned any."""
    for kind in KINDS:
        engine.add_request(kind.value, prompt, params, output_kind=kind)
    steps = []
    while engine.has_unfinished():
        outs = {RequestOutputKind(o.req_id): o for o in engine.step()}
        if outs:
            steps.append(outs)
    return steps


@pytest.mark.parametrize("stop", [(), ("the", "e,")])
def test_deltas_add_up_and_final_only_comes_once(default_llm, stop):
    params = SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=24, logprobs=2, stop=stop)
    steps = run_side_by_side(default_llm.engine, "Once upon a time, in a village by the sea,", params)

    finals = [s[RequestOutputKind.FINAL_ONLY] for s in steps if RequestOutputKind.FINAL_ONLY in s]
    assert len(finals) == 1 and finals[0].finished
    final = finals[0]
    assert [len(c.token_ids) > 0 for c in final.outputs] == [True, True]

    texts, ids, logprobs, reasons = ([[], []] for _ in range(4))
    for s in steps:
        delta, cumulative = s.get(RequestOutputKind.DELTA), s.get(RequestOutputKind.CUMULATIVE)
        assert (delta is None) == (cumulative is None)  # same prompt and seed: they advance together
        if delta is None:
            continue
        assert delta.finished == cumulative.finished
        for c in delta.outputs:
            texts[c.index].append(c.text)
            ids[c.index] += c.token_ids
            logprobs[c.index] += c.logprobs
            reasons[c.index].append(c.finish_reason)
        for c in cumulative.outputs:  # what the deltas so far add up to is the cumulative output
            assert "".join(texts[c.index]) == c.text and ids[c.index] == c.token_ids
            assert logprobs[c.index] == c.logprobs
    assert cumulative.finished and [c.text for c in cumulative.outputs] == [c.text for c in final.outputs]
    for c in final.outputs:
        assert "".join(texts[c.index]) == c.text and ids[c.index] == c.token_ids and logprobs[c.index] == c.logprobs
        assert [r for r in reasons[c.index] if r is not None] == [c.finish_reason]  # the finish comes once
    stats = default_llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
