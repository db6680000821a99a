"""`jpaged bench sweep`: the source article's comparison, jpaged served vs HF transformers.

Concurrency 1, 4, 8, 16, 32 with 512 prompt and 128 output tokens (fixed lengths, EOS ignored):

    jpaged  `jpaged serve` in a subprocess, driven by `jpaged bench serve --max-concurrency c`
            with 2c requests (so requests overlap and finish at different times), over HTTP + SSE
    hf      transformers `generate` with a preallocated static cache, in a subprocess, static
            batches of c requests in arrival order (what c requests in flight give a static
            batcher): each batch starts when the previous one ends; TTFT is a request's batch start
            to its first token. No HTTP in the way, which favors HF.

The JSON and the chart are rewritten after each jpaged level and once HF is done, so a run cut
short keeps what it finished. `--hf-mode static` runs HF with its dynamic cache instead
(on CUDA, transformers compiles the static-cache forward on first use, once per batch shape).

Memory is each process's peak: host RSS on CPU, CUDA memory on a GPU (for jpaged, the process's
GPU memory as nvidia-smi reports it, which includes the KV pool it preallocates). Writes JSON and
a PNG chart (bars: requests/s; line: peak memory; second panel: mean TTFT):

    jpaged bench sweep --out-dir benchmarks/results
    jpaged bench sweep --dummy-config llama-3-8b --dtype bfloat16      # on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchmarks.throughput import device_info, dummy_config_path, peak_host_mib, resolved_dtype, vocab_size_of

CONCURRENCY = (1, 4, 8, 16, 32)
INPUT_LEN, OUTPUT_LEN = 512, 128  # the article's request shape


def _requests_for(concurrency: int) -> int:
    return max(2 * concurrency, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_peak_mib(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), or its GPU memory when it has any."""
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            app_pid, used = (x.strip() for x in line.split(","))
            if int(app_pid) == pid:
                return float(used)
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no memory figure for process {pid}")


@contextlib.contextmanager
def jpaged_server(args, log_path: pathlib.Path):
    """Starts `jpaged serve` on a free loopback port; yields (base_url, pid); stops it at the end."""
    port = _free_port()
    cmd = [sys.executable, "-m", "jpaged", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(args.input_len + args.output_len),
           "--max-num-seqs", str(args.max_num_seqs or max(args.concurrency)),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--dtype", args.dtype]
    if args.dummy_config:
        cmd += ["--model", str(dummy_config_path(args.dummy_config)), "--load-format", "dummy"]
    elif args.model:
        cmd += ["--model", args.model]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jpaged serve exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(base + "/health", timeout=5).status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"jpaged serve not ready after {args.startup_timeout}s; see {log_path}")
            time.sleep(1)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def level_seed(seed: int, concurrency: int) -> int:
    """Each level draws its own prompts: with one seed for all, a level's first prompts repeat the
    previous level's, and the server's prefix cache would skip their prefill."""
    return seed + 1000 * concurrency


def sweep_jpaged(args, vocab_size: int, log_path: pathlib.Path, on_row=None) -> list[dict]:
    """One server, every level in turn; on_row(row) after each level."""
    from benchmarks.serve_bench import ServeBenchConfig, run_benchmark

    rows = []
    with jpaged_server(args, log_path) as (base, pid):
        for c in sorted(args.concurrency):
            config = ServeBenchConfig(base_url=base, dataset="fixed", num_prompts=_requests_for(c), input_len=args.input_len,
                                      output_len=args.output_len, max_concurrency=c, seed=level_seed(args.seed, c),
                                      vocab_size=vocab_size,
                                      label=f"jpaged c={c}")
            m = asyncio.run(run_benchmark(config))["metrics"]
            rows.append(dict(system="jpaged", concurrency=c, num_requests=config.num_prompts, failed=m["failed"],
                             seconds=m["duration"], requests_per_s=m["request_throughput"],
                             output_tokens_per_s=m["output_throughput"], mean_ttft_ms=m["mean_ttft_ms"],
                             p99_ttft_ms=m["p99_ttft_ms"], mean_tpot_ms=m["mean_tpot_ms"],
                             peak_memory_mib=_process_peak_mib(pid)))
            print(_line(rows[-1]), flush=True)
            if on_row is not None:
                on_row(rows[-1])
    return rows


def sweep_hf(args, vocab_size: int) -> list[dict]:
    """In this process (run it as its own subprocess): HF static batches per concurrency level."""
    import torch

    from benchmarks.datasets import make_workload
    from benchmarks.hf_baseline import default_gguf, dummy_hf_model, load_hf_model, static_batches_with_ttft

    dtype = resolved_dtype(args.dtype)
    model = (dummy_hf_model(dummy_config_path(args.dummy_config), dtype) if args.dummy_config
             else load_hf_model(args.model or default_gguf(), dtype))
    warm = make_workload("fixed", num_prompts=1, input_len=16, output_len=2, vocab_size=vocab_size)
    static_batches_with_ttft(model, warm.prompts, warm.output_lens, 1, static_cache=args.hf_mode == "static-cache")
    rows = []
    for c in sorted(args.concurrency):
        work = make_workload("fixed", num_prompts=_requests_for(c), input_len=args.input_len, output_len=args.output_len,
                             seed=level_seed(args.seed, c), vocab_size=vocab_size)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        res = static_batches_with_ttft(model, work.prompts, work.output_lens, c,
                                       static_cache=args.hf_mode == "static-cache")
        memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_host_mib()
        ttfts = sorted(res["ttfts"])
        rows.append(dict(system="hf", concurrency=c, num_requests=len(work.prompts), failed=0, seconds=res["seconds"],
                         requests_per_s=len(work.prompts) / res["seconds"],
                         output_tokens_per_s=work.num_output_tokens / res["seconds"],
                         mean_ttft_ms=1000 * sum(ttfts) / len(ttfts), p99_ttft_ms=1000 * ttfts[-1],
                         mean_tpot_ms=None, peak_memory_mib=memory))
        print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    return (f"{r['system']:7} c={r['concurrency']:<3} {r['requests_per_s']:8.3f} req/s {r['output_tokens_per_s']:9.1f} "
            f"out tok/s  TTFT mean {r['mean_ttft_ms']:9.0f} ms  peak mem {r['peak_memory_mib']:8.0f} MiB")


def plot(rows: list[dict], title: str, xlabel: str, path: pathlib.Path) -> None:
    """The article's chart: bars of requests/s and a peak-memory line per system; TTFT below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    levels = sorted({r["concurrency"] for r in rows})
    systems = [s for s in ("jpaged", "hf") if any(r["system"] == s for r in rows)]
    colors = {"jpaged": "tab:blue", "hf": "tab:orange"}
    x, width = np.arange(len(levels)), 0.8 / len(systems)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    mem_axis = top.twinx()
    for i, system in enumerate(systems):
        by_level = {r["concurrency"]: r for r in rows if r["system"] == system}
        rps = [by_level[c]["requests_per_s"] if c in by_level else 0 for c in levels]
        top.bar(x + (i - (len(systems) - 1) / 2) * width, rps, width, label=f"{system} requests/s", color=colors[system])
        mem = [by_level[c]["peak_memory_mib"] / 1024 if c in by_level else np.nan for c in levels]
        mem_axis.plot(x, mem, "o--", color=colors[system], label=f"{system} peak memory")
        ttft = [by_level[c]["mean_ttft_ms"] / 1000 if c in by_level else np.nan for c in levels]
        bottom.plot(x, ttft, "o-", color=colors[system], label=f"{system} mean TTFT")
    top.set_ylabel("requests/s")
    mem_axis.set_ylabel("peak memory (GiB)")
    top.set_title(title, fontsize=10)
    handles = top.get_legend_handles_labels()[0] + mem_axis.get_legend_handles_labels()[0]
    top.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    bottom.set_ylabel("time to first token (s)")
    bottom.set_xlabel(xlabel)
    bottom.set_xticks(x, [str(c) for c in levels])
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    out = [f"{'conc':>4} {'system':7} {'req/s':>8} {'out tok/s':>10} {'TTFT mean ms':>13} {'TTFT p99 ms':>12} "
           f"{'peak MiB':>9} {'vs HF':>6}"]
    hf = {r["concurrency"]: r for r in rows if r["system"] == "hf"}
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["system"] != "jpaged")):
        ratio = (f"{r['requests_per_s'] / hf[r['concurrency']]['requests_per_s']:.2f}x"
                 if r["system"] == "jpaged" and r["concurrency"] in hf else "")
        out.append(f"{r['concurrency']:4} {r['system']:7} {r['requests_per_s']:8.3f} {r['output_tokens_per_s']:10.1f} "
                   f"{r['mean_ttft_ms']:13.0f} {r['p99_ttft_ms']:12.0f} {r['peak_memory_mib']:9.0f} {ratio:>6}")
    return "\n".join(out)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="jpaged bench sweep", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct (HF reads its GGUF)")
    src.add_argument("--dummy-config", default=None, help="random weights of a shape in benchmarks/configs/")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--input-len", type=int, default=INPUT_LEN)
    p.add_argument("--output-len", type=int, default=OUTPUT_LEN)
    p.add_argument("--systems", nargs="+", default=["jpaged", "hf"], choices=["jpaged", "hf"])
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=None, help="the server's (default: the highest concurrency)")
    p.add_argument("--hf-mode", default="static-cache", choices=["static", "static-cache"],
                   help="HF's cache: preallocated (static-cache) or dynamic (static)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default=None, help="file stem (default: DATE-DEVICE-sweep)")
    p.add_argument("--hf-child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    vocab_size = vocab_size_of(args.model, args.dummy_config)
    if args.hf_child:  # the HF half, in its own process so its memory is its own
        pathlib.Path(args.hf_child).write_text(json.dumps(sweep_hf(args, vocab_size)))
        return 0
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = device_info() | dict(model=args.dummy_config or args.model or "SmolLM2-135M-Instruct (default)",
                                dtype=resolved_dtype(args.dtype), input_len=args.input_len, output_len=args.output_len)
    stem = args.name or f"{meta['date']}-{'gpu' if 'CPU' not in meta['device'] else 'cpu'}-sweep"
    rows = []

    def write() -> None:  # after each level and system: a run cut short keeps what it finished
        (out_dir / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        plot(rows, f"jpaged vs HF transformers: {meta['model']}, {meta['dtype']}\n{meta['device']}",
             f"concurrency ({args.input_len} in / {args.output_len} out tokens)", out_dir / f"{stem}.png")

    if "jpaged" in args.systems:
        def add(row: dict) -> None:
            rows.append(row)
            write()

        sweep_jpaged(args, vocab_size, pathlib.Path(tempfile.gettempdir()) / f"{stem}-server.log", on_row=add)
    if "hf" in args.systems:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            child = argv if argv is not None else sys.argv[1:]
            subprocess.run([sys.executable, "-m", "benchmarks.sweep", *child, "--hf-child", f.name], check=True,
                           env=os.environ | {"PYTHONUNBUFFERED": "1"})
            rows += json.loads(pathlib.Path(f.name).read_text())
        write()
    print("\n" + table(rows))
    print(f"wrote {out_dir / (stem + '.json')} and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
