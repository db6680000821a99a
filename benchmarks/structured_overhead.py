"""What structured outputs add to a decode step: B = 1, 8, 32 sequences, none / half / all of
them constrained, on the default model.

    python -m benchmarks.structured_overhead --out benchmarks/results/DATE-cpu-structured-overhead.json

Each timed step is ModelRunner.step on a decode batch (every sequence at position 64), as the
engine calls it: the model program is dispatched, the host fills the constrained rows' masks
(llguidance, every row's matcher advanced by one token of its schema's valid instance per step,
so the masks change as in a real request), then the sampler runs with the mask. `mask_ms` is
the host's fill alone, timed separately: when it is below the step's increase, the fill hides
behind the model program and what is left is the sampler's unpacking of the mask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.structured_cases import SCHEMAS
from jpaged.core.scheduler import ScheduledChunk
from jpaged.runner.batch import build_batch
from jpaged.sampling_params import SamplingParams
from jpaged.structured import StructuredOutputs
from pallas_kernels.cpu_build import cpu_model

POSITION = 64


class Rows:
    """A constrained sequence per row, each walking its schema's instance token by token."""

    def __init__(self, backend, tokenizer, num_rows: int):
        self.backend = backend
        cases = list(SCHEMAS.values())
        self.items = []
        for i in range(num_rows):
            schema, instance = cases[i % len(cases)]
            tokens = tokenizer.encode(json.dumps(instance), add_special_tokens=False)
            self.items.append([StructuredOutputs(json=schema).key, tokens, None, 0])
        for item in self.items:
            self._restart(item)

    def _restart(self, item) -> None:
        item[2], item[3] = self.backend.matcher(item[0]), 0

    def fill(self, bitmask: np.ndarray) -> None:
        self.backend.fill_bitmask([(item[2], row) for row, item in enumerate(self.items)], bitmask)

    def advance(self) -> None:
        for item in self.items:
            key, tokens, matcher, pos = item
            matcher.accept_token(tokens[pos])
            item[3] += 1
            if item[3] == len(tokens):
                self._restart(item)


def decode_batch(runner, batch_size: int):
    spec = runner.spec
    pages = -(-(POSITION + 1) // spec.page_size)
    chunks = []
    for i in range(batch_size):
        blocks = np.arange(1 + i * pages, 1 + (i + 1) * pages, dtype=np.int32)
        history = np.full(POSITION + 1, 5, np.int32)
        chunks.append(ScheduledChunk(req_id=str(i), token_ids=history[-1:].copy(), start=POSITION, block_ids=blocks,
                                     samples=True, params=SamplingParams(temperature=0.0), seed=i, history=history,
                                     num_prompt_tokens=POSITION))
    return build_batch(chunks, spec)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from jpaged import LLM

    max_seqs = max(args.batch)
    llm = LLM(max_num_seqs=max_seqs, max_num_batched_tokens=max(max_seqs, 16), max_model_len=256,
              num_kv_blocks=max_seqs * 6 + 8)
    runner, backend = llm.engine.runner, llm.engine.grammar_backend()
    tokenizer = llm.get_tokenizer()
    rows_out = []
    print(f"{'B':>3} {'constrained':>11} {'step ms':>9} {'vs none':>8} {'mask fill ms':>12}")
    for b in args.batch:
        batch = decode_batch(runner, b)
        configs = [("none", 0)] + ([("half", b // 2)] if b > 1 else []) + [("all", b)]
        rows = {label: Rows(backend, tokenizer, num) if num else None for label, num in configs}
        times = {label: [] for label, _ in configs}
        fills = {label: [] for label, _ in configs}
        # The configurations take turns step by step, so a drift of the machine's speed hits all alike.
        for i in range(args.steps + 3):
            for label, _ in configs:
                r = rows[label]
                start = time.perf_counter()
                runner.step(batch, None if r is None else r.fill)
                elapsed = time.perf_counter() - start
                fill_s = 0.0
                if r is not None:
                    mask = np.full(batch.sampling.token_bitmask.shape, -1, np.int32)
                    t0 = time.perf_counter()
                    r.fill(mask)
                    fill_s = time.perf_counter() - t0
                    r.advance()
                if i >= 3:  # warm-up steps (compiles) left out
                    times[label].append(elapsed)
                    fills[label].append(fill_s)
        base = 1e3 * statistics.median(times["none"])
        for label, num in configs:
            step_ms = 1e3 * statistics.median(times[label])
            row = dict(batch=b, constrained=label, num_constrained=num, step_ms=step_ms,
                       overhead_ms=step_ms - base, overhead_pct=100 * (step_ms - base) / base,
                       mask_fill_ms=1e3 * statistics.median(fills[label]))
            rows_out.append(row)
            print(f"{b:>3} {label:>11} {step_ms:>9.2f} {row['overhead_pct']:>+7.1f}% {row['mask_fill_ms']:>12.3f}")
    out = {"meta": {"cpu": cpu_model(), "model": "SmolLM2-135M-Instruct",
                    "position": POSITION, "steps": args.steps,
                    "attn_backend": llm.engine.attn_backend, "linear_backend": llm.engine.linear_backend},
           "results": rows_out}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
