"""`LLM`: offline batch generation, the public entry point."""

from __future__ import annotations

import itertools
import time
from typing import Sequence

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import LLMEngine, PromptType
from jpaged.outputs import RequestOutput, RequestOutputKind
from jpaged.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """A model ready to generate. `LLM()` loads the embedded default model.

    Keyword arguments are EngineConfig fields (dtype, max_model_len, num_kv_blocks, ...).
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def model_dir(self):
        return self.engine.model_dir

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_stats(self) -> dict[str, float]:
        return self.engine.get_stats()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates completions for every prompt; outputs come back in prompt order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        req_ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params_list)):
                req_id = str(next(self._ids))
                try:
                    # Only finished outputs are read here: no per-step copies of running requests.
                    self.engine.add_request(req_id, prompt, p, output_kind=RequestOutputKind.FINAL_ONLY)
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
                req_ids.append(req_id)
            return self._run(req_ids, use_tqdm)
        except BaseException:
            for req_id in req_ids:  # nothing half-done stays queued
                self.engine.abort(req_id)
            raise

    def _run(self, req_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(req_ids), desc="generating", unit="req")
        finished: dict[str, RequestOutput] = {}
        start, num_out = time.perf_counter(), 0
        while len(finished) < len(req_ids):
            for out in self.engine.step():
                if out.finished:
                    finished[out.req_id] = out
                    num_out += sum(len(c.token_ids) for c in out.outputs)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"{num_out / (time.perf_counter() - start):.1f} out tok/s")
        if bar is not None:
            bar.close()
        return [finished[r] for r in req_ids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates the assistant's reply to one conversation or a list of them (the model's chat template)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        """Token ids of a conversation in the model's chat template, ready for the assistant's turn."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
