"""LLMEngine: requests in, RequestOutputs out, one scheduled step at a time.

    add_request -> Scheduler (KV manager) -> build_batch -> ModelRunner (model + sampler)
                -> Scheduler.update_from_output -> detokenizer / stop strings -> RequestOutput
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from jpaged import parallel
from jpaged.config import EngineConfig
from jpaged.core.request import Request, RequestStatus
from jpaged.core.scheduler import Scheduler, SchedulerConfig
from jpaged.engine.detokenizer import IncrementalDetokenizer
from jpaged.engine.request_checks import check_token_ids, device_seed
from jpaged.engine.model_loading import (
    StartupClock, bucket_spec, executable_store, kv_size_needs_weights, load_model, max_model_len,
    model_config_file, num_kv_pages, resolve_model_folder, runtime_dtype, sampler_store,
)
from jpaged.engine.step_bitmask import StepBitmask
from jpaged.engine.tracked import TrackedCompletion, TrackedRequest
from jpaged.models.attention import alloc_kv_pools
from jpaged.models.backends import resolve_backend, resolve_linear_backend
from jpaged.models.config import ModelConfig
from jpaged.models.params import build_model
from jpaged.quantization import describe, weight_bytes
from jpaged.outputs import RequestOutput, RequestOutputKind
from jpaged.parallel.step_channel import Op, StepChannel, run_worker
from jpaged.runner.batch import build_batch
from jpaged.runner.model_runner import ModelRunner
from jpaged.runner.prompt_logprobs import PromptLogprobs
from jpaged.runner.prompt_logprobs import entries as prompt_entries
from jpaged.sampling_params import SamplingParams
from jpaged.structured import GrammarBackend, bitmask_row, make_backend
from pallas_kernels import cpu_build

logger = logging.getLogger("jpaged")

PromptType = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        start = time.perf_counter()
        phases = StartupClock()
        if {config.attn_backend, config.linear_backend} & {"auto", "cpu"}:
            cpu_build.build_in_background()  # g++ on the other core while the model converts / loads
        with phases("resolve_model"):  # a first use converts the model here
            folder = resolve_model_folder(config)
        with ThreadPoolExecutor(1, thread_name_prefix="jpaged-kv") as pool:
            kv_pools = self._zero_kv_pools_early(config, folder, pool)
            with phases("load_weights"):
                loaded = load_model(config, folder)
            self.model_config, self.tokenizer, self.model_dir = loaded.config, loaded.tokenizer, loaded.folder
            # As loaded (the checkpoint's tensors): what a decode step streams, packed or float.
            self.weight_bytes = weight_bytes(jax.tree.leaves(loaded.params))
            self.weight_format = describe(loaded.quant)
            self.max_model_len = max_model_len(config, loaded.config)
            with phases("kernels"):  # the CPU kernels are built (once per machine) and measured here
                backend = resolve_backend(config.attn_backend, loaded.dtype)
                linear = resolve_linear_backend(config.linear_backend, loaded.dtype,
                                                tensor_parallel_size=config.tensor_parallel_size,
                                                packed=bool(loaded.quant))
            self.attn_backend, self.linear_backend = backend, linear
            # run_config: KV heads repeated up to the device count (jpaged.parallel), if needed.
            num_pages = kv_pools and kv_pools[0]
            if parallel.is_multiprocess():  # one global pool: every process must size it alike
                num_pages = parallel.agree_min(num_kv_pages(config, loaded.run_config, self.max_model_len,
                                                            loaded.dtype))
            spec = bucket_spec(config, loaded.run_config, self.max_model_len, loaded.dtype, attn_backend=backend,
                               num_pages=num_pages)
            with phases("build_model"):
                model = build_model(loaded.run_config, loaded.params, backend=backend, linear=linear,
                                    dtype=loaded.dtype, mesh=loaded.mesh, quant=loaded.quant)
                self.runner = ModelRunner(model, spec, kv_dtype=loaded.dtype, mesh=loaded.mesh,
                                          kv_caches=kv_pools and kv_pools[1].result())
            self.runner.store = executable_store(config, loaded, spec, self.runner, backend=backend, linear=linear)
            self.runner.sampler_store = sampler_store(loaded, self.runner)
            if parallel.is_multiprocess():
                self.runner.channel = StepChannel(spec)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=min(config.max_num_seqs, spec.max_num_seqs_bucket),
            max_num_batched_tokens=spec.token_buckets[-1],
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            num_blocks=spec.num_pages,
            enable_prefix_caching=config.enable_prefix_caching,
        ))
        self.load_seconds = time.perf_counter() - start
        with phases("compile"):
            # full: every shape now, so nothing compiles once the engine is ready; lazy: each
            # shape when a step first needs it.
            shapes = spec.shapes() if config.warmup == "full" else []
            self.runner.prepare(shapes, defer_loads=True)
        self.warmup_seconds = phases.seconds["compile"]
        self.startup_seconds = phases.seconds
        self._compiles_at_warmup = self.runner.num_compiles
        self.kv_capacity_tokens = (spec.num_pages - 1) * config.block_size
        runner = self.runner
        if loaded.mesh is not None:
            logger.info("%s", parallel.describe(loaded.mesh, runner.state, runner.kv_caches, loaded.config,
                                                loaded.run_config, self.kv_capacity_tokens))
        logger.info(
            "loaded %s (%s, %.1fM params, %s, weights %s: %.1f MiB, attention %s, linear %s) in %.1fs; "
            "KV cache: %d blocks = %d tokens; "
            "warm-up %s: %d of %d shapes ready in %.1fs (%d executables loaded, %d compiled, %d traced, "
            "%d stored ones loading in the background)",
            self.model_dir.name, self.model_config.architecture, self.model_config.num_params() / 1e6,
            loaded.dtype.name, self.weight_format, self.weight_bytes / 2**20, backend, linear, self.load_seconds, spec.num_pages - 1, self.kv_capacity_tokens,
            config.warmup, len(shapes), len(spec.shapes()), self.warmup_seconds, runner.num_executables_loaded,
            runner.num_compiles, runner.num_traces, runner.num_deferred_loads,
        )
        self.eos_token_ids = self._eos_token_ids()
        self._rng = np.random.default_rng(config.seed)
        self._tracked: dict[str, TrackedRequest] = {}
        self._owner: dict[str, tuple[TrackedRequest, TrackedCompletion]] = {}  # by scheduler request id
        self._num_real_tokens = 0
        self._num_padded_tokens = 0
        self._grammars: GrammarBackend | None = None  # made on the first constrained request

    def grammar_backend(self) -> GrammarBackend:
        """The structured-output engine for this model's tokenizer (built once, ~0.3 s)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer; this model has none")
            self._grammars = make_backend(self.tokenizer, self.model_config.vocab_size)
        return self._grammars

    @staticmethod
    def _zero_kv_pools_early(config: EngineConfig, folder, pool: ThreadPoolExecutor):
        """(pages, future of the zeroed pools) when the pool's size is known before the weights
        load, else None. Zeroing a host pool is page faults (~2 s for 1.5 GB), on another core
        while the weights and tokenizer load; an accelerator zeroes its pool in milliseconds,
        once the weights show what memory is left."""
        if kv_size_needs_weights(config) or config.tensor_parallel_size > 1:  # a mesh's pools: the runner's
            return None
        model_config = ModelConfig.from_file(model_config_file(config, folder))
        dtype = runtime_dtype(config.dtype)
        spec = bucket_spec(config, model_config, max_model_len(config, model_config), dtype)  # fails fast
        shape = (model_config.num_layers, spec.num_pages, spec.page_size, model_config.num_kv_heads,
                 model_config.head_dim, dtype)
        return spec.num_pages, pool.submit(alloc_kv_pools, *shape)

    def _eos_token_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        gen_config = self.model_dir / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # -- requests -------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt given as text, token ids or a dict of either."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(f"a prompt must be a str, a list of token ids or a dict with prompt_token_ids, got {prompt!r:.80}")

    def add_request(
        self, req_id: str, prompt: PromptType, params: SamplingParams | None = None, *, priority: int = 0,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> None:
        """Queues a request; raises ValueError (nothing queued) if it is invalid or can never fit.

        output_kind says what step() returns for it: cumulative outputs, deltas, or only the final one.
        """
        params = params or SamplingParams()
        if req_id in self._tracked:
            raise ValueError(f"request id {req_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        check_token_ids(ids, params, self.model_config.vocab_size)
        self.scheduler.check_fits(len(ids), params.max_tokens)
        constraint = params.structured_outputs
        if constraint is not None:
            self.grammar_backend().matcher(constraint.key)  # compiles now: a bad grammar fails here, not mid-step
        arrival = time.monotonic()
        wants_prompt = params.prompt_logprobs is not None
        tracked = TrackedRequest(req_id, text, ids, params, [], output_kind,
                                 prompt_logprobs=[None] * len(ids) if wants_prompt else None,
                                 prompt_token_ranks=[None] * len(ids) if wants_prompt else None)
        if params.allowed_token_ids is not None:
            tracked.allowed_mask = bitmask_row(params.allowed_token_ids, self.model_config.vocab_size)
        for i in range(params.n):
            seed = self._child_seed(params.seed, i)
            sched_id = req_id if params.n == 1 else f"{req_id}#{i}"
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                                               stop=params.stop, include_stop=params.include_stop_str_in_output)
            completion = TrackedCompletion(
                i, sched_id, detok, logprobs=[] if params.logprobs is not None else None,
                matcher=None if constraint is None else self._grammars.matcher(constraint.key))
            tracked.completions.append(completion)
            # Siblings arrive together; the later ones find the first one's prompt blocks in the prefix cache.
            self.scheduler.add_request(Request(sched_id, ids, params, seed, priority=priority, arrival_time=arrival))
            self._owner[sched_id] = (tracked, completion)
        self._tracked[req_id] = tracked

    def _child_seed(self, seed: int | None, index: int) -> int:
        if seed is None:
            return int(self._rng.integers(2**31))
        seed = device_seed(seed)
        return seed if index == 0 else hash((seed, index)) & 0x7FFFFFFF

    def abort(self, req_id: str) -> None:
        """Ends a request now; its KV blocks are freed at once."""
        tracked = self._tracked.pop(req_id, None)
        if tracked is None:
            return
        for c in tracked.completions:
            self.scheduler.finish(c.sched_id, RequestStatus.FINISHED_ABORTED)
            self._owner.pop(c.sched_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns the outputs of requests that advanced, each of its
        request's output kind (a FINAL_ONLY request appears only when it has finished)."""
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        batch = build_batch(plan.chunks, self.runner.spec)
        result, prompt_result = self.runner.step(batch, self._bitmask_filler(plan))
        if prompt_result is not None:
            self._store_prompt_logprobs(plan.chunks, batch.prompt_targets, prompt_result)
        self._num_real_tokens += plan.num_tokens
        self._num_padded_tokens += len(batch.token_ids)
        for chunk in plan.chunks:  # before update_from_output, which forgets finished requests
            if chunk.samples and chunk.sample_index == 0 and chunk.req_id in self._owner:
                tracked, completion = self._owner[chunk.req_id]
                if completion.index == 0:
                    tracked.num_cached_tokens = self.scheduler.requests[chunk.req_id].num_cached_tokens
        finished = {f.req_id: f.status for f in self.scheduler.update_from_output(
            plan, result.token_ids[: len(plan.chunks)], self.eos_token_ids)}

        advanced: dict[str, TrackedRequest] = {}
        for row, chunk in enumerate(plan.chunks):
            if not chunk.samples:
                continue
            tracked, completion = self._owner[chunk.req_id]
            token = int(result.token_ids[row])
            completion.token_ids.append(token)
            status = finished.get(chunk.req_id)
            if completion.matcher is not None:
                status = self._advance_matcher(chunk.req_id, completion, token, status)
            if completion.logprobs is not None:
                k = tracked.params.logprobs
                entry = {token: float(result.logprobs[row])}
                entry.update(zip(result.top_ids[row, :k].tolist(), result.top_logprobs[row, :k].tolist()))
                completion.logprobs.append(entry)
            if completion.detokenizer is not None:
                completion.detokenizer.append(token)
                if completion.detokenizer.stopped and status is None:
                    status = RequestStatus.FINISHED_STOPPED
                    self.scheduler.finish(chunk.req_id, status)
            if status is not None:
                completion.finish_reason = status.value
                self._owner.pop(chunk.req_id, None)
            advanced[tracked.req_id] = tracked

        outputs = []
        for tracked in advanced.values():
            if tracked.finished:
                del self._tracked[tracked.req_id]
            elif tracked.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(tracked.output())
        return outputs

    def _bitmask_filler(self, plan):
        """The step's bitmask filler (ModelRunner.step), or None when no row that samples is constrained
        (by a grammar or allowed_token_ids)."""
        grammar_rows, allowed_rows = [], []
        for row, chunk in enumerate(plan.chunks):
            if not chunk.samples or (owner := self._owner.get(chunk.req_id)) is None:
                continue
            tracked, completion = owner
            if completion.matcher is not None:
                grammar_rows.append((completion.matcher, row))
            if tracked.allowed_mask is not None:
                allowed_rows.append((chunk.req_id, row, tracked.allowed_mask))
        if not (grammar_rows or allowed_rows):
            return None
        return StepBitmask(grammar_rows, allowed_rows, self._grammars).fill

    def _advance_matcher(self, sched_id: str, c: TrackedCompletion, token: int, status: RequestStatus | None):
        """Feeds the sampled token to the sequence's matcher; a complete constraint ends it with "stop"
        (even when the same token reached max_tokens: the output is whole)."""
        if status is RequestStatus.FINISHED_STOPPED and token in self.eos_token_ids:
            return status  # end of sequence, which the grammar allowed (or ignore_eos is off)
        if not c.matcher.accept_token(token):
            logger.warning("request %s: token %d is outside its structured-output constraint: %s", sched_id, token,
                           getattr(c.matcher, "error", ""))
        if c.matcher.is_terminated() and status in (None, RequestStatus.FINISHED_LENGTH):
            if status is None:
                self.scheduler.finish(sched_id, RequestStatus.FINISHED_STOPPED)
            return RequestStatus.FINISHED_STOPPED
        return status
    def _store_prompt_logprobs(self, chunks, targets: np.ndarray, out: PromptLogprobs) -> None:
        offset = 0
        for chunk in chunks:
            n, k = len(chunk.token_ids), chunk.params.prompt_logprobs
            owner = self._owner.get(chunk.req_id)
            if k is not None and owner is not None:
                found, ranks = prompt_entries(out, targets, offset, n, k)
                # Flat tokens start.. predict prompt positions start + 1..
                positions = slice(chunk.start + 1, chunk.start + 1 + len(found))
                owner[0].prompt_logprobs[positions], owner[0].prompt_token_ranks[positions] = found, ranks
            offset += n

    # -- several processes (jpaged.parallel.step_channel) ---------------------------------
    @property
    def leads_workers(self) -> bool:
        """Whether other processes run this engine's steps too (this is process 0 of a group)."""
        return self.runner.channel is not None and self.runner.channel.is_leader

    def ping_workers(self) -> None:
        """Process 0, idle: a collective with every worker, so a dead one is found now (it raises)
        rather than when the next request arrives."""
        if self.leads_workers:
            self.runner.channel.send(Op.PING)

    def stop_workers(self) -> None:
        """Process 0, at the end: the workers' loops return and their processes exit 0."""
        if self.leads_workers:
            self.runner.channel.send(Op.STOP)

    def run_worker(self) -> int:
        """A process other than 0: runs the steps process 0 sends until it stops the group."""
        if self.runner.channel is None or self.runner.channel.is_leader:
            raise RuntimeError("run_worker is for processes other than 0 of a multi-process group")
        return run_worker(self.runner)

    # -- stats ----------------------------------------------------------------------------
    def get_stats(self) -> dict[str, float]:
        kv, sched = self.scheduler.kv, self.scheduler
        slots = sum(len(kv.req_blocks.get(r.req_id, ())) for r in sched.running) * self.config.block_size
        used = sum(r.num_computed_tokens for r in sched.running)
        return {
            "kv_blocks_total": kv.pool.num_blocks,
            "kv_blocks_free": kv.pool.num_free,
            "kv_cache_usage": kv.usage,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "kv_slots_allocated": slots,  # of running requests; vs kv_tokens_used: the waste of partial blocks
            "kv_tokens_used": used,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "num_preemptions": sched.num_preemptions,
            "num_requests_running": len(sched.running),
            "num_requests_waiting": len(sched.waiting),
            "num_compiles_after_warmup": self.runner.num_compiles - self._compiles_at_warmup,
            "num_compiles": self.runner.num_compiles,
            "num_traces": self.runner.num_traces,
            "num_executables_loaded": self.runner.num_executables_loaded,
            "padding_efficiency": self._num_real_tokens / max(self._num_padded_tokens, 1),
            "num_grammar_compiles": self._grammars.num_compiles if self._grammars is not None else 0,
            "warmup_seconds": self.warmup_seconds,
        }
