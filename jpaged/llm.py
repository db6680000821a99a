"""`LLM`: offline batch generation, the public entry point."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from jpaged import checkpoint, generation_loop
from jpaged.config import EngineConfig
from jpaged.model_files import resolve_model
from jpaged.models.attention import resolve_backend
from jpaged.models.config import ModelConfig
from jpaged.models.params import build_model, random_params
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.runner.batch import BucketSpec
from jpaged.runner.buckets import power_of_two_buckets
from jpaged.runner.model_runner import ModelRunner
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger("jpaged")

PromptType = str | list[int] | dict[str, Any]


def _runtime_dtype(name: str):
    if name == "auto":
        name = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    return jnp.dtype(name)


def _load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _dummy_config_folder(model: str | None) -> Path:
    if model is None:
        raise ValueError('load_format="dummy" needs model= a config.json or a folder holding one')
    path = Path(model)
    folder = path.parent if path.name.endswith(".json") else path
    if not (folder / "config.json").is_file() and not path.is_file():
        raise FileNotFoundError(f"no config.json at {model}")
    return folder


class LLM:
    """A model ready to generate. `LLM()` loads the embedded default model.

    Keyword arguments are EngineConfig fields (dtype, max_model_len, num_kv_blocks, ...).
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.config = config = EngineConfig(model=model, **kwargs)
        start = time.perf_counter()
        dtype = _runtime_dtype(config.dtype)
        if config.load_format == "dummy":
            folder = _dummy_config_folder(model)
            path = Path(model) if str(model).endswith(".json") else folder / "config.json"
            self.model_config = ModelConfig.from_file(path)
            params = random_params(self.model_config, dtype, seed=config.seed)
        else:
            folder = resolve_model(model)
            self.model_config = ModelConfig.from_file(folder / "config.json")
            params = checkpoint.load_params(folder, self.model_config, dtype)
        self.model_dir = folder
        self.tokenizer = _load_tokenizer(folder)
        mc = self.model_config
        backend = resolve_backend(config.attn_backend)
        self.max_model_len = config.max_model_len or min(mc.max_position_embeddings, 4096)
        self.spec = self._bucket_spec(dtype)
        self.runner = ModelRunner(
            build_model(mc, params, backend=backend, dtype=dtype),
            num_pages=self.spec.num_pages,
            page_size=config.block_size,
            kv_dtype=dtype,
        )
        self.eos_ids = self._eos_ids(folder)
        self._rng = np.random.default_rng(config.seed)
        logger.info(
            "loaded %s (%s, %.1fM params, %s, attention %s) in %.1fs; KV cache %d tokens",
            folder.name, mc.architecture, mc.num_params() / 1e6, dtype.name, backend,
            time.perf_counter() - start, (self.spec.num_pages - 1) * config.block_size,
        )

    def _bucket_spec(self, dtype) -> BucketSpec:
        c, mc = self.config, self.model_config
        pages_per_seq = math.ceil(self.max_model_len / c.block_size)
        num_pages = c.num_kv_blocks
        if num_pages is None:
            budget = int(c.kv_cache_memory_gib * 2**30 // (mc.kv_bytes_per_token(dtype.itemsize) * c.block_size))
            num_pages = max(min(c.max_num_seqs * pages_per_seq, budget), pages_per_seq) + 1
        if num_pages - 1 < pages_per_seq:
            raise ValueError(
                f"max_model_len {self.max_model_len} needs {pages_per_seq} KV blocks but num_kv_blocks={num_pages} "
                f"holds {num_pages - 1}; the largest max_model_len that fits is {(num_pages - 1) * c.block_size}"
            )
        return BucketSpec(
            token_buckets=power_of_two_buckets(16, max(c.max_num_batched_tokens, 16)),
            seq_buckets=power_of_two_buckets(8, max(c.max_num_seqs, 8)),
            page_buckets=power_of_two_buckets(min(8, pages_per_seq), pages_per_seq),
            page_size=c.block_size,
            num_pages=num_pages,
        )

    def _eos_ids(self, folder: Path) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        gen_config = folder / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def get_tokenizer(self):
        return self.tokenizer

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
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

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates a completion for every prompt; outputs come back in prompt order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        vocab = self.model_config.vocab_size
        seqs, texts = [], []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            text, ids = self._prompt_ids(prompt)
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                    "leaving no room to generate"
                )
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
            seed = p.seed if p.seed is not None else int(self._rng.integers(2**31))
            max_len = min(len(ids) + p.max_tokens, self.max_model_len)
            seqs.append(generation_loop.Sequence(i, ids, p, seed, max_len))
            texts.append(text)

        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), desc="generating", unit="req")
        start, num_out = time.perf_counter(), 0

        def on_finish(seq: generation_loop.Sequence) -> None:
            nonlocal num_out
            num_out += len(seq.output_ids)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{num_out / (time.perf_counter() - start):.1f} out tok/s")

        generation_loop.run(
            self.runner,
            self.spec,
            seqs,
            eos_ids=self.eos_ids,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            on_finish=on_finish,
        )
        if bar is not None:
            bar.close()
        return [self._request_output(seq, text) for seq, text in zip(seqs, texts)]

    def _request_output(self, seq: generation_loop.Sequence, prompt: str | None) -> RequestOutput:
        text = "" if self.tokenizer is None else self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        completion = CompletionOutput(0, text, list(seq.output_ids), seq.finish_reason)
        return RequestOutput(str(seq.index), prompt, list(seq.prompt_ids), [completion], finished=True)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation in the model's chat template, ready for the assistant's turn."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)
