"""The steps of gpu_run.py that are more than one existing script: each writes its JSON into --out
as results come in, and cuts its own children at --deadline (seconds since the epoch), so the
JSON is complete up to the cut.

    python -m benchmarks.gpu_steps env|kernel_tests|throughput|sweep --out DIR --deadline T [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# What each step runs, on the GPU and in the dry run (CPU, tiny shapes, kernels interpreted).
KERNEL_TESTS = dict(
    # Not test_kernel_lowering.py: cross-lowering on a CPU is the stand-in for what runs here for real.
    gpu=dict(files=["test_paged_decode_kernel.py", "test_ragged_kernel.py", "test_kernel_validation.py",
                    "test_triton_deprecation.py"], select="not interpret"),
    dry=dict(files=["test_paged_decode_kernel.py", "test_kernel_validation.py", "test_triton_deprecation.py"],
             select="interpret and random or rejects_bad_sliding or triton_lowering"),
)
THROUGHPUT = dict(
    gpu=dict(dummy_config="llama-3-8b", dtype="bfloat16", num_prompts=200, input_len=512, output_len=128,
             max_num_seqs=128, max_num_batched_tokens=2048, hf_batch=128, hf_modes=["static", "static-cache"],
             jpaged_share=0.55),
    # One HF mode in the dry run: each is a process of its own (torch's import alone is seconds),
    # and tests/benchmarks/test_hf_baseline.py checks the static-cache mode.
    dry=dict(dummy_config="tiny-llama", dtype="float32", num_prompts=4, input_len=24, output_len=4,
             max_num_seqs=2, max_num_batched_tokens=32, hf_batch=2, hf_modes=["static"],
             jpaged_share=0.5),
)
# The server shares the throughput step's engine shape (max_num_seqs, budget, max_model_len), so it
# loads the executables that step compiled instead of compiling them again.
SWEEP = dict(gpu=dict(concurrency=[1, 4, 16, 32]), dry=dict(concurrency=[1, 2]))
# Distributions the device image lacks (or may hold too old), carried as wheels in .whl/ and
# installed by gpu_run.py: pydantic for the server (and what it needs), gguf for GGUF models.
WHEELS = {"pydantic": "2.14.4", "pydantic-core": "2.50.5", "annotated-types": "0.8.0", "typing-inspection": "0.4.5",
          "typing-extensions": "4.16.0", "gguf": "0.19.0"}


def run_cut(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, float]:
    """Runs cmd in its own process group with this process's stdout; kills the whole group after
    timeout seconds. Returns (exit status, or None when cut; seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=sys.stdout, stderr=subprocess.STDOUT)
    try:
        return proc.wait(timeout=max(timeout, 1)), time.monotonic() - start
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return None, time.monotonic() - start


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 5 s (a server drains on SIGTERM)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _write(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _remaining(args) -> float:
    return args.deadline - time.time() - 3  # leaves the step time to write its JSON


def env(args) -> dict:
    """Versions, devices, nvidia-smi and the roofline's two ceilings (copy bandwidth, bf16 matmuls)."""
    import importlib.metadata as md

    import jax

    from benchmarks.roofline import measure_bandwidth, measure_matmul_rate
    from benchmarks.throughput import device_info

    out = args.out / "env.json"
    versions = {}
    for name in ("jax", "jaxlib", "flax", "orbax-checkpoint", "torch", "transformers", "triton", "numpy", *WHEELS):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    smi = shutil.which("nvidia-smi")
    smi_text = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout if smi else "no nvidia-smi"
    res = dict(meta=device_info(), python=platform.python_version(), versions=versions,
               devices=[f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()], backend=jax.default_backend(),
               nvidia_smi=smi_text, missing_wheels=[n for n in WHEELS if versions[n] is None])
    print(f"python {res['python']}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"devices: {res['devices']}\n{smi_text}", flush=True)
    _write(out, res)
    on_gpu = jax.default_backend() == "gpu"
    res["copy_bandwidth_gb_s"] = measure_bandwidth(2**30 if on_gpu else 2**24) / 1e9
    _write(out, res)
    res["bf16_matmul_tflop_s"] = measure_matmul_rate(8192 if on_gpu else 256) / 1e12
    _write(out, res)
    print(f"copy bandwidth {res['copy_bandwidth_gb_s']:.0f} GB/s, bf16 matmul {res['bf16_matmul_tflop_s']:.1f} TFLOP/s")
    return res


def kernel_tests(args) -> dict:
    """The kernel tests compiled for the GPU (interpreted in the dry run), with a pass/fail table."""
    plan = KERNEL_TESTS["dry" if args.dry_run else "gpu"]
    out = args.out / "kernel_tests.json"
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as lines:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_results",
               "-p", "xdist.plugin",  # tests/conftest.py asks for its worker_id
               "-o", "addopts=", *[f"tests/kernels/{f}" for f in plan["files"]], "-k", plan["select"]]
        # Only the plugins named above: others installed here (schemathesis) are not in the GPU image.
        env = os.environ | {"JPAGED_PYTEST_RESULTS": lines.name, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        status, seconds = run_cut(cmd, _remaining(args), env=env)
        rows = [json.loads(line) for line in pathlib.Path(lines.name).read_text().splitlines()]
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    res = dict(command=" ".join(cmd[1:]), exit_status=status, cut=status is None, seconds=seconds, counts=counts,
               tests=rows)
    _write(out, res)
    print(f"\n{'outcome':8} {'s':>7}  test")
    for r in rows:
        print(f"{r['outcome']:8} {r['seconds']:7.2f}  {r['test']}" + (f"  ({r['message']})" if r["message"] else ""))
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + (" (cut at the cap)" if status is None else ""))
    return res


def throughput(args) -> dict:
    """`bench throughput`, jpaged then HF's batch modes, one process each, on the same prompts."""
    plan = THROUGHPUT["dry" if args.dry_run else "gpu"]
    out = args.out / "throughput.json"
    res = dict(plan=plan, runs=[])
    common = ["--dummy-config", plan["dummy_config"], "--dtype", plan["dtype"], "--dataset", "random",
              "--num-prompts", str(plan["num_prompts"]), "--input-len", str(plan["input_len"]),
              "--output-len", str(plan["output_len"]), "--seed", "0"]
    runs = [("jpaged", ["--backend", "jpaged", "--max-num-seqs", str(plan["max_num_seqs"]),
                        "--max-num-batched-tokens", str(plan["max_num_batched_tokens"])])]
    runs += [(f"hf {m}", ["--backend", "hf", "--hf-mode", m, "--max-num-seqs", str(plan["hf_batch"])])
             for m in plan["hf_modes"]]
    for i, (label, extra) in enumerate(runs):
        # jpaged gets its share of the time; each HF mode whatever is left (the last one all of it).
        budget = _remaining(args) * (plan["jpaged_share"] if i == 0 else 1 / (len(runs) - i))
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            print(f"\n== {label} (up to {budget:.0f}s)", flush=True)
            cmd = [sys.executable, "-m", "benchmarks.throughput", *common, *extra, "--output-json", f.name]
            status, seconds = run_cut(cmd, budget)
            text = pathlib.Path(f.name).read_text()
        run = json.loads(text) if status == 0 and text else dict(backend=label.split()[0])
        run.update(label=label, exit_status=status, cut=status is None, wall_seconds=seconds)
        res["runs"].append(run)
        res.update(summarize_throughput(res["runs"]))
        _write(out, res)
    return res


def summarize_throughput(runs: list[dict]) -> dict:
    """jpaged's output tokens/s against HF's best finished mode, and the decode roofline fraction."""
    done = [r for r in runs if "output_tokens_per_s" in r]
    jp = next((r for r in done if r["backend"] == "jpaged"), None)
    hf = max((r for r in done if r["backend"] != "jpaged"), key=lambda r: r["output_tokens_per_s"], default=None)
    return dict(
        jpaged_output_tokens_per_s=jp and jp["output_tokens_per_s"],
        hf_best=hf and hf["label"].split()[1], hf_best_output_tokens_per_s=hf and hf["output_tokens_per_s"],
        speedup=jp["output_tokens_per_s"] / hf["output_tokens_per_s"] if jp and hf else None,
        roofline_fraction=jp and jp["decode_roofline"]["roofline_fraction"],
    )


def sweep(args) -> dict:
    """The article's sweep (sweep.py), HF in the batch mode the throughput step found best."""
    plan, shape = SWEEP["dry" if args.dry_run else "gpu"], THROUGHPUT["dry" if args.dry_run else "gpu"]
    tput = args.out / "throughput.json"
    hf_mode = (json.loads(tput.read_text()).get("hf_best") if tput.is_file() else None) or "static"
    cmd = [sys.executable, "-m", "benchmarks.sweep", "--dummy-config", shape["dummy_config"], "--dtype", shape["dtype"],
           "--concurrency", *map(str, plan["concurrency"]), "--input-len", str(shape["input_len"]),
           "--output-len", str(shape["output_len"]), "--max-num-seqs", str(shape["max_num_seqs"]),
           "--max-num-batched-tokens", str(shape["max_num_batched_tokens"]), "--hf-mode", hf_mode,
           "--startup-timeout", str(int(_remaining(args))), "--out-dir", str(args.out), "--name", "sweep"]
    status, seconds = run_cut(cmd, _remaining(args))
    log = pathlib.Path(tempfile.gettempdir()) / "sweep-server.log"
    if status != 0 and log.is_file():  # why the server failed, into the run's log
        print("== tail of the server's log\n" + "\n".join(log.read_text().splitlines()[-30:]))
    path = args.out / "sweep.json"
    res = json.loads(path.read_text()) if path.is_file() else dict(rows=[])
    res.update(hf_mode=hf_mode, exit_status=status, cut=status is None, wall_seconds=seconds)
    _write(path, res)
    return res


STEPS = dict(env=env, kernel_tests=kernel_tests, throughput=throughput, sweep=sweep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--deadline", type=float, default=None, help="seconds since the epoch (default: in 10 minutes)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    args.deadline = args.deadline or time.time() + 600
    args.out.mkdir(parents=True, exist_ok=True)
    res = STEPS[args.step](args)
    failed = res.get("exit_status") not in (None, 0) if args.step != "throughput" else not res.get("speedup")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
