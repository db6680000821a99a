"""The measured choice between the C++ CPU kernels and XLA: cached once, followed by auto, reported."""

from __future__ import annotations

import json

import pytest

from jpaged import LLM, SamplingParams
from jpaged.models import kernel_choice
from tests.conftest import HAS_COMPILER

pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _fake_measure(linear_kernel_s: float, attention_kernel_s: float, calls: list):
    def measure():
        calls.append(1)
        return {"linear": {"cpu": linear_kernel_s, "xla": 1.0}, "attention": {"cpu": attention_kernel_s, "xla": 1.0}}
    return measure


def test_the_verdict_is_measured_once_and_cached_beside_the_library(monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_choice, "measure", _fake_measure(2.0, 0.5, calls))
    monkeypatch.setattr(kernel_choice, "_verdict", None)
    path = kernel_choice._verdict_path()
    path.unlink(missing_ok=True)
    verdict = kernel_choice.cpu_kernel_verdict()
    assert (verdict["linear"], verdict["attention"]) == (False, True) and calls == [1]
    assert json.loads(path.read_text())["attention"] is True
    monkeypatch.setattr(kernel_choice, "_verdict", None)  # as a new process: read from the file
    assert kernel_choice.cpu_kernel_verdict()["linear"] is False and calls == [1]
    path.write_text("{not json")  # a damaged verdict is measured again
    monkeypatch.setattr(kernel_choice, "_verdict", None)
    assert kernel_choice.cpu_kernel_verdict()["attention"] is True and calls == [1, 1]
    monkeypatch.setattr(kernel_choice, "_verdict", None)
    path.unlink()


def test_the_real_probe_times_both_sides():
    seconds = kernel_choice.measure()
    for op in kernel_choice.OPERATIONS:
        assert seconds[op]["cpu"] > 0 and seconds[op]["xla"] > 0


@pytest.mark.parametrize("linear_wins,attention_wins", [(True, False), (False, True)])
def test_the_engine_runs_and_reports_what_the_verdict_chose(linear_wins, attention_wins, tiny_models, monkeypatch):
    monkeypatch.setattr(kernel_choice, "_verdict", {"linear": linear_wins, "attention": attention_wins})
    converted = str(tiny_models["llama"][2])
    kw = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    auto = LLM(converted, **kw)
    assert auto.engine.linear_backend == ("cpu" if linear_wins else "xla")
    assert auto.engine.attn_backend == ("cpu" if attention_wins else "xla")
    prompts = [[5, 9, 13, 2, 8, 40, 41], list(range(3, 30))]
    xla = LLM(converted, attn_backend="xla", linear_backend="xla", **kw)
    assert ([o.outputs[0].token_ids for o in auto.generate(prompts, GREEDY, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in xla.generate(prompts, GREEDY, use_tqdm=False)])
