"""What the tensor-parallel tests run in a child process with several (forced) CPU devices.

Why a child process: XLA_FLAGS=--xla_force_host_platform_device_count must be set before jax
starts, and the rest of the suite runs on one device. Forcing 4-8 host devices for the whole
session would change every other test's program key and device count for nothing, and a
measurement on these 2 shared cores was too noisy to show the flag is free (tests/runner:
112-127 s without it, 136 s with it). So each test module starts one child per configuration:

    python -m tests.parallel.tp_job FUNCTION ARGS_JSON OUT_PICKLE    (XLA_FLAGS set by run_job)

The child only measures and reports (tokens, logits, counters, HLO collectives); every
assertion is made by the parent against the N = 1 run of the same child.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"= \S+ (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def run_job(function: str, args: dict, *, num_devices: int, tmp_path: Path, timeout: int = 900):
    """Runs FUNCTION(**args) of this module in a child with `num_devices` host devices; returns its result."""
    out = tmp_path / f"{function}-{os.getpid()}-{len(list(tmp_path.iterdir()))}.pkl"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.parallel.tp_job", function, json.dumps(args), str(out)],
        env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, f"{function} failed:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    return pickle.loads(out.read_bytes())


def gathered_shapes(hlo_text: str) -> list[str]:
    """The result shape of every all-gather in a compiled HLO module, e.g. "f32[8,256]"."""
    return re.findall(r"= (\S+) all-gather(?:-start)?\(", hlo_text)


def collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective a compiled HLO module holds (async pairs counted once)."""
    return dict(Counter(_COLLECTIVE.findall(hlo_text)))


# -- jobs ------------------------------------------------------------------------------------

GREEDY_PROMPT_LENS = (3, 7, 21, 40)  # 21 and 40 exceed the 16-token budget: chunked prefill


def _prompts(vocab: int, lens, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lens]


def _kv_report(runner) -> dict:
    k_pages = runner.kv_caches[0]  # [Y * NP, L, K, H]
    shard = k_pages.addressable_shards[0].data
    return dict(num_pages=int(k_pages.shape[0]), global_shape=tuple(k_pages.shape), shard_shape=tuple(shard.shape),
                bytes_per_device=int(shard.nbytes), num_shards=len(k_pages.addressable_shards),
                devices=len(k_pages.sharding.device_set))


def tiny(model: str, tps: list[int], attn_backend: str = "auto") -> dict:
    """Greedy (prefill, chunked prefill, decode), prefix-hit, seeded-sampling and preemption runs
    of one model at each N, on one engine per N so every run shares its executables."""
    from jpaged import LLM, SamplingParams
    from jpaged.runner.batch import build_batch
    from tests.conftest import make_chunk

    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, top_k=8, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True, logprobs=3)
    results = {}
    for tp in tps:
        # 8 KV blocks of 16 tokens: the greedy prompts fit at once (7 blocks), the long ones
        # below do not (12 blocks) and force preemptions.
        llm = LLM(model, tensor_parallel_size=tp, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
                  num_kv_blocks=9, warmup="full" if tp > 1 else "lazy", attn_backend=attn_backend,
                  linear_backend="xla")
        vocab = llm.engine.model_config.vocab_size
        ps = _prompts(vocab, GREEDY_PROMPT_LENS)
        r = {"tokens": [o.outputs[0].token_ids for o in llm.generate(ps, greedy, use_tqdm=False)]}
        hits = llm.get_stats()["prefix_cache_hits"]
        r["repeat_tokens"] = llm.generate([ps[-1]], greedy, use_tqdm=False)[0].outputs[0].token_ids
        r["prefix_hits"] = llm.get_stats()["prefix_cache_hits"] - hits
        outs = llm.generate(ps[:2], sampled, use_tqdm=False)
        r["sampled_tokens"] = [o.outputs[0].token_ids for o in outs]
        r["sampled_logprobs"] = [o.outputs[0].logprobs for o in outs]
        long_ps = _prompts(vocab, (30, 26, 22, 18), seed=1)
        r["preempt_tokens"] = [o.outputs[0].token_ids for o in llm.generate(
            long_ps, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)]
        stats = llm.get_stats()
        r["num_preemptions"] = stats["num_preemptions"]
        r["compiles_after_warmup"] = stats["num_compiles_after_warmup"]
        runner = llm.engine.runner
        r["kv"] = _kv_report(runner)
        r["num_layers"] = llm.engine.model_config.num_layers
        r["collectives"] = {name: collectives(c.as_text()) for name, c in runner._executables.items()}
        r["gathered_shapes"] = {name: gathered_shapes(c.as_text()) for name, c in runner._executables.items()}
        r["param_specs"] = {".".join(str(getattr(k, "key", k)) for k in path[:-1]): tuple(x.sharding.spec)
                            for path, x in _leaves(runner.state) if tp > 1}
        # Logits of every position of two prompts prefilled together (pages no request holds now).
        pages = runner.spec.page_buckets[-1]
        chunks = [make_chunk(p, 0, np.arange(1 + i * pages, 1 + (i + 1) * pages)) for i, p in enumerate(ps[:2])]
        batch = build_batch(chunks, runner.spec)
        n = sum(len(c.token_ids) for c in chunks)
        r["logits"] = runner.logits(dataclasses.replace(batch, logits_indices=np.arange(n, dtype=np.int32)))
        results[tp] = r
    return results


def tiny_all(models: dict[str, str], tps: list[int], xla_attention: list[str] = ()) -> dict:
    """tiny() of every model in one child, {name: {N: report}}: one interpreter for all, and
    the sampler executables (which depend on no model) compiled once per N. The models named in
    xla_attention run the XLA attention path under shard_map, the others the C++ kernel."""
    return {name: tiny(model, tps, attn_backend="xla" if name in xla_attention else "auto")
            for name, model in models.items()}


def _leaves(state):
    import jax

    return jax.tree_util.tree_flatten_with_path(state)[0]


def default_model(tps: list[int], prompts: list[str], max_tokens: int) -> dict:
    """Greedy tokens of the embedded default model at each N (lazy warm-up: few shapes compile)."""
    from jpaged import LLM, SamplingParams

    results = {}
    for tp in tps:
        llm = LLM(tensor_parallel_size=tp, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256,
                  warmup="lazy", linear_backend="xla")
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            use_tqdm=False)
        results[tp] = {"tokens": [o.outputs[0].token_ids for o in outs], "kv": _kv_report(llm.engine.runner),
                       "kv_capacity_tokens": llm.engine.kv_capacity_tokens}
    return results


def _all_reduce_groups(hlo_text: str) -> list[str]:
    """The replica_groups of every all-reduce, as the HLO text writes them."""
    return [re.search(r"replica_groups=(.*?), (?:use_global|to_apply|channel)", line).group(1)
            for line in hlo_text.splitlines() if re.search(r"= \S+ all-reduce(?:-start)?\(", line)]


def llama8b_step(num_layers: int, tp: int, batch: int = 8) -> dict:
    """The forward step and the sampler of Llama-3-8B's shapes (bfloat16, XLA attention)
    compiled for `tp` host devices from abstract shapes, with the collectives XLA put in."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jpaged.parallel import logits_spec, make_mesh, vocab_parallel_top_k, vocab_parts
    from jpaged.runner.batch import BucketSpec, dummy_batch
    from jpaged.runner.sampler import sample
    from tests.parallel.step_program import llama3_8b, sharded_step

    config = llama3_8b(num_layers)
    mesh = make_mesh(tp)
    step, args = sharded_step(config, mesh, dtype=jnp.bfloat16, backend="xla", seqs=batch)
    forward = step.lower(*args).compile().as_text()
    replicated = NamedSharding(mesh, P())
    sampling = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            dummy_batch(BucketSpec((batch,), batch, (4,), 16, 64, config.vocab_size), batch, batch, 4).sampling)
    logits = jax.ShapeDtypeStruct((batch, config.vocab_size), jnp.float32,
                                  sharding=NamedSharding(mesh, logits_spec(config.vocab_size, tp)))
    sampler = jax.jit(functools.partial(sample, top_k=vocab_parallel_top_k(mesh, config.vocab_size),
                                        vocab_parts=vocab_parts(config.vocab_size, tp)),
                      out_shardings=replicated).lower(logits, sampling).compile().as_text()
    return {"forward": collectives(forward), "forward_gathered": gathered_shapes(forward),
            "forward_groups": _all_reduce_groups(forward), "sample": collectives(sampler),
            "sample_gathered": gathered_shapes(sampler), "vocab_size": config.vocab_size}


def bench(argv: list[str]) -> dict:
    """`jpaged bench throughput ARGV` through the command line; returns its JSON result."""
    from jpaged.cli import main as cli_main

    out = Path(argv[argv.index("--output-json") + 1])
    assert cli_main(["bench", "throughput", *argv]) == 0
    return json.loads(out.read_text())


def main() -> None:
    function, args, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    result = globals()[function](**args)
    out.write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    main()
