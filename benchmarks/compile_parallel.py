"""Does compiling the step shapes on a thread pool pay? Full warm-up of one engine's buckets
with 1, 2, 4, ... compile workers, each on a fresh runner (no executable store, nothing cached).

    python -m benchmarks.compile_parallel --workers 1 2 4 --out benchmarks/results/DATE-cpu-compile-parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--dummy-config", default=None, help="random weights of a benchmarks/configs shape")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=1, help="runs per worker count (interleaved)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ["JPAGED_COMPILATION_CACHE"] = "0"  # this measures compiles, not loads

    from flax import nnx

    from benchmarks.throughput import device_info, dummy_config_path
    from jpaged import LLM
    from jpaged.runner.model_runner import ModelRunner

    kwargs = dict(dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                  max_num_batched_tokens=args.max_num_batched_tokens, warmup="lazy")
    model = args.model
    if args.dummy_config:
        model, kwargs["load_format"] = str(dummy_config_path(args.dummy_config)), "dummy"
    engine = LLM(model, **kwargs).engine
    base = engine.runner
    shapes = base.spec.shapes()
    model_obj = nnx.merge(base.graphdef, base.state)
    runs: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):
        for workers in args.workers:
            runner = ModelRunner(model_obj, base.spec, kv_dtype=base.kv_caches[0].dtype)
            start = time.perf_counter()
            runner.prepare(shapes, workers=workers)
            runs[workers].append(time.perf_counter() - start)

    serial = min(runs[args.workers[0]])
    print(f"{len(shapes)} step shapes ({len(base.missing(shapes))} executables), {os.cpu_count()} cores")
    print(f"{'workers':>8} {'best s':>8} {'speed-up':>9}")
    for workers, times in runs.items():
        print(f"{workers:>8} {min(times):>8.1f} {serial / min(times):>8.2f}x")
    result = dict(device_info(), cores=os.cpu_count(), num_shapes=len(shapes), model=model or "default",
                  seconds={str(w): t for w, t in runs.items()},
                  speedup={str(w): serial / min(t) for w, t in runs.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
