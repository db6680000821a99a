"""gpu_run.py's step 3: the model's greedy tokens through the pallas backend equal those of the
xla backend on the same device and the committed CPU goldens (`gpu_goldens.json`), near-ties allowed.

The model. The default model (SmolLM2-135M-Instruct) ships as a 98 MB GGUF in a package the GPU
image lacks, and a device run carries at most 64 MiB of files, so it cannot travel. The check
uses a stand-in that can: the default model's layers (benchmarks/configs/smollm2-135m.json:
9 query / 3 kv heads of 64, D 576, F 1536, vocabulary 49152), 8 of its 30 (each layer is
compiled unrolled, once per step shape and run), with weights drawn by numpy from a fixed seed,
identical on every machine, written as an HF folder and converted as a user's checkpoint would
be. Random weights at the usual 0.02 scale give flat logits (every step a near-tie); these are
drawn at unit gain (std 1/sqrt(fan_in)), and the LM head, untied (a tied one makes the last
token its own best successor: the output repeats one token), at std LOGIT_STD/sqrt(D), so the
logits spread ~LOGIT_STD. `--dry-run` uses a 2-layer miniature of the same layout.

The comparison. Greedy tokens of a few prompts (lengths straddling pages, prefill chunked by a
small token budget, so steps mix prefill and decode), each run in float32 (matmuls at
"highest" precision: TF32 would move logits by ~1e-3 relative) and in bfloat16 (as served),
with the pallas and the xla attention. Two runs agree on a sequence when their tokens are equal,
or equal up to a step where they pick different tokens that the reference scores within
NEAR_TIE[dtype] of each other (log-probabilities); nothing after such a step is compared.

    python -m benchmarks.gpu_model_check --make-goldens           # on a CPU: rewrite gpu_goldens.json
    python -m benchmarks.gpu_model_check --out model.json [--dry-run]
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

from benchmarks.throughput import CONFIGS, device_info

GOLDENS = pathlib.Path(__file__).parent / "gpu_goldens.json"
LOGIT_STD = 10.0
NEAR_TIE = {"float32": 0.05, "bfloat16": 1.0}  # log-probability gap a precision may flip
TOP_LOGPROBS = 5

# The stand-ins: an HF config, prompt lengths, tokens per prompt and the engine's token budget.
# The GPU plan's budget chunks the prompts over three steps that mix prefill and decode; the
# dry run's prefills in one step and runs float32 only (fewer programs to compile on a CPU).
_SMOLLM2 = json.loads((CONFIGS / "smollm2-135m.json").read_text()) | dict(tie_word_embeddings=False)
PLANS = {
    "gpu": dict(config=_SMOLLM2 | dict(num_hidden_layers=8),
                prompt_lens=[5, 15, 16, 17, 40, 64, 130, 250], max_tokens=24, budget=256, seed=17,
                dtypes=["float32", "bfloat16"]),
    "dry-run": dict(config=_SMOLLM2 | dict(vocab_size=512, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=6, num_key_value_heads=2),
                    prompt_lens=[5, 16, 17, 40], max_tokens=6, budget=128, seed=17, dtypes=["float32"]),
}


def write_standin(plan: dict, folder: pathlib.Path) -> pathlib.Path:
    """The stand-in as an HF folder (config.json + model.safetensors), from numpy's PCG64 alone."""
    from safetensors.numpy import save_file

    cfg = plan["config"]
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    h = d // n
    rng = np.random.default_rng(plan["seed"])

    def linear(out_dim: int, in_dim: int) -> np.ndarray:  # HF layout [out, in], unit gain
        return rng.standard_normal((out_dim, in_dim), dtype=np.float32) / np.float32(np.sqrt(in_dim))

    tensors = {"model.embed_tokens.weight": rng.standard_normal((v, d), dtype=np.float32),
               "lm_head.weight": rng.standard_normal((v, d), dtype=np.float32) * np.float32(LOGIT_STD / np.sqrt(d)),
               "model.norm.weight": np.ones(d, np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": np.ones(d, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                    p + "self_attn.q_proj.weight": linear(n * h, d), p + "self_attn.k_proj.weight": linear(k * h, d),
                    p + "self_attn.v_proj.weight": linear(k * h, d), p + "self_attn.o_proj.weight": linear(d, n * h),
                    p + "mlp.gate_proj.weight": linear(f, d), p + "mlp.up_proj.weight": linear(f, d),
                    p + "mlp.down_proj.weight": linear(d, f)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def prompts_of(plan: dict) -> list[list[int]]:
    rng = np.random.default_rng(plan["seed"] + 1)
    return [rng.integers(3, plan["config"]["vocab_size"], size=n).tolist() for n in plan["prompt_lens"]]


def greedy(folder: pathlib.Path, plan: dict, *, dtype: str, attn_backend: str) -> dict:
    """Greedy tokens and their top log-probabilities for every prompt of the plan, in one batch."""
    import jax

    from jpaged import LLM, SamplingParams

    prompts = prompts_of(plan)
    max_len = max(plan["prompt_lens"]) + plan["max_tokens"]
    # float32 at full precision (TF32 otherwise, on a GPU); bfloat16 as served.
    jax.config.update("jax_default_matmul_precision", "highest" if dtype == "float32" else None)
    start = time.perf_counter()
    llm = LLM(str(folder), dtype=dtype, attn_backend=attn_backend, linear_backend="xla",
              max_num_seqs=len(prompts), max_num_batched_tokens=plan["budget"], max_model_len=max_len,
              num_kv_blocks=len(prompts) * -(-max_len // 16) + 1)
    params = SamplingParams(temperature=0.0, max_tokens=plan["max_tokens"], ignore_eos=True, logprobs=TOP_LOGPROBS)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    del llm
    gc.collect()
    jax.config.update("jax_default_matmul_precision", None)
    return dict(dtype=dtype, attn_backend=attn_backend, seconds=seconds,
                tokens=[o.outputs[0].token_ids for o in outs],
                logprobs=[[{str(t): lp for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs])


def compare(run: dict, ref: dict, tolerance: float) -> dict:
    """Sequence by sequence: 'equal', 'near-tie' (differs first where ref's two candidates are within
    tolerance) or 'mismatch'; with the step of the first difference."""
    rows = []
    for seq, (toks, ref_toks) in enumerate(zip(run["tokens"], ref["tokens"])):
        step = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), None)
        if step is None and len(toks) == len(ref_toks):
            rows.append(dict(seq=seq, verdict="equal", first_diff=None))
            continue
        step = min(len(toks), len(ref_toks)) if step is None else step
        ref_lp = ref["logprobs"][seq][step] if step < len(ref_toks) else {}
        mine, theirs = str(toks[step]) if step < len(toks) else None, str(ref_toks[step]) if step < len(ref_toks) else None
        # A token outside ref's top list is no near-tie (its gap is unknown, at least the list's span).
        gap = ref_lp[theirs] - ref_lp[mine] if mine in ref_lp and theirs in ref_lp else float("inf")
        rows.append(dict(seq=seq, verdict="near-tie" if gap <= tolerance else "mismatch", first_diff=step, gap=gap))
    return dict(ok=all(r["verdict"] != "mismatch" for r in rows), tolerance=tolerance, sequences=rows,
                num_equal=sum(r["verdict"] == "equal" for r in rows),
                num_near_tie=sum(r["verdict"] == "near-tie" for r in rows))


def make_goldens() -> None:
    """On a CPU, float32, the xla backends: every plan's tokens, into gpu_goldens.json."""
    goldens = dict(meta=device_info() | dict(how="python -m benchmarks.gpu_model_check --make-goldens"))
    for name, plan in PLANS.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_standin(plan, pathlib.Path(tmp) / "hf")
            run = greedy(folder, plan, dtype="float32", attn_backend="xla")
        goldens[name] = dict(tokens=run["tokens"], logprobs=run["logprobs"])
        print(f"{name}: {run['seconds']:.1f}s, first tokens {[t[:4] for t in run['tokens']]}", flush=True)
    GOLDENS.write_text(json.dumps(goldens, indent=None, separators=(",", ":")) + "\n")


def run_check(out: pathlib.Path, *, dry_run: bool) -> dict:
    """Every (dtype, backend) run against the goldens and pallas against xla; out rewritten after each."""
    name = "dry-run" if dry_run else "gpu"
    plan = PLANS[name]
    golden = json.loads(GOLDENS.read_text())[name]
    result = dict(meta=device_info(), plan=name, model="stand-in of SmolLM2-135M's shape (see gpu_model_check.py)",
                  num_layers=plan["config"]["num_hidden_layers"], prompt_lens=plan["prompt_lens"],
                  max_tokens=plan["max_tokens"], runs=[], checks=[])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = write_standin(plan, pathlib.Path(tmp) / "hf")
        result["weights_seconds"] = time.perf_counter() - start
        for dtype in plan["dtypes"]:
            runs = {}
            for backend in ("pallas", "xla"):
                runs[backend] = greedy(folder, plan, dtype=dtype, attn_backend=backend)
                result["runs"].append({k: v for k, v in runs[backend].items() if k != "logprobs"})
                check = compare(runs[backend], golden, NEAR_TIE[dtype]) | dict(run=f"{dtype} {backend}", ref="CPU goldens")
                result["checks"].append(check)
                print(_line(check), flush=True)
                out.write_text(json.dumps(result, indent=1))
            check = compare(runs["pallas"], runs["xla"], NEAR_TIE[dtype]) | dict(run=f"{dtype} pallas", ref=f"{dtype} xla")
            result["checks"].append(check)
            print(_line(check), flush=True)
            out.write_text(json.dumps(result, indent=1))
    result["ok"] = all(c["ok"] for c in result["checks"])
    out.write_text(json.dumps(result, indent=1))
    return result


def _line(check: dict) -> str:
    n = len(check["sequences"])
    firsts = [r["first_diff"] for r in check["sequences"] if r["first_diff"] is not None]
    return (f"{check['run']:18s} vs {check['ref']:14s}: {'ok  ' if check['ok'] else 'FAIL'} {check['num_equal']}/{n} equal, "
            f"{check['num_near_tie']} near-tie" + (f" (first differences at steps {firsts})" if firsts else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--dry-run", action="store_true", help="the 2-layer miniature")
    p.add_argument("--make-goldens", action="store_true", help="recompute gpu_goldens.json (on a CPU)")
    args = p.parse_args(argv)
    if args.make_goldens:
        make_goldens()
        return 0
    if args.out is None:
        p.error("--out is required")
    return 0 if run_check(args.out, dry_run=args.dry_run)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
