"""Several processes as one server (jax.distributed, gloo on CPU): `jpaged serve` with the
multi-host flags on localhost, each process one host device, against the official openai client.

The model: a tiny Llama with 6 query heads and 1 KV head, so 2 and 3 devices both split it.
The reference: the same model in this process on one device (the offline engine).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.serve.conftest import ServerProcess

PROMPTS = [[5, 6, 7, 8], [11, 3, 90, 41, 7, 100, 2, 64, 9], [150]]
MAX_TOKENS = 8
ENGINE_ARGS = ["--warmup", "lazy", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "64",
               "--num-kv-blocks", "24"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, jpaged_home):
    import torch
    import transformers

    from convert.convert import convert_checkpoint
    from tests.conftest import _BASE

    root = tmp_path_factory.mktemp("six_heads")
    config = transformers.LlamaConfig(**{**_BASE, "vocab_size": 168, "intermediate_size": 96,
                                         "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 1})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "hf")
    convert_checkpoint(root / "hf", root / "converted", progress=False)
    return root / "converted"


@pytest.fixture(scope="module")
def reference(model):
    from jpaged import LLM, SamplingParams

    llm = LLM(str(model), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """P `jpaged serve` processes on localhost: process 0 serves HTTP, the others are workers."""

    def __init__(self, model, num_processes: int, tmp_path):
        port = _free_port()
        flags = ["--model", str(model), "-tp", str(num_processes), *ENGINE_ARGS,
                 "--distributed-coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes)]
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        self.workers = [
            subprocess.Popen([sys.executable, "-m", "jpaged", "serve", *flags, "--process-id", str(i)],
                             stdout=open(tmp_path / f"worker{i}.log", "w"), stderr=subprocess.STDOUT, env=env)
            for i in range(1, num_processes)
        ]
        old = os.environ.get("XLA_FLAGS")
        os.environ["XLA_FLAGS"] = env["XLA_FLAGS"]  # ServerProcess passes this process's environment
        try:
            self.leader = ServerProcess([*flags, "--process-id", "0"], tmp_path / "leader.log")
        finally:
            if old is None:
                del os.environ["XLA_FLAGS"]
            else:
                os.environ["XLA_FLAGS"] = old

    def close(self):
        for p in [self.leader.proc, *self.workers]:
            if p.poll() is None:
                p.kill()
                p.wait()


def _greedy_tokens(client, prompt) -> list[int]:
    r = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # gone


def test_three_processes_match_one_device_and_stop_together(model, reference, tmp_path):
    group = Group(model, 3, tmp_path)
    try:
        client = group.leader.wait_ready().openai()
        assert [_greedy_tokens(client, p) for p in PROMPTS] == reference
        assert "in 3 processes" in group.leader.log()  # the start-up line names the group
        assert group.leader.stop() == 0  # SIGTERM: drained, then the workers are told to stop
        assert [w.wait(30) for w in group.workers] == [0, 0]
    finally:
        group.close()


def test_a_dead_worker_gives_503_and_a_nonzero_exit(model, reference, tmp_path):
    group = Group(model, 2, tmp_path)
    try:
        client = group.leader.wait_ready().openai()
        assert _greedy_tokens(client, PROMPTS[0]) == reference[0]
        group.workers[0].send_signal(signal.SIGKILL)
        group.workers[0].wait()
        deadline, seen = time.monotonic() + 20, set()
        while time.monotonic() < deadline and group.leader.proc.poll() is None:
            seen.add(_health(group.leader.url))
            time.sleep(0.2)
        assert 503 in seen, (seen, group.leader.log()[-2000:])  # the idle ping found it
        assert group.leader.proc.wait(20) == 1
    finally:
        group.close()


@pytest.mark.parametrize("argv, message", [
    (["--num-processes", "2"], "2 processes need a coordinator address"),
    (["--distributed-coordinator", "host-without-port", "--num-processes", "2"], "must be HOST:PORT"),
    (["--distributed-coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "process_id must be in [0, 2)"),
])
def test_bad_group_flags_fail_before_anything_starts(argv, message, capsys):
    from jpaged.cli import main as cli_main

    assert cli_main(["serve", "--model", "some/model", *argv]) == 1
    assert message in capsys.readouterr().err


def test_group_flags_come_from_the_environment_and_flags_win(monkeypatch):
    from jpaged.parallel import DistributedConfig

    monkeypatch.setenv("JPAGED_COORDINATOR_ADDRESS", "10.0.0.1:8476")
    monkeypatch.setenv("JPAGED_NUM_PROCESSES", "2")
    monkeypatch.setenv("JPAGED_PROCESS_ID", "1")
    assert DistributedConfig.resolve() == DistributedConfig("10.0.0.1:8476", 2, 1)
    assert DistributedConfig.resolve(process_id=0).process_id == 0
    monkeypatch.setenv("JPAGED_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JPAGED_PROCESS_ID must be an integer"):
        DistributedConfig.resolve()
