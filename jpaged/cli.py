"""`jpaged` command line: convert, generate, serve, cache, bench."""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a KV cache is in a language model.",
    "Give me three tips for learning to cook.",
]


# jpaged.quantization.CHOICES, written out: the parser must not import jax.
QUANTIZATION_CHOICES = ["auto", "none", "int8", "int4", "int4-g128"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


def _add_engine_args(p: argparse.ArgumentParser, warmup: str) -> None:
    p.add_argument("--model", default=None, help="jpaged checkpoint, HF folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--attn-backend", default="auto", help="auto | cpu | xla | pallas")
    p.add_argument("--linear-backend", default="auto", help="auto | cpu | xla | pallas (the projections' kernels; pallas: packed weights on a GPU)")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                   help="weights: auto (as the checkpoint holds them; a GGUF's 4/8-bit blocks packed), none (float), "
                        "or round-to-nearest of a float checkpoint's layers at load")
    p.add_argument("--warmup", default=warmup, choices=["full", "lazy"],
                   help=f"compile every step shape before ready (full) or each when first needed (lazy); default {warmup}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                   help="devices to split the model over (it must divide the attention heads); default 1")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    names = ["dtype", "load_format", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
             "num_kv_blocks", "block_size", "attn_backend", "linear_backend", "warmup", "seed",
             "tensor_parallel_size", "quantization"]
    return {name: getattr(args, name) for name in names}


def _cmd_convert(args: argparse.Namespace) -> None:
    from convert.convert import convert_checkpoint

    convert_checkpoint(args.src, args.out, dtype=args.dtype, quantization=args.quantization)


def _read_prompts(path: str) -> list[str | dict]:
    """One prompt per line, or JSONL lines of {"prompt": ...} / {"prompt_token_ids": [...]} / a JSON string."""
    import json

    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith(("{", '"')):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CLIError(f"{path}:{number}: invalid JSON ({e.msg})") from None
                if not isinstance(item, (str, dict)):
                    raise CLIError(f"{path}:{number}: expected a string or an object with prompt / prompt_token_ids")
                prompts.append(item)
            else:
                prompts.append(line)
    if not prompts:
        raise CLIError(f"{path}: no prompts")
    return prompts


def _sampling_params(args: argparse.Namespace):
    from jpaged import SamplingParams

    return SamplingParams(
        n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, seed=args.sampling_seed, max_tokens=args.max_tokens,
        min_tokens=args.min_tokens, stop=tuple(args.stop or ()), stop_token_ids=tuple(args.stop_token_id or ()),
        ignore_eos=args.ignore_eos,
    )


def _cmd_generate(args: argparse.Namespace) -> None:
    from jpaged import LLM

    params = _sampling_params(args)  # bad values fail before the model loads
    prompts = args.prompt or (_read_prompts(args.prompts_file) if args.prompts_file else DEMO_PROMPTS)
    chat = args.chat or not (args.prompt or args.prompts_file)  # the demo prompts are questions for the instruct model
    start = time.perf_counter()
    llm = LLM(args.model, **_engine_kwargs(args))
    print(f"loaded {llm.model_dir.name} in {time.perf_counter() - start:.1f}s "
          f"(warm-up {llm.get_stats()['warmup_seconds']:.1f}s)", file=sys.stderr)

    def as_input(p):
        if not chat:
            return p
        text = p if isinstance(p, str) else p.get("prompt")
        if text is None:
            raise CLIError("--chat needs text prompts")
        return {"prompt": text, "prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": text}])}

    inputs = [as_input(p) for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=not args.no_progress)
    elapsed = time.perf_counter() - start
    num_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    num_in = sum(len(o.prompt_token_ids) for o in outputs)
    for out in outputs:
        print(f"\n>>> {out.prompt if out.prompt is not None else out.prompt_token_ids}")
        for c in out.outputs:
            print(f"{c.text.strip()}\n[{len(c.token_ids)} tokens, {c.finish_reason}]")
    stats = llm.get_stats()
    print(f"\n{len(outputs)} requests, {num_in} prompt + {num_out} output tokens in {elapsed:.2f}s: "
          f"{len(outputs) / elapsed:.2f} requests/s, {num_out / elapsed:.1f} output tokens/s "
          f"(padding efficiency {stats['padding_efficiency']:.2f}, prefix-cache hits {stats['prefix_cache_hits']} tokens, "
          f"{stats['num_preemptions']} preemptions)")


def _cmd_serve(args: argparse.Namespace) -> None:
    from jpaged import EngineConfig, parallel
    from serve import ServerSettings, run_server

    settings = ServerSettings(  # bad values fail before the model loads
        engine=EngineConfig(model=args.model, **_engine_kwargs(args)), host=args.host, port=args.port,
        api_key=args.api_key, served_model_name=args.served_model_name,
        max_queued_requests=args.max_queued_requests, max_n=args.max_n, max_logprobs=args.max_logprobs,
        max_body_bytes=args.max_body_bytes, tool_call_parser=args.tool_call_parser,
        drain_timeout_s=args.drain_timeout, log_interval_s=args.log_interval,
    )
    group = parallel.DistributedConfig.resolve(args.distributed_coordinator, args.num_processes, args.process_id,
                                               heartbeat_timeout_s=args.distributed_heartbeat_timeout)
    parallel.initialize(group)
    if group.process_id != 0:  # a worker: the same engine, its steps sent by process 0
        from jpaged import LLMEngine

        engine = LLMEngine(settings.engine)
        logging.getLogger("jpaged").info("process %d: worker ready", group.process_id)
        try:
            engine.run_worker()
        except Exception as e:  # noqa: BLE001 - another process is gone: so is the group
            _exit_group(f"jpaged serve: error: process {group.process_id}: {e}")
        return
    status = run_server(settings)
    if status and group.enabled:
        _exit_group("jpaged serve: the engine died; the group exits for a restart")
    if status:
        raise SystemExit(status)


def _exit_group(message: str) -> None:
    """Exits 1 at once: a normal exit would wait in jax.distributed's shutdown barrier for a
    process that is gone, until the heartbeat timeout aborts it."""
    import os

    print(message, file=sys.stderr)
    logging.shutdown()
    os._exit(1)


def _cmd_cache(args: argparse.Namespace) -> None:
    from jpaged import cache
    from jpaged.model_files import jpaged_home

    if args.action == "info":
        print(cache.format_info(cache.info(), jpaged_home()))
    else:
        removed = cache.clear(args.kind or None)
        print(f"removed {', '.join(removed) or 'nothing'} from {jpaged_home()}")


# jpaged bench KIND -> the benchmarks module whose main(argv) runs it
BENCHMARKS = {"throughput": "benchmarks.throughput", "serve": "benchmarks.serve_bench", "sweep": "benchmarks.sweep",
              "startup": "benchmarks.startup", "quantized": "benchmarks.quantized_throughput"}


def _cmd_bench(args: argparse.Namespace) -> None:
    import importlib

    status = importlib.import_module(BENCHMARKS[args.kind]).main(args.args)
    if status:
        raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jpaged", description="LLM inference on JAX with a paged KV cache")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an HF folder or a GGUF file into a jpaged checkpoint")
    p.add_argument("src", help="HF model folder (config.json, *.safetensors, tokenizer) or a .gguf file")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the source's dtype")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                   help="auto: keep a GGUF's 4/8-bit blocks packed, float as float; none: float; int8 (symmetric, "
                        "groups of 32), int4 (asymmetric, groups of 32), int4-g128: round a float source to nearest")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("generate", help="generate completions (default: a demo batch of chat prompts)")
    _add_engine_args(p, warmup="lazy")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a demo batch")
    p.add_argument("--prompts-file", help="prompts, one per line, or JSONL with prompt / prompt_token_ids")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("-n", "--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", action="append", type=int, help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)")
    _add_engine_args(p, warmup="full")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: --model, or the default model's name)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="sequences that may wait for a place in the batch; beyond that, 429")
    p.add_argument("--max-n", type=int, default=8, help="largest n (completions per prompt) of a request")
    p.add_argument("--tool-call-parser", default="hermes", choices=("hermes", "llama3_json"),
                   help="how tool calls are read from a reply under tool_choice 'auto'")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="most log-probability alternatives a request may ask for (0..20)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--log-interval", type=float, default=5.0, help="seconds between status lines while busy")
    g = p.add_argument_group("several hosts (jax.distributed; each also read from its JPAGED_* variable)")
    g.add_argument("--distributed-coordinator", metavar="HOST:PORT", default=None,
                   help="process 0's address for the group to meet at ($JPAGED_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="processes in the group, one per host ($JPAGED_NUM_PROCESSES; default 1)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process's rank; 0 serves HTTP, the others run its steps ($JPAGED_PROCESS_ID)")
    g.add_argument("--distributed-heartbeat-timeout", type=int, default=10, metavar="SECONDS",
                   help="a process silent this long is dead and the group exits (default 10)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("cache", help="show (info) or empty (clear) the caches under $JPAGED_HOME")
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--kind", action="append", help="with clear: only this kind (repeatable; see `jpaged cache info`)")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("bench", help="benchmarks: throughput (offline), serve (online, any OpenAI URL), "
                                     "sweep (vs HF), startup, quantized (float32 vs packed weights, side by side)")
    p.add_argument("kind", choices=list(BENCHMARKS), help="which benchmark; `jpaged bench KIND --help` for its options")
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save and restore
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU", "no proxy" on every start
    try:
        args.func(args)
    except (CLIError, ValueError, OSError) as e:
        print(f"jpaged {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
