"""What a decode step costs the host before the device starts: one stream of the default model
(128 prompt tokens, then one-token steps), per step the time until the model program's call
returns (jax checks, transfers and hands over every argument: parameters, KV pools, batch) and
the whole engine step, medians over the steps of --generations generations.

A source tree per --trees entry (default: this one), each run in its own process with that tree
first on the path, the trees alternating for --rounds rounds, so one run compares two commits
side by side (machine noise hits both alike):

    python -m benchmarks.step_dispatch --trees /path/to/old/checkout . --rounds 3 \\
        --out benchmarks/results/DATE-cpu-step-dispatch.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

PROMPT = list(range(1000, 1128))


def measure(generations: int, new_tokens: int, quantization: str) -> dict:
    """One process's numbers for the tree it imported jpaged from."""
    import jax

    from jpaged import LLM, SamplingParams
    from jpaged.outputs import RequestOutputKind

    llm = LLM(quantization=quantization, max_num_seqs=1, max_model_len=512)
    runner, engine = llm.engine.runner, llm.engine
    calls: list[tuple[int, float]] = []  # (T, seconds until the forward call returned)
    run_forward = runner._run_forward

    def timed(batch, forward):
        start = time.perf_counter()
        out = run_forward(batch, forward)
        calls.append((batch.token_ids.shape[0], time.perf_counter() - start))
        return out

    runner._run_forward = timed
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    steps: list[float] = []
    dispatch: list[float] = []
    for g in range(generations + 1):  # the first warms up (deferred loads, first-touch pages)
        calls.clear()
        engine.add_request(f"r{g}", {"prompt_token_ids": [t + g for t in PROMPT]}, params,
                           output_kind=RequestOutputKind.FINAL_ONLY)
        walls = []
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - start)
        assert len(calls) == len(walls), "one model call a step"
        if g:
            steps += [w for (t, _), w in zip(calls, walls) if t == 1]
            dispatch += [d for t, d in calls if t == 1]
    return dict(arrays_per_call=len(runner._state_leaves) + len(jax.tree.leaves(runner.kv_caches)),
                kv_arrays=len(jax.tree.leaves(runner.kv_caches)), decode_steps=len(steps),
                dispatch_ms=1e3 * statistics.median(dispatch), step_ms=1e3 * statistics.median(steps))


def spawn(tree: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
    script = pathlib.Path(__file__).resolve()
    cmd = [sys.executable, str(script), "--child", "--generations", str(args.generations),
           "--new-tokens", str(args.new_tokens), "--quantization", args.quantization]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        return dict(tree=tree, error=(proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=tree)
    return dict(tree=tree, commit=commit.stdout.strip(), **json.loads(proc.stdout.strip().splitlines()[-1]))


def table(rows: list[dict]) -> str:
    out = [f"{'round':>5} {'commit':9} {'arrays':>6} {'KV arrays':>9} {'dispatch ms':>11} {'step ms':>8}"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['round']:5d} {r['tree']}: error: {r['error']}")
            continue
        out.append(f"{r['round']:5d} {r['commit']:9} {r['arrays_per_call']:6d} {r['kv_arrays']:9d} "
                   f"{r['dispatch_ms']:11.2f} {r['step_ms']:8.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", nargs="+", default=["."], help="source trees to compare (checkouts of this repository)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--generations", type=int, default=3, help="measured generations per process")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quantization", default="auto", help="auto: the default model's own Q4_1/Q8_0 blocks")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.generations, args.new_tokens, args.quantization)))
        return 0
    from benchmarks.throughput import device_info

    rows = []
    for r in range(args.rounds):
        for tree in args.trees:
            rows.append(dict(round=r, **spawn(str(pathlib.Path(tree).resolve()), args)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(dict(meta=device_info(), rows=rows), indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
