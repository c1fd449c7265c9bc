"""`m1jax generate` on a small Hugging Face directory with the byte tokenizer: streamed text, and --json."""
import io
import json

import pytest

from m1jax import save_pretrained
from m1jax.cli import parse_args
from m1jax.inference import cli
from m1jax.tokenizer import ByteTokenizer


def generate_main(argv, out):
    """`m1jax generate ARGV` as the command line runs it, printing into `out`."""
    return cli.generate_main(parse_args(["generate", *argv]), out=out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config, tiny_params):
    directory = tmp_path_factory.mktemp("hf")
    save_pretrained(directory, tiny_config, tiny_params)
    return str(directory)


def test_json_then_streamed_text_agree(checkpoint, tmp_path):
    common = ["--checkpoint", checkpoint, "--max-new-tokens", "5", "--chunk-size", "4"]
    out = io.StringIO()
    assert generate_main(common + ["--prompt", "héllo", "--json"], out=out) == 0
    result = json.loads(out.getvalue())
    assert result["prompt_ids"] == ByteTokenizer().encode("héllo")
    assert len(result["completion_ids"]) == 5 or result["stopped"]
    usage = result["usage"]
    assert usage["prompt_tokens"] == 6 and usage["completion_tokens"] == len(result["completion_ids"])
    assert len(result["routing"]["tokens_per_expert"]) == 4

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("héllo", encoding="utf-8")
    streamed = io.StringIO()
    assert generate_main(common + ["--prompt-file", str(prompt_file)], out=streamed) == 0
    text, _, summary = streamed.getvalue().partition("\n\n")
    assert text == result["text"]
    assert summary.startswith("usage: prompt 6 tokens") and "routing:" in summary and "layer   3 softmax" in summary


def test_cli_errors_are_clear(checkpoint, tmp_path, capsys):
    with pytest.raises(ValueError, match="empty"):
        generate_main(["--checkpoint", checkpoint, "--prompt", ""], out=io.StringIO())
    with pytest.raises(SystemExit) as exit_info:  # a usage error: exit status 2, the flag named
        generate_main(["--checkpoint", checkpoint, "--prompt-file", str(tmp_path / "missing.txt")], out=io.StringIO())
    assert exit_info.value.code == 2
    assert "--prompt-file" in capsys.readouterr().err
    for flag, value in (("--max-new-tokens", "0"), ("--top-p", "0"), ("--top-k", "-2"), ("--chunk-size", "0")):
        with pytest.raises(SystemExit):
            generate_main(["--checkpoint", checkpoint, "--prompt", "x", flag, value], out=io.StringIO())
        assert f"argument {flag}: expected" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_main(["--checkpoint", checkpoint, "--prompt", "x", "--max-new-tokens", "70000"], out=io.StringIO())
