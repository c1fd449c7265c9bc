"""`m1jax eval` end to end on a tiny random checkpoint: every suite, resume, settings pinning, bad inputs.

Every run here uses the same generation shapes (3 rows + 1 filler, prompts padded to 1024, 4 new tokens, the same
sampling), so the whole module compiles the generation steps once.
"""
import json

import pytest

from m1jax.cli import main as m1jax_main
from m1jax.eval import runner
from m1jax.eval.cli import eval_main
from m1jax.eval.math_suite import MathSuite
from m1jax.tokenizer import ByteTokenizer

SHAPES = ["--max-new-tokens", "4", "--batch-size", "3", "--pad-multiple", "1024", "--quiet"]


def run(checkpoint, out, *extra):
    assert eval_main(["--checkpoint", checkpoint, "--out", str(out), *SHAPES, *extra]) == 0
    with open(out / "results.json") as f:
        result = json.load(f)
    lines = (out / "samples.jsonl").read_text().splitlines()
    return result, [json.loads(line) for line in lines], (out / "results.md").read_text()


@pytest.fixture
def count_generated(monkeypatch):
    calls = []
    real = runner.generate_texts

    def counting(model, params, tokenizer, prompts, **kw):
        calls.append(len(prompts))
        return real(model, params, tokenizer, prompts, **kw)

    monkeypatch.setattr(runner, "generate_texts", counting)
    return calls


def test_math_end_to_end_and_resume(tiny_checkpoint, tmp_path, count_generated):
    data = tmp_path / "math.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n{"id": "p2", "problem": "2+3?", "answer": 5}\n')
    out = tmp_path / "out"
    result, samples, table = run(tiny_checkpoint, out, "--suite", "math", "--data", str(data), "--samples", "2")
    assert count_generated == [3, 1]
    assert sorted(s["key"] for s in samples) == ["line1#0", "line1#1", "p2#0", "p2#1"]
    assert all(s["completion_tokens"] <= 4 and s["score"] in (0.0, 1.0) for s in samples)
    mean = sum(s["score"] for s in samples) / 4
    assert result["summary"]["pass@1"] == pytest.approx(mean) and "pass@2" in result["summary"]
    assert result["settings"]["prompt_format"] == "plain" and "| pass@1 |" in table

    count_generated.clear()
    again, samples_again, _ = run(tiny_checkpoint, out, "--suite", "math", "--data", str(data), "--samples", "2")
    assert count_generated == [] and samples_again == samples and again["summary"] == result["summary"]
    _, more, _ = run(tiny_checkpoint, out, "--suite", "math", "--data", str(data), "--samples", "3")
    assert count_generated == [2] and len(more) == 6 and more[:4] == samples

    with pytest.raises(ValueError, match="other settings.*max_new_tokens: 4 -> 5"):
        eval_main(["--checkpoint", tiny_checkpoint, "--out", str(out), "--suite", "math", "--data", str(data),
                   "--max-new-tokens", "5", "--quiet"])


def test_code_and_long_end_to_end(tiny_checkpoint, tmp_path):
    result, samples, table = run(tiny_checkpoint, tmp_path / "code", "--suite", "code", "--limit", "2")
    assert sorted(s["id"] for s in samples) == ["m1jax/0", "m1jax/1"]
    assert sum(result["summary"]["outcomes"].values()) == 2 and "outcomes:" in table

    result, samples, table = run(tiny_checkpoint, tmp_path / "long", "--suite", "long", "--lengths", "1K",
                                 "--limit", "1")
    assert len(samples) == 6 and all(s["prompt_tokens"] <= 1024 for s in samples)
    scores = result["summary"]["scores"]
    assert set(scores) == {"niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "mrcr"}
    assert result["summary"]["by_length"]["1024"] == pytest.approx(sum(s["score"] for s in samples) / 6)
    assert "| task | 1K |" in table


def test_bad_inputs(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        m1jax_main(["eval", "--checkpoint", tiny_checkpoint, "--suite", "poetry"])
    assert "invalid choice: 'poetry'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{"problem": "y"}\n')
    assert m1jax_main(["eval", "--checkpoint", tiny_checkpoint, "--suite", "math", "--data", str(bad),
                       "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "line 2: missing field(s) ['answer']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="drop --data"):
        eval_main(["--checkpoint", tiny_checkpoint, "--suite", "long", "--data", str(bad), "--quiet"])
    with pytest.raises(FileNotFoundError, match="--data"):
        eval_main(["--checkpoint", tiny_checkpoint, "--suite", "math", "--data", str(tmp_path / "no.jsonl")])
    suite = MathSuite([{"problem": "1+1", "answer": "2", "_line": 1}])
    with pytest.raises(ValueError, match="identical samples"):
        runner.run_eval(suite, None, None, ByteTokenizer(), out=str(tmp_path / "g"), samples=2, temperature=0.0)
    with pytest.raises(ValueError, match="--samples"):
        runner.run_eval(suite, None, None, ByteTokenizer(), out=str(tmp_path / "g"), samples=0)


def test_filler_rows_and_padding_leave_completions_unchanged(tiny_checkpoint):
    """The batch the runner builds (bucketed width, filler rows) against generate() on the prompts alone, greedy.
    Fixed weights and prompts: deterministic, nothing drawn."""
    from m1jax.checkpoint.load import load_any
    from m1jax.inference import generate
    from m1jax.model import M1ForCausalLM
    config, params = load_any(tiny_checkpoint)
    model, tokenizer = M1ForCausalLM(config), ByteTokenizer()
    prompts = [tokenizer.encode("What is 2 + 3?"), tokenizer.encode("Name a prime number larger than ten.")]
    batched = runner.generate_texts(model, params, tokenizer, prompts, max_new_tokens=4, temperature=0.0,
                                    top_p=None, top_k=None, seed=0, chunk_size=4096, batch_size=3, pad_multiple=64)
    alone = generate(model, params, prompts, max_new_tokens=4, eos_id=tokenizer.eos_id)
    for (text, n), ids in zip(batched, alone.completions):
        assert n == len(ids) and text == tokenizer.decode([i for i in ids if i < tokenizer.eos_id])
