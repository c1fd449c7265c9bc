"""Evaluation files: jsonl inputs checked line by line, and the resumable log of scored samples.

    records = read_jsonl("aime.jsonl", required=("problem", "answer"))   # ValueError names file, line and field
    log = SampleLog("runs/eval/samples.jsonl")                            # what an earlier run already scored
    log.done                                                              # {key: record}
    log.append(record)                                                    # one line, flushed and fsynced

A sample's key is "<item id>#<sample index>". A run killed mid-write leaves at most one partial last line: the
log drops it (and rewrites the file without it), so that sample is simply generated again.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence


def read_jsonl(path: str | os.PathLike, *, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The records of a jsonl file (blank lines skipped), each an object holding every `required` field."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist; pass --data with a .jsonl file")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno}); "
                                 "each line must hold one JSON object") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            missing = [name for name in required if name not in record]
            if missing:
                raise ValueError(f"{path} line {number}: missing field(s) {missing} (has {sorted(record)}); "
                                 f"every record needs {list(required)}")
            records.append(record | {"_line": number})
    if not records:
        raise ValueError(f"data file {path!r} holds no records")
    return records


def sample_key(item_id: str, sample: int) -> str:
    return f"{item_id}#{sample}"


class SampleLog:
    """An append-only jsonl of scored samples; `done` maps each key already written to its record."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.done: dict[str, dict[str, Any]] = {}
        if os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        good = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                key = record["key"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if number == len(lines):  # a write cut short by a crash: drop it, it is generated again
                    with open(self.path, "w", encoding="utf-8") as out:
                        out.writelines(good)
                    break
                raise ValueError(f"{self.path} line {number}: not a sample record; this file is written by "
                                 "`m1jax eval`; remove it or pick another --out") from None
            good.append(line if line.endswith("\n") else line + "\n")
            self.done[key] = record
        else:
            if lines and not lines[-1].endswith("\n"):  # complete but unterminated: end it before appending
                with open(self.path, "w", encoding="utf-8") as out:
                    out.writelines(good)

    def append(self, record: dict[str, Any]) -> None:
        if "key" not in record:
            raise ValueError("a sample record needs a 'key'")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[record["key"]] = record

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.append(record)
