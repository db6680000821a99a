"""benchmarks/gpu_run.py: the dry run end to end (every promised file, steps in order, imports the
GPU image holds), a step cut at its cap while the run goes on, and the near-tie rule. The dry run
also serves as the end-to-end test of the kernel benchmark and the sweep it runs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import gpu_model_check, gpu_run
from benchmarks.gpu_steps import THROUGHPUT, WHEELS

ROOT = pathlib.Path(__file__).resolve().parents[2]
FILES = {"env.json", "kernel_tests.json", "kernel_bench.json", "model.json", "throughput.json", "sweep.json", "run.log",
         "sweep.png"}
OWN = {"jpaged", "pallas_kernels", "benchmarks", "convert", "serve", "tests", "conftest", "kernel_cases",
       "sitecustomize", "__main__", "__mp_main__"}
# Imported here but not needed on the image: optional imports (the importer checks they are
# installed) and the dependencies of newer versions than the image's of packages it holds.
OPTIONAL = {
    "openai": "optional wherever it is imported",
    "kernels": "transformers' hub kernels, used when installed",
    "httpx2": "huggingface_hub 2.x here; the image's 1.33 uses httpx",
    "httpcore2": "httpx2's",
    "truststore": "httpx2's",
    "sniffio": "httpx2's (the image's anyio needs none)",
    "cython_runtime": "made by Cython extensions at import, no distribution",
}

RECORDER = '''
import atexit, os, sys

def _dump():
    with open(os.path.join(os.environ["JPAGED_IMPORT_LOG"], f"{os.getpid()}.txt"), "w") as f:
        f.write("\\n".join(sorted({name.split(".")[0] for name in list(sys.modules)})))

if os.environ.get("JPAGED_IMPORT_LOG"):
    atexit.register(_dump)
'''


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One whole dry run, every Python process in it recording the top-level modules it imported."""
    root = tmp_path_factory.mktemp("dry")
    (root / "recorder").mkdir()
    (root / "recorder" / "sitecustomize.py").write_text(RECORDER)
    (root / "imports").mkdir()
    env = os.environ | dict(JPAGED_IMPORT_LOG=str(root / "imports"),
                            PYTHONPATH=os.pathsep.join([str(root / "recorder"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "benchmarks/gpu_run.py", "--dry-run", "--out", str(root / "out"),
                           "--home", str(root / "home")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    return proc, root / "out", root / "imports"


def test_dry_run_writes_every_promised_file(dry_run):
    proc, out, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {f.name for f in out.iterdir()} == FILES
    steps = {name: json.loads((out / name).read_text()) for name in FILES if name.endswith(".json")}
    order = [s.name for s in gpu_run.STEPS]
    for name, data in steps.items():
        step = data["step"]
        assert step["status"] == "ok" and step["index"] == order.index(step["name"]) and step["seconds"] <= step["cap_s"]
    env, tests, bench = steps["env.json"], steps["kernel_tests.json"], steps["kernel_bench.json"]
    assert env["copy_bandwidth_gb_s"] > 0 and env["bf16_matmul_tflop_s"] > 0 and env["versions"]["jax"]
    assert tests["counts"]["passed"] > 0 and tests["counts"]["failed"] == tests["counts"]["error"] == 0
    # The kernel_bench step is benchmarks/kernel_bench.py --quick end to end (interpret mode).
    assert {"device", "jax_version", "date", "git_commit", "copy_bandwidth_gbps"} <= bench.keys()
    assert {r["impl"] for r in bench["rows"]} == {"pallas_decode", "pallas_ragged", "xla_model", "xla_reference"}
    assert all(r["us_per_call"] > 0 for r in bench["rows"])
    model = steps["model.json"]
    assert model["ok"] and len(model["checks"]) == 3 and len(model["runs"]) == 2  # float32 only in the dry run
    tput = steps["throughput.json"]
    modes = THROUGHPUT["dry"]["hf_modes"]
    assert [r["label"] for r in tput["runs"]] == ["jpaged"] + [f"hf {m}" for m in modes]
    assert tput["speedup"] > 0 and tput["roofline_fraction"] > 0 and tput["hf_best"] in modes
    # The sweep step is benchmarks/sweep.py end to end at a tiny shape (jpaged served over HTTP,
    # HF batches): both complete every request.
    sweep = steps["sweep.json"]
    assert {(r["system"], r["concurrency"]) for r in sweep["rows"]} == {(s, c) for s in ("jpaged", "hf") for c in (1, 2)}
    for r in sweep["rows"]:
        assert r["failed"] == 0 and r["num_requests"] == 4
        assert r["requests_per_s"] == pytest.approx(r["num_requests"] / r["seconds"], rel=1e-6)
        assert 0 < r["mean_ttft_ms"] < 1000 * r["seconds"] and r["peak_memory_mib"] > 100
    assert sweep["hf_mode"] == tput["hf_best"]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    log = (out / "run.log").read_text()
    assert "vs HF" in log and "pallas_decode" in log  # the sweep's and the kernel bench's tables


def test_dry_run_log_holds_steps_in_order_and_the_table(dry_run):
    proc, out, _ = dry_run
    log = (out / "run.log").read_text()
    starts = [log.index(f"== step {s.name} (") for s in gpu_run.STEPS]
    assert starts == sorted(starts)
    table = proc.stdout[proc.stdout.index("\nstep "):]
    assert [line.split()[0] for line in table.strip().splitlines()[1:7]] == [s.name for s in gpu_run.STEPS]
    assert "(incomplete)" not in table, table


def test_gpu_steps_import_only_what_the_image_holds(dry_run):
    """Every distribution a step's processes imported is in the GPU image or carried as a wheel."""
    _, _, imports = dry_run
    lines = (ROOT / "benchmarks" / "gpu_image_packages.txt").read_text().splitlines()
    allowed = {_norm(x) for x in lines if x and not x.startswith("#")} | {_norm(w) for w in WHEELS}
    dists = importlib.metadata.packages_distributions()
    modules = set()
    for f in imports.iterdir():
        modules |= set(f.read_text().split())
    assert len(list(imports.iterdir())) >= 8, "the recorder missed the steps' processes"
    assert {"jax", "torch", "transformers", "aiohttp", "pydantic"} <= modules
    missing = {}
    for module in modules - OWN - set(OPTIONAL) - set(sys.stdlib_module_names) - set(sys.builtin_module_names):
        names = dists.get(module)
        if names is None:
            if module.startswith("_") or module.startswith("test_"):  # private parts of the above, test modules
                continue
            missing[module] = "no distribution"
        elif not {_norm(n) for n in names} & allowed:
            missing[module] = names
    assert not missing, f"imported by the GPU steps, absent from the image and not carried: {missing}"


def test_a_step_over_its_cap_is_cut_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def command(step, out, deadline, dry_run):
        if step == "env":  # writes part of its JSON, then overruns
            return [sys.executable, "-c", f"import json, time; open({str(out / 'env.json')!r}, 'w').write("
                    f"json.dumps(dict(versions={{}}))); print('env started', flush=True); time.sleep(60)"]
        return [sys.executable, "-c", f"print('{step} ran')"]

    monkeypatch.setattr(gpu_run, "step_command", command)
    status = gpu_run.main(["--out", str(tmp_path), "--steps", "env,kernel_tests", "--cap", "env=2",
                           "--home", str(tmp_path / "home")])
    assert status == 1
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["versions"] == {} and env["step"]["status"] == "cut" and 2 <= env["step"]["seconds"] < 15
    tests = json.loads((tmp_path / "kernel_tests.json").read_text())["step"]
    assert tests["status"] == "ok" and tests["index"] == 1
    log = (tmp_path / "run.log").read_text()
    assert log.index("env started") < log.index("== step env: cut") < log.index("kernel_tests ran")


def test_total_cap_skips_steps_it_has_no_time_for(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_run, "step_command", lambda step, *a: [sys.executable, "-c", "import time; time.sleep(30)"])
    gpu_run.main(["--out", str(tmp_path), "--steps", "env,kernel_tests", "--total-cap", "6", "--home", str(tmp_path)])
    assert json.loads((tmp_path / "env.json").read_text())["step"]["status"] == "cut"
    assert json.loads((tmp_path / "kernel_tests.json").read_text())["step"]["status"] == "skipped"


def _run(tokens, logprobs):
    return dict(tokens=tokens, logprobs=[[{str(t): lp for t, lp in step.items()} for step in seq] for seq in logprobs])


def test_compare_allows_near_ties_only():
    ref = _run([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]],
               [[{1: -0.1}, {2: -0.1}, {3: -0.1}],
                [{4: -0.1}, {5: -0.60, 9: -0.62}, {6: -0.1}],
                [{7: -0.1}, {8: -0.1, 5: -3.0}, {9: -0.1}],
                [{1: -0.1}, {1: -0.1, 2: -0.12}, {1: -0.1}]])
    run = _run([[1, 2, 3], [4, 9, 0], [7, 5, 9], [1, 7, 1]], [[{}] * 3] * 4)
    res = gpu_model_check.compare(run, ref, tolerance=0.05)
    assert [r["verdict"] for r in res["sequences"]] == ["equal", "near-tie", "mismatch", "mismatch"]
    assert res["sequences"][1]["first_diff"] == 1 and res["sequences"][1]["gap"] == pytest.approx(0.02)
    assert not res["ok"] and (res["num_equal"], res["num_near_tie"]) == (1, 1)
    assert gpu_model_check.compare(ref, ref, tolerance=0.0)["ok"]


def test_goldens_cover_every_plan():
    goldens = json.loads(gpu_model_check.GOLDENS.read_text())
    assert goldens["meta"]["jax"] and "CPU" in goldens["meta"]["device"]
    assert len(gpu_model_check.PLANS["gpu"]["dtypes"]) == 2
    for name, plan in gpu_model_check.PLANS.items():
        assert [len(t) for t in goldens[name]["tokens"]] == [plan["max_tokens"]] * len(plan["prompt_lens"])
        assert all(len(lp) == plan["max_tokens"] for lp in goldens[name]["logprobs"])


def test_standin_weights_are_the_same_everywhere(tmp_path):
    """numpy's PCG64 alone: the same seed gives the same bytes on any machine (checksummed here)."""
    import hashlib

    folder = gpu_model_check.write_standin(gpu_model_check.PLANS["dry-run"], tmp_path)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    again = gpu_model_check.write_standin(gpu_model_check.PLANS["dry-run"], tmp_path / "again")
    assert hashlib.sha256((again / "model.safetensors").read_bytes()).hexdigest() == digest


def test_readme_recipe_downloads_every_wheel():
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    for name, version in WHEELS.items():
        assert f"{name}=={version}" in readme, f"benchmarks/README.md's pip download lacks {name}=={version}"
