"""Scaling table: how throughput and memory grow with the amount of work, jpaged vs HF.

A grid of `jpaged bench throughput` runs (one process each), the number of prompts times the
prompt length, a fixed output length; the table and JSON give output tokens/s, seconds, peak
memory and KV waste per cell:

    python -m benchmarks.scaling --num-prompts 8 32 128 --input-len 128 512 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.offline_throughput import spawn


def table(rows: list[dict]) -> str:
    out = [f"{'prompts':>7} {'in len':>6} {'backend':22} {'out tok/s':>10} {'seconds':>8} {'peak MiB':>9} {'KV waste':>9}"]
    for r in rows:
        name = r["backend"] + (f" {r['mode'].split(' ')[0]}" if r["backend"] == "hf" else "")
        if "error" in r:
            out.append(f"{r['num_prompts']:7} {r['input_len']:6} {name:22} error: {r['error']}")
            continue
        mem = r["peak_device_mib"] or r["peak_host_mib"]
        waste = "" if r.get("kv_waste") is None else f"{100 * r['kv_waste']:.1f}%"
        out.append(f"{r['num_prompts']:7} {r['input_len']:6} {name:22} {r['output_tokens_per_s']:10.1f} "
                   f"{r['seconds']:8.1f} {mem:9.0f} {waste:>9}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--input-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--backends", nargs="+", default=["jpaged", "hf"], choices=["jpaged", "hf", "hf-cb"])
    p.add_argument("--max-num-seqs", type=int, default=32, help="jpaged: most sequences per step; hf: batch size")
    p.add_argument("--model", default=None)
    p.add_argument("--dummy-config", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    model = ["--dummy-config", args.dummy_config] if args.dummy_config else ["--model", args.model] if args.model else []
    rows = []
    for num_prompts in args.num_prompts:
        for input_len in args.input_len:
            for backend in args.backends:
                extra = [*model, "--dtype", args.dtype, "--dataset", "fixed", "--num-prompts", str(num_prompts),
                         "--input-len", str(input_len), "--output-len", str(args.output_len)]
                row = spawn(None, backend, "static-cache" if backend == "hf" else None, args.max_num_seqs, extra)
                rows.append(row | dict(num_prompts=num_prompts, input_len=input_len))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(rows))
    if args.out:
        from benchmarks.throughput import device_info

        with open(args.out, "w") as f:
            json.dump(dict(meta=device_info(), output_len=args.output_len, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
