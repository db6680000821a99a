"""`jpaged generate`, the main job, on the default model; CLI errors are one line."""

import json

import pytest

from jpaged.cli import main

SMALL = ["--max-num-seqs", "8", "--max-model-len", "512", "--max-num-batched-tokens", "128", "--no-progress"]


@pytest.mark.default_model
def test_generate_prints_completion_and_throughput(default_llm, capsys):
    rc = main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "16", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Paris" in out
    assert "output tokens/s" in out


@pytest.mark.default_model
def test_generate_reads_prompts_file_with_sampling_flags(default_llm, tmp_path, capsys):
    ids = default_llm.get_tokenizer().encode("The capital of France is")
    path = tmp_path / "prompts.jsonl"
    path.write_text("Once upon a time\n" + json.dumps({"prompt_token_ids": ids}) + "\n\n")
    rc = main(["generate", "--prompts-file", str(path), "--max-tokens", "6", "--temperature", "0.8", "--top-p", "0.9",
               "--sampling-seed", "1", "-n", "2", "--ignore-eos", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0
    assert ">>> Once upon a time" in out and f">>> {ids}" in out
    assert out.count("[6 tokens, length]") == 4  # 2 prompts x n=2
    assert "2 requests" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-num-seqs", "0"], "max_num_seqs must be >= 1, got 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        (["--prompts-file", "/nonexistent/prompts.txt"], "No such file"),
    ],
)
def test_generate_bad_input_is_one_line_error(argv, message, capsys):
    assert main(["generate", "--no-progress", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jpaged generate: error:") and message in err[0], err
