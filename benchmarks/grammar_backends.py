"""Grammar libraries on the default model's vocabulary: time to compile a JSON schema, time to
fill one token mask.

    python -m benchmarks.grammar_backends --out benchmarks/results/DATE-cpu-grammar-backends.json

For each schema of benchmarks/structured_cases.py and each library installed (llguidance,
xgrammar; neither is needed by the other), on SmolLM2-135M's 49,152-token vocabulary:
- compile: a cold compile (fresh compiler, no cache) until the first mask is filled. llguidance
  builds lazily, so its first mask carries work xgrammar does in `compile_json_schema`; counting
  up to the first mask compares the same thing: the wait before a request's first token.
- mask: per generated token, fill the [ceil(V/32)] int32 bitmask and consume the token, fed the
  schema's valid instance (compact JSON, ", " and ": " separators) token by token; median and
  p99 over all tokens of all repeats, the first mask excluded.
Both libraries get the same JSON options: no free whitespace, ", " / ": " separators.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.structured_cases import SCHEMAS
from pallas_kernels.cpu_build import cpu_model

SEPARATORS = (", ", ": ")


def default_tokenizer(folder: Path):
    """The default model's HF tokenizer, rebuilt from its GGUF file into folder (no model load)."""
    import gguf
    import transformers

    from convert.gguf_tokenizer import write_tokenizer_files
    from jpaged.model_files import default_model_source

    write_tokenizer_files(gguf.GGUFReader(default_model_source()), folder)
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self.llg = llguidance
        start = time.perf_counter()
        self.tok = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=vocab_size,
                                          eos_token=tokenizer.eos_token_id)
        self.tokenizer_seconds = time.perf_counter() - start
        self.version = getattr(llguidance, "__version__", None) or _dist_version("llguidance")

    def compile(self, schema: dict):
        overrides = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=overrides)
        matcher = self.llg.LLMatcher(self.tok, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def fill(self, matcher, mask: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int):
        import torch
        import xgrammar

        self.xg, self.torch = xgrammar, torch
        start = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.tokenizer_seconds = time.perf_counter() - start
        self.version = _dist_version("xgrammar")
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        compiler = self.xg.GrammarCompiler(self.info, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
        return self.xg.GrammarMatcher(compiled)

    def fill(self, matcher, mask: np.ndarray) -> None:
        # xgrammar fills a torch tensor through DLPack; from_numpy shares the numpy buffer.
        matcher.fill_next_token_bitmask(self.torch.from_numpy(mask[None]), 0)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _allowed(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


def measure(backend, tokenizer, vocab_size: int, repeats: int) -> dict:
    width = -(-vocab_size // 32)
    mask = np.zeros(width, np.int32)
    per_schema = {}
    all_fills = []
    for name, (schema, instance) in SCHEMAS.items():
        tokens = tokenizer.encode(json.dumps(instance, separators=SEPARATORS), add_special_tokens=False)
        compiles, fills, rejected = [], [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            matcher = backend.compile(schema)
            backend.fill(matcher, mask)
            compiles.append(time.perf_counter() - start)
            for i, token in enumerate(tokens):
                if i:
                    start = time.perf_counter()
                    backend.fill(matcher, mask)
                    fills.append(time.perf_counter() - start)
                if not _allowed(mask, token) or not backend.accept(matcher, token):
                    rejected += 1
                    break
        all_fills += fills
        per_schema[name] = {
            "num_tokens": len(tokens),
            "compile_ms_median": 1e3 * statistics.median(compiles),
            "compile_ms_max": 1e3 * max(compiles),
            "mask_us_median": 1e6 * statistics.median(fills) if fills else None,
            "mask_us_p99": 1e6 * float(np.percentile(fills, 99)) if fills else None,
            "instance_rejected": rejected,  # the valid instance refused by the mask: a library bug
        }
    return {
        "library": backend.name,
        "version": backend.version,
        "tokenizer_setup_ms": 1e3 * backend.tokenizer_seconds,
        "compile_ms_median": statistics.median(s["compile_ms_median"] for s in per_schema.values()),
        "compile_ms_max": max(s["compile_ms_max"] for s in per_schema.values()),
        "mask_us_median": 1e6 * statistics.median(all_fills),
        "mask_us_p99": 1e6 * float(np.percentile(all_fills, 99)),
        "schemas": per_schema,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--libraries", nargs="+", default=["llguidance", "xgrammar"])
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = default_tokenizer(Path(folder))
    vocab_size = 49152  # SmolLM2's embedding rows (the tokenizer's own length here too)
    classes = {"llguidance": LLGuidance, "xgrammar": XGrammar}
    results = []
    for name in args.libraries:
        try:
            backend = classes[name](tokenizer, vocab_size)
        except ImportError as e:
            print(f"{name}: not installed ({e}); skipped")
            continue
        backend.compile({"type": "object"})  # warm-up: first-use costs of the library itself
        results.append(measure(backend, tokenizer, vocab_size, args.repeats))

    print(f"{'library':<12} {'version':<8} {'tokenizer ms':>12} {'compile ms med/max':>20} {'mask us med/p99':>18}")
    for r in results:
        print(f"{r['library']:<12} {r['version'] or '?':<8} {r['tokenizer_setup_ms']:>12.1f} "
              f"{r['compile_ms_median']:>9.2f} / {r['compile_ms_max']:<8.2f} "
              f"{r['mask_us_median']:>7.1f} / {r['mask_us_p99']:<8.1f}")
    print(f"\nper schema (compile ms median, mask us median): ")
    for name in SCHEMAS:
        print(f"  {name:<16} " + "  ".join(
            f"{r['library']}: {r['schemas'][name]['compile_ms_median']:.2f} ms, "
            f"{r['schemas'][name]['mask_us_median'] or 0:.1f} us"
            + (" (instance rejected!)" if r["schemas"][name]["instance_rejected"] else "") for r in results))
    out = {"meta": {"cpu": cpu_model(), "vocab_size": vocab_size,
                    "repeats": args.repeats, "separators": SEPARATORS}, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
