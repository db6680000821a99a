"""Float32 vs packed weights, side by side in one run: `jpaged bench throughput` with
--quantization none and auto (the default model's native Q4_1/Q8_0 blocks) on one stream
(batch 1, 128 prompt tokens, 128 new) and on the uniform workload (32 prompts of 32-256 tokens,
128 new). Each configuration runs in its own process (benchmarks.offline_throughput.spawn), the
two weight formats alternating for --rounds rounds, so machine noise hits both alike; a ratio is
taken within each round and the median of the rounds reported (on a shared 2-core machine one
run's one-stream ratio moved between 1.7x and 2.3x).

    python -m benchmarks.quantized_throughput --linear-backend cpu --out benchmarks/results/DATE-cpu-quantized-throughput.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

from benchmarks.offline_throughput import spawn
from benchmarks.throughput import device_info

ONE_STREAM = ["--num-prompts", "1", "--input-len", "128", "--output-len", "128", "--dataset", "fixed"]
WORKLOADS = {"one-stream": (None, 1, ONE_STREAM), "uniform": ("uniform", 32, [])}
QUANTIZATIONS = ("none", "auto")


def table(rows: list[dict]) -> str:
    out = [f"{'workload':11} {'round':>5} {'weights':34} {'linear':6} {'weight MiB':>10} {'out tok/s':>10} "
           f"{'decode ms':>9} {'roofline':>8}"]
    for r in rows:
        head = f"{r['workload']:11} {r.get('round', 0):5d}"
        if "error" in r:
            out.append(f"{head} {r['quantization']:34} error: {r['error']}")
            continue
        roof = r["decode_roofline"]
        out.append(f"{head} {r['weight_format'][:34]:34} {r['linear_backend']:6} "
                   f"{r['weight_bytes'] / 2**20:10.1f} {r['output_tokens_per_s']:10.1f} {roof['mean_step_ms']:9.1f} "
                   f"{100 * roof['roofline_fraction']:7.0f}%")
    return "\n".join(out)


def ratios(rows: list[dict]) -> dict:
    """Per workload: packed / float output tok/s within each round (both formats ran in it) and
    their median, and packed / float weight bytes."""
    by = {(r["workload"], r.get("round", 0), r["quantization"]): r for r in rows if "error" not in r}
    out = {}
    for workload in WORKLOADS:
        pairs = [(by[key], by[(*key[:2], "auto")]) for key in sorted(by)
                 if key[0] == workload and key[2] == "none" and (*key[:2], "auto") in by]
        if pairs:
            speedups = [q["output_tokens_per_s"] / f["output_tokens_per_s"] for f, q in pairs]
            f, q = pairs[0]
            out[workload] = dict(speedup=statistics.median(speedups), speedups=speedups,
                                 weight_bytes_fraction=q["weight_bytes"] / f["weight_bytes"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--linear-backend", default="auto",
                   help="both formats' projections (auto: float32 takes whichever of the C++ kernel and XLA a "
                        "one-time measurement found faster, which on a busy machine can be either; cpu pins it)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each format, alternating (ratios: their median)")
    p.add_argument("--out", default=None, help="results JSON")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    rows = []
    for name in args.workload:
        workload, batch, extra = WORKLOADS[name]
        for round_ in range(args.rounds):
            for quantization in QUANTIZATIONS:
                res = spawn(workload, "jpaged", None, batch,
                            [*extra, "--quantization", quantization, "--linear-backend", args.linear_backend])
                res.update(workload=name, quantization=quantization, round=round_)
                rows.append(res)
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    result = dict(meta=device_info(), rows=rows, ratios=ratios(rows))
    print(json.dumps(result["ratios"], indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
