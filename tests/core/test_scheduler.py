"""Scheduler: token budget, chunking, preemption of the newest, priorities, admission checks, no leaks."""

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jpaged.core.request import Request, RequestStatus
from jpaged.core.scheduler import Scheduler, SchedulerConfig
from jpaged.sampling_params import SamplingParams

EOS = frozenset({0})


def make(num_blocks=64, block_size=4, budget=8, max_seqs=4, max_len=64, caching=True):
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, block_size, num_blocks, caching))


def req(req_id, n, max_tokens=4, priority=0, arrival=0.0, base=10, **kw):
    params = SamplingParams(max_tokens=max_tokens, **kw)
    return Request(req_id, list(range(base, base + n)), params, seed=0, priority=priority, arrival_time=arrival)


def step(s, tokens=None):
    out = s.schedule()
    sampled = np.array(tokens if tokens is not None else [7] * len(out.chunks), np.int32)
    return out, s.update_from_output(out, sampled, EOS)


def test_running_first_then_chunked_prefill_within_budget():
    s = make(budget=8)
    s.add_request(req("a", 10, arrival=1))
    s.add_request(req("b", 10, arrival=2, base=50))
    out, _ = step(s)
    assert [(c.req_id, len(c.token_ids), c.start, c.samples) for c in out.chunks] == [("a", 8, 0, False)]
    out, _ = step(s)
    assert [(c.req_id, len(c.token_ids), c.start, c.samples) for c in out.chunks] == [("a", 2, 8, True), ("b", 6, 0, False)]
    out, _ = step(s)  # a decodes its first output token, b finishes its prompt
    assert [(c.req_id, c.token_ids.tolist(), c.start) for c in out.chunks] == [("a", [7], 10), ("b", [56, 57, 58, 59], 6)]
    assert s.requests["a"].output_token_ids == [7, 7]


def test_stop_rules_and_blocks_come_back():
    s = make(budget=64)
    s.add_request(req("len", 3, max_tokens=2, arrival=1))
    s.add_request(req("eos", 3, max_tokens=10, arrival=2))
    s.add_request(req("stopid", 3, max_tokens=10, stop_token_ids=(5,), arrival=3))
    s.add_request(req("min", 3, max_tokens=10, min_tokens=2, arrival=4))
    _, fin = step(s, [7, 0, 5, 0])  # eos / stop id right away; "min" must ignore eos
    assert sorted((f.req_id, f.status) for f in fin) == [
        ("eos", RequestStatus.FINISHED_STOPPED), ("stopid", RequestStatus.FINISHED_STOPPED)]
    assert s.requests["min"].output_token_ids == [0]
    _, fin = step(s, [7, 0])  # eos counts from min's 2nd token on
    assert [(f.req_id, f.status) for f in fin] == [
        ("len", RequestStatus.FINISHED_LENGTH), ("min", RequestStatus.FINISHED_STOPPED)]
    assert not s.has_unfinished() and s.kv.pool.num_free == s.kv.pool.num_blocks


def test_newest_request_is_preempted_and_recomputed_first():
    # 4 usable blocks of 4 tokens: a and b (8 tokens each) fill them; a's decode needs a 3rd block
    s = make(num_blocks=5, block_size=4, budget=16, caching=False)
    s.add_request(req("a", 8, max_tokens=6, arrival=1))
    s.add_request(req("b", 8, max_tokens=6, arrival=2, base=50))
    out, _ = step(s)
    assert [c.req_id for c in out.chunks] == ["a", "b"] and s.kv.pool.num_free == 0
    out, _ = step(s)
    assert out.preempted_req_ids == ["b"] and [c.req_id for c in out.chunks] == ["a"]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and s.waiting == [b]
    assert b.output_token_ids == [7]  # kept: recomputed as part of its sequence
    assert s.num_preemptions == 1


def test_priority_then_arrival_order():
    s = make(max_seqs=1, budget=64)
    s.add_request(req("late-low", 2, priority=0, arrival=3))
    s.add_request(req("early-low", 2, priority=0, arrival=1))
    s.add_request(req("high", 2, priority=-1, arrival=5))
    assert [r.req_id for r in s.waiting] == ["high", "early-low", "late-low"]


def test_requests_that_can_never_fit_are_rejected_at_admission():
    s = make(num_blocks=5, block_size=4, max_len=64)
    with pytest.raises(ValueError, match="maximum context length is 64 tokens. However, you requested 70 tokens"):
        s.add_request(req("long", 60, max_tokens=10))
    with pytest.raises(ValueError, match="exceeds the KV cache capacity of 16 tokens"):
        s.add_request(req("big", 10, max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        s.add_request(req("empty", 0))
    s.add_request(req("ok", 4))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("ok", 4))


def test_prefix_hit_skips_computed_tokens():
    s = make(budget=64, block_size=4)
    s.add_request(req("a", 10, max_tokens=1, arrival=1))
    step(s)
    s.add_request(req("b", 10, max_tokens=1, arrival=2))
    out, _ = step(s)
    (chunk,) = out.chunks
    assert chunk.start == 8 and len(chunk.token_ids) == 2
    assert s.kv.prefix_cache_hits == 8


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds / steps / aborts; every block is accounted for after every operation."""

    def __init__(self):
        super().__init__()
        self.s = make(num_blocks=12, block_size=4, budget=10, max_seqs=3, max_len=40)
        self.n = 0

    @rule(n=st.integers(1, 20), max_tokens=st.integers(1, 12), shared=st.booleans(), priority=st.integers(0, 2))
    def add(self, n, max_tokens, shared, priority):
        r = req(f"r{self.n}", n, max_tokens=max_tokens, priority=priority, arrival=self.n,
                base=10 if shared else 100 + 50 * self.n)
        self.n += 1
        if n + max_tokens > 40:
            with pytest.raises(ValueError):
                self.s.add_request(r)
        else:
            self.s.add_request(r)

    @rule(eos=st.booleans())
    def step(self, eos):
        out = self.s.schedule()
        assert out.num_tokens <= 10 and len(out.chunks) <= 3
        self.s.update_from_output(out, np.array([0 if eos else 7] * len(out.chunks)), EOS)

    @precondition(lambda self: self.s.requests)
    @rule(data=st.data())
    def abort(self, data):
        req_id = data.draw(st.sampled_from(sorted(self.s.requests)))
        self.s.finish(req_id, RequestStatus.FINISHED_ABORTED)

    @invariant()
    def blocks_are_accounted_for(self):
        kv = self.s.kv
        holders = {}
        for req_id, blocks in kv.req_blocks.items():
            assert req_id in self.s.requests
            for b in blocks:
                holders[b.block_id] = holders.get(b.block_id, 0) + 1
        for block in kv.pool.blocks[1:]:
            assert block.ref_cnt == holders.get(block.block_id, 0)
        free = set(kv.pool.free_queue.block_ids())
        assert free == {b.block_id for b in kv.pool.blocks[1:] if b.ref_cnt == 0}
        assert kv.pool.num_free == len(free)
        for r in self.s.running:  # a running request holds blocks for every computed token
            assert len(kv.req_blocks[r.req_id]) * 4 >= r.num_computed_tokens

    def teardown(self):
        for _ in range(200):
            if not self.s.has_unfinished():
                break
            self.step(eos=False)
        assert not self.s.has_unfinished()
        assert self.s.kv.pool.num_free == self.s.kv.pool.num_blocks  # nothing leaked


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
