"""`jpaged bench startup`: how long a one-prompt job takes from process start to exit, cold and warm, vs HF.

    jpaged bench startup --runs 3 --max-tokens 16
    python -m benchmarks.startup --runs 2 --warmup lazy --out /tmp/startup.json

Every run is a fresh process (benchmarks/startup_job.py) timed by this one from spawn to exit;
that wall time is the headline. jpaged cold: an empty JPAGED_HOME in a new temp folder, so the
default model's conversion, the C++ kernels' build and every compile land in it. jpaged warm: the
same folder again, every cache filled. HF: transformers in its own process loading the same
weights (the default model's GGUF, dequantized), the same chat prompt, greedy, the same number of
new tokens. The warm jpaged and HF runs alternate, so whatever else the machine runs weighs on
both alike. The table gives the median [min-max] of each configuration's runs; the JSON holds
every run's phases (see startup_job's docstring), the medians, the ratios, and whether cold and
warm jpaged generated the same tokens (they must: a cache may change speed, never the output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import startup_job
from benchmarks.startup_job import HF_PHASES, JPAGED_PHASES, RESULT_PREFIX, SPAWN_ENV

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Headline columns: (title, key in a run's metrics); "weights" is load_weights for jpaged, load for HF.
COLUMNS = [("wall", "wall"), ("to 1st tok", "to_first_token"), ("imports", "imports"), ("resolve", "resolve_model"),
           ("kernels", "kernels"), ("load", "weights"), ("compile", "compile"), ("1st token", "first_token")]
COUNTER_COLUMNS = [("traces", "num_traces"), ("compiles", "num_compiles"), ("loaded", "num_executables_loaded")]
ALL_PHASES = list(dict.fromkeys(JPAGED_PHASES + HF_PHASES))


def spawn(backend: str, job_args: list[str], home: pathlib.Path, timeout: float) -> dict:
    """Runs one startup_job process and times it from spawn to exit; a failure becomes a run with its error."""
    cmd = [sys.executable, "-m", "benchmarks.startup_job", "--backend", backend, *job_args]
    env = dict(os.environ, JPAGED_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.time()
    env[SPAWN_ENV] = repr(start)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(backend=backend, error=f"no exit within {timeout:.0f}s", wall=time.time() - start)
    end = time.time()
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or len(lines) != 1:
        tail = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return dict(backend=backend, error=tail[-1], wall=end - start)
    res = json.loads(lines[0][len(RESULT_PREFIX):])
    res["phases"]["exit"] = end - res["marks"]["end"]
    res["wall"] = end - start
    return res


def metrics(run: dict) -> dict[str, float | None]:
    """One run's numbers by column key: wall, time to first token from spawn, phases, counters."""
    phases = run["phases"]
    out = dict(wall=run["wall"], to_first_token=run["seconds_to_first_token"], **phases, **run.get("counters", {}))
    out["weights"] = phases.get("load_weights", phases.get("load"))
    return out


def summarize(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per metric: median, min and max over the runs that report it."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for key, value in metrics(run).items():
            if value is not None:
                values.setdefault(key, []).append(value)
    return {k: dict(median=statistics.median(v), min=min(v), max=max(v)) for k, v in values.items()}


def _cell(stat: dict | None, integer: bool = False, spread: bool = True) -> str:
    if stat is None:
        return "-"
    fmt = "{:.0f}" if integer else "{:.2f}"
    text = fmt.format(stat["median"])
    if spread and stat["min"] != stat["max"]:
        text += f" [{fmt.format(stat['min'])}-{fmt.format(stat['max'])}]"
    return text


def _grid(header: list[str], rows: list[list[str]]) -> str:
    """Columns as wide as their widest cell; the first left-aligned, the numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join(map(line, [header, *rows]))


def table(summary: dict[str, dict], num_runs: dict[str, int], errors: dict[str, list[str]]) -> str:
    """The headline (median [min-max] seconds, counters) and every phase's median, one row per configuration."""
    header = ["configuration", "runs"] + [t for t, _ in COLUMNS] + [t for t, _ in COUNTER_COLUMNS]
    rows = []
    for label, stats in summary.items():
        rows.append([label, str(num_runs[label])] + [_cell(stats.get(k)) for _, k in COLUMNS]
                    + [_cell(stats.get(k), integer=True) for _, k in COUNTER_COLUMNS])
    phase_rows = [[label] + [_cell(stats.get(p), spread=False) for p in ALL_PHASES] for label, stats in summary.items()]
    text = _grid(header, rows) + "\n\nmedian seconds per phase\n" + _grid(["configuration", *ALL_PHASES], phase_rows)
    for label, errs in errors.items():
        text += "".join(f"\n{label}: error: {e}" for e in errs)
    return text


def ratios(summary: dict[str, dict]) -> dict[str, float]:
    """jpaged warm over HF, of the median wall time and of the median time to the first token."""
    warm, hf = summary.get("jpaged warm", {}), summary.get("hf", {})
    return {f"jpaged_warm_over_hf_{k}": warm[k]["median"] / hf[k]["median"]
            for k in ("wall", "to_first_token") if k in warm and k in hf}


def correctness(ok: dict[str, list[dict]]) -> dict[str, bool | None]:
    """Checks across the successful runs, by configuration; None where too few ran to say."""
    jpaged_tokens = [r["token_ids"] for label in ("jpaged cold", "jpaged warm") for r in ok.get(label, [])]
    hf_tokens = [r["token_ids"] for r in ok.get("hf", [])]
    warm, cold, hf = ok.get("jpaged warm", []), ok.get("jpaged cold", []), ok.get("hf", [])
    return dict(
        # every jpaged run, cold or warm, generated the same tokens: a cache may change speed, never output
        jpaged_cold_warm_tokens_equal=(all(t == jpaged_tokens[0] for t in jpaged_tokens)
                                       if len(jpaged_tokens) > 1 else None),
        # HF's greedy tokens equal jpaged's (on the default model: the GGUF dequantized on both sides)
        hf_tokens_equal=all(t == jpaged_tokens[0] for t in hf_tokens) if jpaged_tokens and hf_tokens else None,
        # a warm run that traced or compiled missed a cache (then its times are not warm ones)
        jpaged_warm_compiled_nothing=(all(not r["counters"].get("num_compiles") and not r["counters"].get("num_traces")
                                          for r in warm) if warm else None),
        hf_prompt_equal=all(r["prompt_token_ids"] == cold[0]["prompt_token_ids"] for r in hf) if hf and cold else None,
    )


def job_args(args: argparse.Namespace, backend: str) -> list[str]:
    out = ["--max-tokens", str(args.max_tokens)]
    out += ["--prompt-token-ids", args.prompt_token_ids] if args.prompt_token_ids else ["--prompt", args.prompt]
    model = args.model if backend == "jpaged" else (args.hf_model or args.model)
    if model:
        out += ["--model", model]
    if args.dtype:
        out += ["--dtype", args.dtype]
    if backend == "jpaged":
        for flag in startup_job.engine_option_names():
            if getattr(args, flag) is not None:
                out += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return out


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.startup_job import DEFAULT_PROMPT

    p = argparse.ArgumentParser(prog="jpaged bench startup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="warm runs of jpaged and runs of HF")
    p.add_argument("--cold-runs", type=int, default=1, help="jpaged runs, each in a new empty JPAGED_HOME")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="one user message, in the model's chat template")
    p.add_argument("--prompt-token-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--hf-model", default=None, help="HF side's weights (an HF folder or .gguf); default: --model, "
                   "or the default model's GGUF")
    startup_job.add_engine_options(p)
    p.add_argument("--dtype", default=None, help="both sides; default jpaged's auto, HF float32")
    p.add_argument("--skip-hf", action="store_true", help="jpaged rows only")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one process may take")
    p.add_argument("--out", default=None, help="JSON file; default benchmarks/results/DATE-DEVICE-startup.json")
    return p


def _is_dirty() -> bool | None:
    """Uncommitted edits to tracked files: then the commit alone does not name the code measured."""
    try:
        return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip())
    except OSError:
        return None


def _device_tag(device: str) -> str:
    return "cpu" if device.startswith("CPU") else device.lower().replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.cold_runs < 1 or args.max_tokens < 1:
        raise ValueError(f"--runs, --cold-runs and --max-tokens must be >= 1, got {args.runs}, {args.cold_runs}, "
                         f"{args.max_tokens}")
    runs: list[dict] = []

    def record(label: str, backend: str, home: pathlib.Path) -> None:
        run = spawn(backend, job_args(args, backend), home, args.timeout)
        run.update(configuration=label, index=sum(r["configuration"] == label for r in runs))
        runs.append(run)
        state = f"error: {run['error']}" if "error" in run else f"to first token {run['seconds_to_first_token']:.2f}s"
        print(f"{label} #{run['index']}: {run['wall']:.2f}s wall, {state}", flush=True)

    homes = [pathlib.Path(tempfile.mkdtemp(prefix="jpaged-startup-")) for _ in range(args.cold_runs)]
    try:
        for home in homes:
            record("jpaged cold", "jpaged", home)
        for _ in range(args.runs):
            record("jpaged warm", "jpaged", homes[0])
            if not args.skip_hf:
                record("hf", "hf", homes[0])
    finally:
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)

    labels = list(dict.fromkeys(r["configuration"] for r in runs))
    ok = {label: [r for r in runs if r["configuration"] == label and "error" not in r] for label in labels}
    errors = {label: [r["error"] for r in runs if r["configuration"] == label and "error" in r] for label in labels}
    summary = {label: summarize(rs) for label, rs in ok.items() if rs}
    checks = correctness(ok)
    print("\n" + table(summary, {label: len(rs) for label, rs in ok.items()}, errors))
    result_ratios = ratios(summary)
    for key, value in result_ratios.items():
        print(f"{key.replace('_', ' ')}: {value:.2f}x")
    print(", ".join(f"{k}: {v}" for k, v in checks.items()))

    from benchmarks.throughput import device_info

    meta = device_info()
    meta["time"] = datetime.datetime.now().isoformat(timespec="seconds")
    meta["dirty"] = _is_dirty()
    out = pathlib.Path(args.out or ROOT / "benchmarks" / "results"
                       / f"{meta['date']}-{_device_tag(meta['device'])}-startup.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, options=vars(args), runs=runs, summary=summary,
                                   ratios=result_ratios, **checks), indent=1))
    print(f"wrote {out}")
    failed = any(errors.values()) or checks["jpaged_cold_warm_tokens_equal"] is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
