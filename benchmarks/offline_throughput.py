"""Offline throughput, jpaged vs HF transformers, side by side in one run (the engine issue's bars).

Workloads (benchmarks.datasets.issue_workload: token-id prompts drawn with a fixed seed; every
request generates exactly its max_tokens, greedy, EOS ignored):
    uniform   32 prompts of 32-256 tokens, 128 new tokens each
    variable  64 prompts of 32-256 tokens, max_tokens drawn from 16-256 (what continuous batching is for)

Each configuration is one `jpaged bench throughput` process (so peak memory is its own), one
after another:

    python -m benchmarks.offline_throughput --workload uniform variable --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

# (backend, HF mode, batch size) per workload: jpaged, then the HF configurations the issue lists,
# plus HF's preallocated static cache on the variable workload (its fastest mode on the uniform one).
CONFIGS = {
    "uniform": [("jpaged", None, 32), ("hf", "static", 8), ("hf", "static-cache", 32), ("hf-cb", None, 32)],
    "variable": [("jpaged", None, 64), ("hf", "static", 16), ("hf", "static", 32), ("hf", "static", 64),
                 ("hf", "static-cache", 32), ("hf", "static-cache", 64), ("hf-cb", None, 64)],
}


def spawn(workload: str | None, backend: str, hf_mode: str | None, batch_size: int, extra: list[str]) -> dict:
    """Runs one `bench throughput` configuration in a fresh process (an issue workload, or the
    dataset options in extra); a failure becomes a row with its error."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "benchmarks.throughput", "--backend", backend,
               "--max-num-seqs", str(batch_size), "--output-json", f.name, *extra]
        if workload:
            cmd += ["--workload", workload]
        if hf_mode:
            cmd += ["--hf-mode", hf_mode]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode]
            return dict(backend=backend, workload=workload, mode=hf_mode or "", error=lines[-1])
        res = json.loads(pathlib.Path(f.name).read_text())
    res["workload"] = workload
    return res


def table(rows: list[dict]) -> str:
    out = [f"{'workload':9} {'backend':7} {'mode':36} {'out tok/s':>10} {'seconds':>8} {'host MiB':>9} {'KV waste':>9}  notes"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['workload']:9} {r['backend']:7} {r['mode']:36} {'error':>10}  {r['error']}")
            continue
        waste = "" if r.get("kv_waste") is None else f"{100 * r['kv_waste']:.1f}%"
        notes = (f"warm-up {r['warmup_seconds']:.0f}s, padding eff {r['padding_efficiency']:.2f}, "
                 f"compiles after warm-up {r['num_compiles_after_warmup']}") if r["backend"] == "jpaged" else ""
        out.append(f"{r['workload']:9} {r['backend']:7} {r['mode']:36} {r['output_tokens_per_s']:10.1f} "
                   f"{r['seconds']:8.1f} {r['peak_host_mib']:9.0f} {waste:>9}  {notes}")
    return "\n".join(out)


def ratios(rows: list[dict]) -> dict[str, float]:
    """jpaged output tokens/s over the best HF configuration's, per workload."""
    result = {}
    for workload in dict.fromkeys(r["workload"] for r in rows):
        ok = [r for r in rows if r["workload"] == workload and "error" not in r]
        ours = [r["output_tokens_per_s"] for r in ok if r["backend"] == "jpaged"]
        hf = [r["output_tokens_per_s"] for r in ok if r["backend"] != "jpaged"]
        if ours and hf:
            result[workload] = ours[0] / max(hf)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["uniform", "variable"], choices=list(CONFIGS))
    p.add_argument("--skip-hf", action="store_true", help="jpaged rows only")
    p.add_argument("--budget", type=int, default=512, help="jpaged max_num_batched_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the rows and the ratios")
    args = p.parse_args(argv)

    rows = []
    for workload in args.workload:
        for backend, hf_mode, batch_size in CONFIGS[workload]:
            if backend != "jpaged" and args.skip_hf:
                continue
            extra = ["--seed", str(args.seed), "--max-num-batched-tokens", str(args.budget)]
            rows.append(spawn(workload, backend, hf_mode, batch_size, extra))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(rows))
    for workload, ratio in ratios(rows).items():
        print(f"{workload}: jpaged / best HF = {ratio:.2f}x")
    if args.out:
        from benchmarks.throughput import device_info

        with open(args.out, "w") as f:
            json.dump(dict(meta=device_info(), rows=rows, ratios=ratios(rows)), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
