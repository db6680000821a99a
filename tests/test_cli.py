"""`jpaged generate`, the main job, on the default model."""

import pytest

from jpaged.cli import main


@pytest.mark.default_model
def test_generate_prints_completion_and_throughput(default_llm, capsys):
    rc = main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "16",
               "--max-num-seqs", "8", "--max-model-len", "512", "--max-num-batched-tokens", "128", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Paris" in out
    assert "output tokens/s" in out


def test_generate_bad_flag_value_is_one_line_error(capsys):
    assert main(["generate", "--max-num-seqs", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jpaged generate: error: max_num_seqs must be >= 1, got 0"]
