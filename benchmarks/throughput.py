"""`jpaged bench throughput`: offline throughput of one backend on one workload, in vLLM's words.

    jpaged bench throughput --backend jpaged --dataset random --num-prompts 200 --input-len 128 --output-len 128
    jpaged bench throughput --backend hf --hf-mode static-cache --max-num-seqs 32 --workload uniform
    jpaged bench throughput --backend jpaged --dummy-config llama-3-8b --dtype bfloat16 --num-prompts 1000

Backends: jpaged (the paged engine); hf (transformers `generate`, static batches of
--max-num-seqs in arrival order, --hf-mode static or static-cache); hf-cb (transformers' own
continuous batching). One backend per process, so peak memory is its own; a side-by-side run
spawns one process per backend (benchmarks/offline_throughput.py, benchmarks/sweep.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.datasets import FIRST_ORDINARY_ID, Workload, issue_workload, make_workload
from pallas_kernels.cpu_build import cpu_model

CONFIGS = pathlib.Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True)
class ThroughputConfig:
    backend: str = "jpaged"  # jpaged | hf | hf-cb
    model: str | None = None  # None: the embedded default model
    dummy_config: str | None = None  # a name in benchmarks/configs/ (random weights of that shape)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: just enough for the workload's longest request
    hf_mode: str = "static-cache"
    linear_backend: str = "auto"  # jpaged's projections: auto | cpu | xla
    attn_backend: str = "auto"  # jpaged's attention: auto | cpu | xla | pallas
    tensor_parallel_size: int = 1  # jpaged: devices the model is split over
    quantization: str = "auto"  # jpaged's weights: auto (as stored) | none | int8 | int4 | int4-g128


def dummy_config_path(name: str) -> pathlib.Path:
    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise ValueError(f"unknown --dummy-config {name!r}; known: {known}")
    return path


def resolved_dtype(name: str) -> str:
    if name != "auto":
        return name
    import jax

    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def device_info() -> dict:
    """What the numbers were measured on: device, jax version, commit, date."""
    import jax

    dev = jax.devices()[0]
    device = (dev.device_kind if dev.platform == "gpu"
              else f"CPU ({os.cpu_count()} cores, {platform.machine()}, {cpu_model()})")
    commit = os.environ.get("JPAGED_GIT_COMMIT", "")  # a copied tree without .git (gpu_run.py --commit)
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=pathlib.Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return dict(date=datetime.date.today().isoformat(), device=device, jax=jax.__version__, commit=commit)


def peak_host_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peak_device_mib_jax() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def run_jpaged(cfg: ThroughputConfig, work: Workload) -> dict:
    """Runs every request through LLMEngine; samples KV accounting after each step."""
    from benchmarks.roofline import DecodeStepTimer, for_runner
    from jpaged import LLM, SamplingParams

    max_len = cfg.max_model_len or max(len(p) + n for p, n in zip(work.prompts, work.output_lens))
    kwargs = dict(dtype=cfg.dtype, max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                  max_model_len=max_len, linear_backend=cfg.linear_backend, attn_backend=cfg.attn_backend,
                  tensor_parallel_size=cfg.tensor_parallel_size, quantization=cfg.quantization,
                  warmup="full")  # every shape compiled before the clock starts, as a server would
    model = cfg.model
    if cfg.dummy_config:
        model, kwargs["load_format"] = str(dummy_config_path(cfg.dummy_config)), "dummy"
    start = time.perf_counter()
    llm = LLM(model, **kwargs)
    startup = time.perf_counter() - start
    engine = llm.engine
    # One untimed batch first, as HF warms up too. Its prompts are fresh random ids: pieces of the
    # benchmark's own prompts would leave their blocks in the prefix cache and hand the timed run
    # prefill it never does (HF has no such cache).
    rng = np.random.default_rng(2**31 - 1)  # independent of the workload: no block in common
    vocab = llm.engine.model_config.vocab_size
    head = [rng.integers(FIRST_ORDINARY_ID, vocab, size=min(len(p), max_len // 2)).tolist()
            for p in work.prompts[: cfg.max_num_seqs]]
    llm.generate(head, SamplingParams(temperature=0.0, max_tokens=min(16, max_len // 2), ignore_eos=True),
                 use_tqdm=False)
    hits_before = engine.get_stats()["prefix_cache_hits"]
    for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens)):
        engine.add_request(f"b{i}", prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    allocated = used = peak_allocated = 0
    num_out = 0
    roofline = for_runner(engine.runner)
    start = time.perf_counter()
    with DecodeStepTimer(engine.runner, roofline):
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    num_out += len(out.outputs[0].token_ids)
            stats = engine.get_stats()
            allocated += stats["kv_slots_allocated"]
            used += stats["kv_tokens_used"]
            peak_allocated = max(peak_allocated, stats["kv_slots_allocated"])
    seconds = time.perf_counter() - start
    stats = engine.get_stats()
    if num_out != work.num_output_tokens:
        raise RuntimeError(f"generated {num_out} tokens, expected {work.num_output_tokens}")
    return dict(
        mode=f"paged (max_num_seqs {cfg.max_num_seqs}, budget {cfg.max_num_batched_tokens})",
        seconds=seconds, startup_seconds=startup, warmup_seconds=stats["warmup_seconds"],
        num_compiles_after_warmup=stats["num_compiles_after_warmup"],
        prefix_cache_hits=stats["prefix_cache_hits"] - hits_before,  # random prompts: expect ~0
        padding_efficiency=stats["padding_efficiency"], num_preemptions=stats["num_preemptions"],
        kv_capacity_tokens=stats["kv_capacity_tokens"], kv_peak_slots_allocated=peak_allocated,
        # over all steps: KV slots held by running requests that hold no token yet (partial last blocks)
        kv_waste=1 - used / allocated if allocated else 0.0,
        peak_device_mib=_peak_device_mib_jax(),
        decode_roofline=roofline.as_dict(),
        quantization=cfg.quantization, weight_format=engine.weight_format, weight_bytes=engine.weight_bytes,
        linear_backend=engine.linear_backend, attn_backend=engine.attn_backend,
    )


def _hf_kv_slots(work: Workload, batch_size: int) -> int:
    """KV slots a static batch holds: every row padded to the batch's longest prompt + longest output."""
    total = 0
    for lo in range(0, len(work.prompts), batch_size):
        prompts, outs = work.prompts[lo:lo + batch_size], work.output_lens[lo:lo + batch_size]
        total += len(prompts) * (max(map(len, prompts)) + max(outs))
    return total


def run_hf(cfg: ThroughputConfig, work: Workload) -> dict:
    from benchmarks.hf_baseline import default_gguf, dummy_hf_model, load_hf_model, run_hf as hf

    dtype = resolved_dtype(cfg.dtype)
    if cfg.dummy_config:
        model = dummy_hf_model(dummy_config_path(cfg.dummy_config), dtype)
    else:
        source = cfg.model or default_gguf()
        if source is None:
            raise ValueError("the default model is not installed; pass --model (an HF folder or .gguf file)")
        if pathlib.Path(source, "jpaged_manifest.json").is_file():
            raise ValueError(f"{source} is a jpaged checkpoint; the HF backends need an HF folder, a .gguf or --dummy-config")
        model = load_hf_model(source, dtype)
    mode = "cb" if cfg.backend == "hf-cb" else cfg.hf_mode
    res = hf(model, work.prompts, work.output_lens, mode=mode, batch_size=cfg.max_num_seqs)
    res.pop("token_ids")
    out = dict(mode=f"{mode} (batch {cfg.max_num_seqs})", seconds=res["seconds"], setup_seconds=res["setup_seconds"],
               torch_threads=res["torch_threads"], peak_device_mib=None)
    if mode != "cb":
        used = work.num_prompt_tokens + work.num_output_tokens
        out["kv_waste"] = 1 - used / _hf_kv_slots(work, cfg.max_num_seqs)
    import torch

    if torch.cuda.is_available():
        out["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(cfg: ThroughputConfig, work: Workload) -> dict:
    if cfg.backend not in ("jpaged", "hf", "hf-cb"):
        raise ValueError(f"backend must be jpaged, hf or hf-cb, got {cfg.backend!r}")
    if cfg.backend != "jpaged" and cfg.tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size {cfg.tensor_parallel_size} is for --backend jpaged only, "
                         f"not {cfg.backend}")
    res = run_jpaged(cfg, work) if cfg.backend == "jpaged" else run_hf(cfg, work)
    seconds = res["seconds"]
    res.update(
        backend=cfg.backend, model=cfg.dummy_config or cfg.model or "SmolLM2-135M-Instruct (default)",
        tensor_parallel_size=cfg.tensor_parallel_size,
        dtype=resolved_dtype(cfg.dtype), num_requests=len(work.prompts), prompt_tokens=work.num_prompt_tokens,
        output_tokens=work.num_output_tokens, requests_per_s=len(work.prompts) / seconds,
        total_tokens_per_s=(work.num_prompt_tokens + work.num_output_tokens) / seconds,
        output_tokens_per_s=work.num_output_tokens / seconds, peak_host_mib=peak_host_mib(),
    )
    return res


def summary(res: dict) -> str:
    lines = [
        f"Backend: {res['backend']} {res['mode']}, {res['model']}, {res['dtype']}",
        f"Throughput: {res['requests_per_s']:.2f} requests/s, {res['total_tokens_per_s']:.2f} total tokens/s, "
        f"{res['output_tokens_per_s']:.2f} output tokens/s",
        f"Total num prompt tokens:  {res['prompt_tokens']}",
        f"Total num output tokens:  {res['output_tokens']}",
        f"Elapsed: {res['seconds']:.2f}s",
        f"Peak host memory: {res['peak_host_mib']:.0f} MiB"
        + (f", peak device memory: {res['peak_device_mib']:.0f} MiB" if res.get("peak_device_mib") else ""),
    ]
    if res.get("kv_waste") is not None:
        lines.append(f"KV waste (allocated slots not holding a token): {100 * res['kv_waste']:.1f}%")
    if res["backend"] == "jpaged":
        lines.append(f"Warm-up: {res['warmup_seconds']:.1f}s, compiles after warm-up: {res['num_compiles_after_warmup']}, "
                     f"padding efficiency: {res['padding_efficiency']:.3f}, preemptions: {res['num_preemptions']}, "
                     f"prefix-cache hits while timed: {res['prefix_cache_hits']}")
        roof = res["decode_roofline"]
        if roof["decode_steps"]:
            lines.append(f"Decode vs memory roofline: {100 * roof['roofline_fraction']:.0f}% ({roof['decode_steps']} "
                         f"decode-only steps, mean batch {roof['mean_batch']:.1f}: {roof['mean_step_ms']:.1f} ms per "
                         f"step, bound {roof['mean_roofline_step_ms']:.1f} ms at {roof['bandwidth_gb_s']:.1f} GB/s)")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="jpaged bench throughput", description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="jpaged", choices=["jpaged", "hf", "hf-cb"])
    p.add_argument("--hf-mode", default="static-cache", choices=["static", "static-cache"],
                   help="how --backend hf batches (static: dynamic cache; static-cache: preallocated)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    src.add_argument("--dummy-config", default=None, help="random weights of a shape in benchmarks/configs/ "
                     "(llama-3-8b, llama-3.2-1b, smollm2-135m)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--workload", default=None, choices=["uniform", "variable"],
                   help="the engine issue's CPU workloads (overrides the dataset options)")
    p.add_argument("--dataset", default="random", choices=["random", "fixed"])
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=32, help="jpaged: most sequences per step; hf: batch size")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--linear-backend", default="auto", help="jpaged's projections: auto | cpu | xla")
    p.add_argument("--attn-backend", default="auto", help="jpaged's attention: auto | cpu | xla | pallas")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4", "int4-g128"],
                   help="jpaged's weights: auto (as stored: the default model's 4-bit blocks packed), none (float32)")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                   help="jpaged: devices to split the model over (on a CPU, XLA_FLAGS="
                        "--xla_force_host_platform_device_count=N before the run gives N host devices)")
    p.add_argument("--output-json", default=None)
    return p


def workload_from_args(args: argparse.Namespace, vocab_size: int) -> Workload:
    if args.workload:
        return issue_workload(args.workload, args.seed, vocab_size)
    return make_workload(args.dataset, num_prompts=args.num_prompts, input_len=args.input_len,
                         output_len=args.output_len, range_ratio=args.range_ratio, seed=args.seed,
                         vocab_size=vocab_size)


def vocab_size_of(model: str | None, dummy_config: str | None) -> int:
    """Prompt ids are drawn below this: the vocabulary of the config or folder, else SmolLM2's."""
    config = dummy_config_path(dummy_config) if dummy_config else pathlib.Path(model or "", "config.json")
    if (dummy_config or model) and config.is_file():
        return json.loads(config.read_text())["vocab_size"]
    return 49152  # the default model and GGUF files of the SmolLM2 family


def run_from_args(args: argparse.Namespace) -> dict:
    cfg = ThroughputConfig(backend=args.backend, model=args.model, dummy_config=args.dummy_config, dtype=args.dtype,
                           max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                           max_model_len=args.max_model_len, hf_mode=args.hf_mode,
                           linear_backend=args.linear_backend, attn_backend=args.attn_backend,
                           tensor_parallel_size=args.tensor_parallel_size,
                           quantization=args.quantization)
    work = workload_from_args(args, vocab_size_of(cfg.model, cfg.dummy_config))
    res = run(cfg, work)
    res.update(dataset=args.workload or args.dataset, meta=device_info())
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    res = run_from_args(args)
    print(summary(res))
    if args.output_json:
        pathlib.Path(args.output_json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
