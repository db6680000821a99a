"""One start-up measurement: a fresh process that runs a one-prompt job and says when each phase ended.

    python -m benchmarks.startup_job --backend jpaged --max-tokens 16 [--warmup lazy|full] [--max-model-len N]
    python -m benchmarks.startup_job --backend hf --max-tokens 16

benchmarks/startup.py spawns it (cold and warm, side by side with HF); run by hand it is one row.
The job: the prompt (a chat message in the model's template, or --prompt-token-ids), greedy,
exactly --max-tokens new tokens (EOS ignored), then exit.

Clocks: `time.time()` everywhere, so the parent's spawn time (STARTUP_SPAWN_TIME in the
environment) and its exit time share one clock with this process. Phases, in seconds:

    jpaged  interpreter | imports | resolve_model kernels load_weights build_model compile engine_other
            | first_token | decode | exit
    hf      interpreter | imports | load | first_token | decode | exit

interpreter runs from the parent's spawn to this file's first line (Python itself and the
`-m` machinery); the engine's pieces come from `llm.engine.startup_seconds` (None where the
engine does not report one) and engine_other is the rest of the LLM(...) call; first_token
runs from a ready engine to the first generated token (chat template, prefill, and with
--warmup lazy the compiles it needs); exit is measured by the parent. The one line of stdout
that starts with STARTUP_JSON is the result; everything else is log.
"""

import time

T_FIRST_LINE = time.time()  # before any other import: the interpreter's start-up ends here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

SPAWN_ENV = "STARTUP_SPAWN_TIME"
RESULT_PREFIX = "STARTUP_JSON "
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
# jpaged engine options the parent forwards when given: (flag, argparse keywords); None = the engine's default
ENGINE_OPTIONS = [
    ("--warmup", dict(choices=["lazy", "full"], help="jpaged's warm-up; default the engine's")),
    ("--max-model-len", dict(type=int)),
    ("--max-num-seqs", dict(type=int)),
    ("--max-num-batched-tokens", dict(type=int)),
    ("--attn-backend", dict(help="jpaged: auto | cpu | xla | pallas")),
    ("--linear-backend", dict(help="jpaged: auto | cpu | xla")),
]


def add_engine_options(p: argparse.ArgumentParser) -> None:
    for flag, kwargs in ENGINE_OPTIONS:
        p.add_argument(flag, default=None, **kwargs)


def engine_option_names() -> list[str]:
    return [flag[2:].replace("-", "_") for flag, _ in ENGINE_OPTIONS]


# The engine's start-up phases, in the order they run (llm.engine.startup_seconds keys).
ENGINE_PHASES = ("resolve_model", "kernels", "load_weights", "build_model", "compile")
JPAGED_PHASES = ("interpreter", "imports", *ENGINE_PHASES, "engine_other", "first_token", "decode", "exit")
HF_PHASES = ("interpreter", "imports", "load", "first_token", "decode", "exit")
COUNTERS = ("num_traces", "num_compiles", "num_executables_loaded")


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def run_jpaged(args: argparse.Namespace, marks: dict[str, float]) -> dict:
    import jpaged
    from jpaged import SamplingParams

    marks["imports"] = time.time()
    opts = {name: getattr(args, name) for name in [*engine_option_names(), "dtype"] if getattr(args, name) is not None}
    llm = jpaged.LLM(args.model, **opts)
    marks["engine"] = time.time()
    engine = llm.engine
    prompt_ids = args.prompt_token_ids or llm.apply_chat_template(_messages(args.prompt))
    engine.add_request("0", {"prompt_token_ids": prompt_ids},
                       SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
    final = None
    while engine.has_unfinished():
        for out in engine.step():  # cumulative outputs: the first with a token is the first token
            if "first_token" not in marks and out.outputs[0].token_ids:
                marks["first_token"] = time.time()
            final = out
    marks["decode"] = time.time()

    startup = dict(getattr(engine, "startup_seconds", None) or {})
    if "compile" not in startup and hasattr(engine, "warmup_seconds"):
        startup["compile"] = engine.warmup_seconds  # engines from before startup_seconds
    if hasattr(engine.runner, "wait_for_loads"):
        engine.runner.wait_for_loads()  # full warm-up loads stored executables on a thread
    stats = llm.get_stats()
    counters = {k: stats.get(k, getattr(engine.runner, k, None)) for k in COUNTERS}
    construction = marks["engine"] - marks["imports"]
    phases = {p: startup.get(p) for p in ENGINE_PHASES}
    phases["engine_other"] = construction - sum(v for v in phases.values() if v is not None)
    return dict(phases=phases, counters=counters, prompt_token_ids=list(prompt_ids),
                token_ids=list(final.outputs[0].token_ids), text=final.outputs[0].text,
                engine_startup_seconds=startup, model_dir=str(llm.model_dir))


def _hf_source(model: str | None) -> pathlib.Path:
    from benchmarks.hf_baseline import default_gguf

    source = model or default_gguf()
    if source is None:
        raise ValueError("the default model is not installed; pass --model (an HF folder or .gguf file)")
    source = pathlib.Path(source)
    if (source / "jpaged_manifest.json").is_file():
        raise ValueError(f"{source} is a jpaged checkpoint; the HF backend needs an HF folder or a .gguf")
    return source


def _hf_tokenizer(source: pathlib.Path):
    from transformers import AutoTokenizer

    if source.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return AutoTokenizer.from_pretrained(str(source))


def run_hf(args: argparse.Namespace, marks: dict[str, float]) -> dict:
    import torch
    import transformers  # noqa: F401  (the import is what is timed)

    from benchmarks.hf_baseline import _first_token_clock, load_hf_model

    marks["imports"] = time.time()
    source = _hf_source(args.model)
    model = load_hf_model(source, "float32" if args.dtype in (None, "auto") else args.dtype)
    tokenizer = None if args.prompt_token_ids else _hf_tokenizer(source)
    marks["engine"] = time.time()
    if args.prompt_token_ids:
        prompt_ids = list(args.prompt_token_ids)
    else:  # as jpaged's LLM.apply_chat_template does it
        text = tokenizer.apply_chat_template(_messages(args.prompt), tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    clock = _first_token_clock()  # perf_counter; moved onto time.time() below
    offset = time.time() - time.perf_counter()
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0,
                             stopping_criteria=[clock])
    marks["decode"] = time.time()
    marks["first_token"] = clock.time + offset
    token_ids = out[0, len(prompt_ids):].tolist()
    text = tokenizer.decode(token_ids, skip_special_tokens=True) if tokenizer is not None else ""
    return dict(phases=dict(load=marks["engine"] - marks["imports"]), counters={},
                prompt_token_ids=prompt_ids, token_ids=token_ids, text=text, torch_threads=torch.get_num_threads())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup_job", description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=["jpaged", "hf"])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct (HF: its GGUF)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=DEFAULT_PROMPT, help="one user message, in the model's chat template")
    prompt.add_argument("--prompt-token-ids", default=None, type=lambda s: [int(t) for t in s.split(",")],
                        help="comma-separated token ids instead (models without a tokenizer)")
    p.add_argument("--max-tokens", type=int, default=16)
    add_engine_options(p)
    p.add_argument("--dtype", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    spawn = float(os.environ.get(SPAWN_ENV, T_FIRST_LINE))  # run by hand: no interpreter phase
    marks = {"spawn": spawn, "first_line": T_FIRST_LINE}
    res = (run_jpaged if args.backend == "jpaged" else run_hf)(args, marks)
    phases = dict(interpreter=T_FIRST_LINE - spawn, imports=marks["imports"] - T_FIRST_LINE, **res.pop("phases"),
                  first_token=marks["first_token"] - marks["engine"], decode=marks["decode"] - marks["first_token"])
    marks["end"] = time.time()
    res.update(backend=args.backend, phases=phases, marks=marks, pid=os.getpid(),
               seconds_to_first_token=marks["first_token"] - spawn)
    print(RESULT_PREFIX + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
