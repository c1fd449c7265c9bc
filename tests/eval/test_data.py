"""Reading jsonl data (errors name the line) and the resumable sample log."""
import json

import pytest

from m1jax.eval.data import SampleLog, read_jsonl


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_records_and_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", ['{"problem": "1+1", "answer": "2"}', "", '{"problem": "2+2", "answer": 4}'])
    records = read_jsonl(path, required=("problem", "answer"))
    assert [r["answer"] for r in records] == ["2", 4] and [r["_line"] for r in records] == [1, 3]


@pytest.mark.parametrize("lines, match", [
    (['{"problem": "a", "answer": "1"}', '{"problem": "b", "answer": '], r"line 2: not valid JSON"),
    (['{"problem": "a"}'], r"line 1: missing field\(s\) \['answer'\]"),
    (['["problem", "answer"]'], r"line 1: expected a JSON object, got list"),
    ([""], "holds no records"),
])
def test_bad_files_name_the_line(tmp_path, lines, match):
    with pytest.raises(ValueError, match=match):
        read_jsonl(write(tmp_path / "d.jsonl", lines), required=("problem", "answer"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_log_resumes_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    log = SampleLog(path)
    log.append({"key": "a#0", "score": 1.0})
    log.append({"key": "a#1", "score": 0.0})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "b#0", "sco')  # a run killed mid-write
    again = SampleLog(path)
    assert set(again.done) == {"a#0", "a#1"}
    again.append({"key": "b#0", "score": 0.5})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a#0", "a#1", "b#0"]


def test_log_refuses_a_foreign_file(tmp_path):
    path = write(tmp_path / "samples.jsonl", ["not json", '{"key": "a#0"}'])
    with pytest.raises(ValueError, match="line 1: not a sample record"):
        SampleLog(path)
