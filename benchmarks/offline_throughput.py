"""Offline throughput, jpaged vs HF transformers, side by side in one run (issue: the paged engine).

Workloads (token-id prompts drawn with a fixed seed; every request generates exactly its
max_tokens, greedy, EOS ignored):
    uniform   32 prompts of 32-256 tokens, 128 new tokens each
    variable  64 prompts of 32-256 tokens, max_tokens drawn from 16-256 (what continuous batching is for)

Each configuration runs in its own process (so peak memory is its own), one after another:

    python -m benchmarks.offline_throughput --workload uniform variable --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKLOADS = {
    "uniform": dict(num_prompts=32, input_len=(32, 256), output_len=(128, 128)),
    "variable": dict(num_prompts=64, input_len=(32, 256), output_len=(16, 256)),
}
# HF configurations from the issue: (mode, batch size) per workload
HF_CONFIGS = {
    "uniform": [("static", 8), ("static-cache", 32), ("cb", 32)],
    "variable": [("static", 16), ("static", 32), ("static", 64), ("cb", 64)],
}


def make_workload(name: str, seed: int, vocab: int = 49152) -> tuple[list[list[int]], list[int]]:
    spec = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    lo, hi = spec["input_len"]
    prompts = [rng.integers(100, vocab, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(spec["num_prompts"])]
    lo, hi = spec["output_len"]
    return prompts, [int(rng.integers(lo, hi + 1)) for _ in prompts]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jpaged(prompts, max_tokens, *, max_num_seqs: int, budget: int) -> dict:
    from jpaged import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(None, max_num_seqs=max_num_seqs, max_model_len=512, max_num_batched_tokens=budget)
    startup = time.perf_counter() - start
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    stats = llm.get_stats()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(
        system="jpaged", mode=f"paged (max_num_seqs {max_num_seqs}, budget {budget})", batch_size=max_num_seqs,
        seconds=seconds, output_tokens=out_tokens, prompt_tokens=sum(map(len, prompts)),
        startup_seconds=startup, warmup_seconds=stats["warmup_seconds"],
        num_compiles_after_warmup=stats["num_compiles_after_warmup"], padding_efficiency=stats["padding_efficiency"],
        peak_rss_mib=_peak_rss_mib(),
    )


def run_hf(prompts, max_tokens, *, mode: str, batch_size: int) -> dict:
    from benchmarks.hf_baseline import load_hf_model, run_hf as hf
    from jpaged.model_files import default_model_source

    model = load_hf_model(default_model_source(), "float32")
    res = hf(model, prompts, max_tokens, mode=mode, batch_size=batch_size)
    res.pop("token_ids", None)
    return dict(system="hf", **res)


def _child(args) -> None:
    prompts, max_tokens = make_workload(args.workload[0], args.seed)
    if args.child == "jpaged":
        res = run_jpaged(prompts, max_tokens, max_num_seqs=args.batch_size, budget=args.budget)
    else:
        res = run_hf(prompts, max_tokens, mode=args.child, batch_size=args.batch_size)
    res.update(workload=args.workload[0], output_tokens_per_s=res["output_tokens"] / res["seconds"])
    with open(args.out, "w") as f:
        json.dump(res, f)


def _spawn(workload: str, child: str, batch_size: int, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, "-m", "benchmarks.offline_throughput", "--child", child, "--workload", workload,
           "--batch-size", str(batch_size), "--budget", str(args.budget), "--seed", str(args.seed), "--out", path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(system=child, workload=workload, batch_size=batch_size, error=proc.stderr.strip().splitlines()[-1])
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["uniform", "variable"], choices=list(WORKLOADS))
    p.add_argument("--hf", nargs="*", default=None, help="HF modes to run (default: the issue's list; none: skip HF)")
    p.add_argument("--budget", type=int, default=512, help="jpaged max_num_batched_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    rows = []
    for workload in args.workload:
        n = WORKLOADS[workload]["num_prompts"]
        rows.append(_spawn(workload, "jpaged", min(n, 64), args))
        for mode, bs in HF_CONFIGS[workload]:
            if args.hf is None or mode in args.hf:
                rows.append(_spawn(workload, mode, bs, args))
    print(f"\n{'workload':9} {'system':7} {'mode':38} {'out tok/s':>10} {'seconds':>8} {'peak MiB':>9}  notes")
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:9} {r['system']:7} {'':38} {'error':>10}  {r['error']}")
            continue
        mode = r["mode"] if r["system"] == "jpaged" else f"{r['mode']} (batch {r['batch_size']})"
        notes = (f"warm-up {r['warmup_seconds']:.0f}s, padding eff {r['padding_efficiency']:.2f}, "
                 f"compiles after warm-up {r['num_compiles_after_warmup']}") if r["system"] == "jpaged" else ""
        print(f"{r['workload']:9} {r['system']:7} {mode:38} {r['output_tokens_per_s']:10.1f} {r['seconds']:8.1f} "
              f"{r['peak_rss_mib']:9.0f}  {notes}")
    for workload in args.workload:
        ours = [r for r in rows if r["workload"] == workload and r["system"] == "jpaged" and "error" not in r]
        hf_rates = [r["output_tokens_per_s"] for r in rows if r["workload"] == workload and r["system"] == "hf"
                    and "error" not in r]
        if ours and hf_rates:
            print(f"{workload}: jpaged / best HF = {ours[0]['output_tokens_per_s'] / max(hf_rates):.2f}x")
    if args.out:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = ""
        import jax

        meta = dict(date=datetime.date.today().isoformat(), commit=commit, device=f"CPU ({os.cpu_count()} cores, "
                    f"{platform.processor() or platform.machine()})", jax=jax.__version__, dtype="float32",
                    model="SmolLM2-135M-Instruct (default)")
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
