"""One prepared GPU run: every GPU claim of jpaged measured in one command of under 10 minutes.

    python3 benchmarks/gpu_run.py --out DIR [--commit HASH]     # on the GPU machine, from the source tree
    python3 benchmarks/gpu_run.py --out DIR --dry-run           # the same steps on a CPU, tiny shapes

Steps, in this order, each in its own process group, cut at its cap (the run goes on with the next):

    env           versions, devices, nvidia-smi, measured copy bandwidth and bf16 matmul rate
    kernel_tests  tests/kernels compiled for the GPU (the variants skipped on a CPU), pass/fail table
    kernel_bench  the kernels vs the XLA paths at Llama-3-8B attention shapes, a handful of points
    model         greedy tokens: pallas = xla on this device = the committed CPU goldens (near-ties allowed)
    throughput    `bench throughput`, Llama-3-8B-shaped bf16 dummy weights, jpaged vs HF's batch modes
    sweep         the article's sweep, concurrency 1, 4, 16, 32, jpaged served vs HF

Everything goes to --out as it is produced: one JSON per step (each with a "step" entry saying
how it ended), run.log (all output) and sweep.png, eight files at most. Packages the device
image lacks (pydantic for the server; WHEELS in gpu_steps.py) travel as wheels in .whl/
and are installed into a temporary folder first. See benchmarks/README.md for the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: `python3 benchmarks/gpu_run.py`
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_steps import kill_group  # noqa: E402 - after the path is set


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    cap_s: float  # on the GPU: the step is cut at this many seconds
    dry_cap_s: float  # in the dry run, on a 2-core CPU
    expected_s: str  # what a GPU run should take (benchmarks/README.md)
    what: str


STEPS = (
    Step("env", 45, 60, "15-25", "versions, nvidia-smi, copy bandwidth, bf16 matmul rate"),
    Step("kernel_tests", 90, 120, "40-80", "tests/kernels compiled for the GPU"),
    Step("kernel_bench", 75, 90, "30-60", "kernels vs XLA, Llama-3-8B shapes"),
    Step("model", 80, 150, "40-70", "pallas = xla = CPU goldens"),
    Step("throughput", 150, 240, "100-150", "jpaged vs HF, 200 x 512 in / 128 out"),
    Step("sweep", 100, 240, "70-100", "concurrency 1, 4, 16, 32"),
)
TOTAL_CAP_S = 560  # under the device's 600 s per command, with room to start and copy back
LOG = "run.log"


def step_command(step: str, out: pathlib.Path, deadline: float, dry_run: bool) -> list[str]:
    py, dry = sys.executable, ["--dry-run"] if dry_run else []
    if step == "kernel_bench":
        points = ["--quick", "--repeat", "1", "--samples", "1"] if dry_run else ["--points", "gpu-run", "--repeat", "10",
                                                                               "--samples", "5"]
        return [py, "-m", "benchmarks.kernel_bench", *points, "--out", str(out / "kernel_bench.json")]
    if step == "model":
        return [py, "-m", "benchmarks.gpu_model_check", "--out", str(out / "model.json"), *dry]
    return [py, "-m", "benchmarks.gpu_steps", step, "--out", str(out), "--deadline", str(deadline), *dry]


def install_wheels(log) -> str | None:
    """pip-installs .whl/*.whl into a temporary folder when the image lacks pydantic; that folder, or None."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    try:
        import pydantic  # noqa: F401
        return None
    except ImportError:
        if not wheels:
            log("no pydantic and no .whl/: the sweep's server will not start (see benchmarks/README.md)")
            return None
    target = tempfile.mkdtemp(prefix="jpaged-site-")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--target", target, *map(str, wheels)], check=True)
    log(f"installed {len(wheels)} wheels from .whl/ into {target}")
    return target


class Tee:
    """Lines to the console and to run.log, flushed as they come."""

    def __init__(self, path: pathlib.Path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")


def run_step(step: Step, cmd: list[str], cap: float, env: dict, log: Tee) -> dict:
    """Runs one step's command, its output into the log, and cuts its process group at cap seconds."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    reader = threading.Thread(target=lambda: [log(line.rstrip("\n")) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        status = proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        status = None
    reader.join(timeout=10)
    seconds = time.monotonic() - start
    return dict(status="cut" if status is None else "ok" if status == 0 else "failed", exit_status=status,
                seconds=round(seconds, 1), cap_s=cap)


def record(out: pathlib.Path, name: str, index: int, outcome: dict) -> None:
    """The step's own JSON gets a "step" entry: how it ended (a cut step may have written none)."""
    path = out / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data["step"] = dict(name=name, index=index) | outcome
    path.write_text(json.dumps(data, indent=1) + "\n")


def headline(name: str, data: dict) -> str:
    """One line of the final table from a step's JSON."""
    try:
        if name == "env":
            return (f"{data['meta']['device']}; jax {data['versions']['jax']}; {data.get('copy_bandwidth_gb_s', 0):.0f} "
                    f"GB/s copy, {data.get('bf16_matmul_tflop_s', 0):.3g} TFLOP/s bf16")
        if name == "kernel_tests":
            return ", ".join(f"{v} {k}" for k, v in data["counts"].items() if v)
        if name == "kernel_bench":
            rows = data["rows"]
            big = max((r for r in rows if r["kind"] == "decode"), key=lambda r: r["num_seqs"] * r["context"])
            at = {r["impl"]: r for r in rows if (r["kind"], r["num_seqs"], r["context"]) ==
                  ("decode", big["num_seqs"], big["context"])}
            return f"decode {big['num_seqs']}x{big['context']}: " + ", ".join(
                f"{k} {v['us_per_call']:.0f} us ({100 * v['frac_of_copy']:.0f}% copy)" for k, v in at.items())
        if name == "model":
            ok = sum(c["ok"] for c in data["checks"])
            ties = sum(c["num_near_tie"] for c in data["checks"])
            return f"{ok}/{len(data['checks'])} checks agree ({ties} near-ties)"
        if name == "throughput":
            return (f"out tok/s jpaged {data['jpaged_output_tokens_per_s']:.0f}, HF {data['hf_best']} "
                    f"{data['hf_best_output_tokens_per_s']:.0f}: {data['speedup']:.2f}x; decode roofline "
                    f"{data['roofline_fraction']:.2f}")
        if name == "sweep":
            hf = {r["concurrency"]: r for r in data["rows"] if r["system"] == "hf"}
            ratios = [f"c={r['concurrency']} {r['requests_per_s'] / hf[r['concurrency']]['requests_per_s']:.2f}x"
                      for r in data["rows"] if r["system"] == "jpaged" and r["concurrency"] in hf]
            return "req/s jpaged/HF " + ", ".join(ratios) if ratios else "(incomplete)"
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    return "(incomplete)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, required=True, help="results folder (8 files at most)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU: tiny shapes, kernels interpreted")
    p.add_argument("--steps", default=",".join(s.name for s in STEPS), help="comma-separated subset, run in order")
    p.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS", help="override a step's cap")
    p.add_argument("--total-cap", type=float, default=TOTAL_CAP_S, help="no step runs past this many seconds")
    p.add_argument("--commit", default=None, help="the tree's commit, recorded in the results (a copy has no .git)")
    p.add_argument("--home", default=None, help="JPAGED_HOME for the run (default: a fresh temporary folder)")
    args = p.parse_args(argv)
    wanted = args.steps.split(",")
    unknown = set(wanted) - {s.name for s in STEPS}
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; known: {[s.name for s in STEPS]}")
    caps = {s.name: s.dry_cap_s if args.dry_run else s.cap_s for s in STEPS}
    for item in args.cap:
        name, _, seconds = item.partition("=")
        caps[name] = float(seconds)

    args.out.mkdir(parents=True, exist_ok=True)
    log = Tee(args.out / LOG)
    start = time.monotonic()
    site = install_wheels(log)
    env = os.environ | dict(
        PYTHONPATH=os.pathsep.join(filter(None, [site, str(ROOT), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        JPAGED_HOME=args.home or tempfile.mkdtemp(prefix="jpaged-home-"))
    if args.commit:
        env["JPAGED_GIT_COMMIT"] = args.commit
    outcomes = {}
    for index, step in enumerate(s for s in STEPS if s.name in wanted):
        left = args.total_cap - (time.monotonic() - start)
        cap = min(caps[step.name], left)
        if left < 5:
            outcomes[step.name] = dict(status="skipped", exit_status=None, seconds=0, cap_s=caps[step.name])
            log(f"== step {step.name}: skipped, the run's {args.total_cap:.0f}s are spent")
            record(args.out, step.name, index, outcomes[step.name])
            continue
        log(f"== step {step.name} ({step.what}), cap {cap:.0f}s")
        cmd = step_command(step.name, args.out, time.time() + cap, args.dry_run)
        outcomes[step.name] = run_step(step, cmd, cap, env, log)
        log(f"== step {step.name}: {outcomes[step.name]['status']} in {outcomes[step.name]['seconds']:.0f}s")
        record(args.out, step.name, index, outcomes[step.name])

    log(f"\n{'step':13} {'status':7} {'s':>5} {'cap':>4}  result")
    for name, o in outcomes.items():
        data = json.loads((args.out / f"{name}.json").read_text())
        log(f"{name:13} {o['status']:7} {o['seconds']:5.0f} {o['cap_s']:4.0f}  {headline(name, data)}")
    log(f"total {time.monotonic() - start:.0f}s; files in {args.out}: "
        + " ".join(sorted(f.name for f in args.out.iterdir())))
    return 0 if all(o["status"] == "ok" for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
