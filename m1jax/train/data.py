"""Training data: token files packed into rows, and the built-in tasks, behind one seekable interface.

Every data object has `batch(step) -> dict` of numpy arrays
    inputs (B, T) int32, targets (B, T) int32 (next tokens), loss_mask (B, T) float32, segment_ids (B, T) int32,
a position `step` that iteration advances, and `state()` / `restore(state)` to checkpoint that position.
`batch(step)` is a pure function of (seed, step, sizes): it equals the step-th item of iteration from step 0.

Token files (`tokenize_files`): a flat binary of token ids, uint16 when vocab_size <= 65536 else uint32, read
through np.memmap, with a JSON sidecar `<file>.json` that records dtype, vocab_size, eos_id, num_tokens,
num_documents and a crc32, so a missing, truncated or corrupted file is caught on open.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Iterable

import numpy as np

from m1jax.tasks import TASKS, Task, get_task

FORMAT = "m1jax-tokens"
FORMAT_VERSION = 1
CHUNK_TOKENS = 1 << 22  # tokens read at a time when scanning a file
ENCODE_BATCH = 256  # documents encoded per tokenizer call


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sidecar_path(path: str | os.PathLike) -> str:
    return os.fspath(path) + ".json"


def _read_documents(path: str) -> Iterable[str]:
    """One document per file; for `.jsonl`, one per non-blank line, taken from its "text" field. UTF-8 only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist; pass existing text or .jsonl files")
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep the file's line endings
            if not path.endswith(".jsonl"):
                yield f.read()
                return
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(line, f"{path}:{line_number}")
    except UnicodeDecodeError as err:
        raise ValueError(f"input file {path!r} is not UTF-8 text ({err}); convert it to UTF-8") from err


def _jsonl_text(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err}); fix or drop that line") from err
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f'{where} has no string field "text"; each .jsonl line must be an object like '
                         '{"text": "..."}')
    return record["text"]


def _batched(items: Iterable[str], size: int) -> Iterable[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_files(tokenizer, inputs: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Tokenize text files into a token file `out` plus its sidecar `out.json`; returns the sidecar dict.

    A plain file is one document; a `.jsonl` file holds one document per line in its "text" field. Each document
    is followed by the tokenizer's eos id; empty documents are skipped. Writes go to temporary names first, so an
    interrupted run never leaves a file that looks valid.
    """
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos id, which separates documents; give it one "
                         "(tokenizer_config.json eos_token) or use the byte tokenizer")
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise ValueError("inputs is empty; pass at least one text or .jsonl file")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path!r} does not exist; pass existing text or .jsonl files")
    out = os.fspath(out)
    if not os.path.isdir(os.path.dirname(out) or "."):
        raise ValueError(f"the directory of out={out!r} does not exist; create it first")
    dtype = token_dtype(tokenizer.vocab_size)
    crc, num_tokens, num_documents, max_id = 0, 0, 0, -1
    try:
        with open(out + ".tmp", "wb") as f:
            for path in inputs:
                for texts in _batched((t for t in _read_documents(path) if t), ENCODE_BATCH):
                    for ids in tokenizer.encode_batch(texts, add_eos=True):
                        array = np.asarray(ids, np.int64)
                        if array.min() < 0 or array.max() >= tokenizer.vocab_size:
                            raise ValueError(f"the tokenizer produced ids outside [0, {tokenizer.vocab_size}) "
                                             f"for a document of {path!r}; its vocab_size is wrong")
                        data = array.astype(dtype).tobytes()
                        f.write(data)
                        crc = zlib.crc32(data, crc)
                        num_tokens += len(array)
                        num_documents += 1
                        max_id = max(max_id, int(array.max()))
    except BaseException:
        if os.path.exists(out + ".tmp"):
            os.remove(out + ".tmp")
        raise
    if num_tokens == 0:
        os.remove(out + ".tmp")
        raise ValueError(f"inputs {inputs} hold no text; pass non-empty files")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "num_tokens": num_tokens, "num_documents": num_documents,
            "max_token_id": max_id, "num_bytes": num_tokens * dtype.itemsize, "crc32": crc,
            "inputs": [os.path.basename(p) for p in inputs]}
    with open(sidecar_path(out) + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(out + ".tmp", out)
    os.replace(sidecar_path(out) + ".tmp", sidecar_path(out))
    return meta


class TokenFile:
    """A token file opened read-only through np.memmap, checked against its sidecar.

    The size is always checked; the crc32 too unless verify_checksum=False (it reads the whole file once).
    Attributes: path, tokens (memmap, (N,)), dtype, vocab_size, eos_id, num_tokens, num_documents.
    """

    def __init__(self, path: str | os.PathLike, *, verify_checksum: bool = True):
        path = os.fspath(path)
        fix = f"re-create it with `m1jax data tokenize ... --out {path}`"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"token file {path!r} does not exist; {fix}")
        if not os.path.isfile(sidecar_path(path)):
            raise FileNotFoundError(f"token file {path!r} has no sidecar {sidecar_path(path)!r}; {fix}")
        try:
            with open(sidecar_path(path), encoding="utf-8") as f:
                meta = json.load(f)
            dtype = np.dtype(meta["dtype"])
            num_tokens, vocab_size = int(meta["num_tokens"]), int(meta["vocab_size"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"sidecar {sidecar_path(path)!r} is corrupt ({err!r}); {fix}") from err
        if meta.get("format") != FORMAT or dtype not in (np.uint16, np.uint32) or dtype != token_dtype(vocab_size):
            raise ValueError(f"sidecar {sidecar_path(path)!r} does not describe an {FORMAT} file (format "
                             f"{meta.get('format')!r}, dtype {dtype.name}, vocab_size {vocab_size}); {fix}")
        size = os.path.getsize(path)
        if size != num_tokens * dtype.itemsize:
            raise ValueError(f"token file {path!r} has {size} bytes but its sidecar promises {num_tokens} "
                             f"{dtype.name} tokens ({num_tokens * dtype.itemsize} bytes): truncated or replaced; "
                             f"{fix}")
        if num_tokens == 0:
            raise ValueError(f"token file {path!r} holds no tokens; tokenize non-empty inputs")
        self.path, self.meta, self.dtype = path, meta, dtype
        self.vocab_size, self.num_tokens = vocab_size, num_tokens
        self.eos_id, self.num_documents = meta.get("eos_id"), meta.get("num_documents")
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))
        if verify_checksum and self.checksum() != meta.get("crc32"):
            raise ValueError(f"token file {path!r} fails its crc32 check: its contents changed after "
                             f"tokenization; {fix}")

    def __len__(self) -> int:
        return self.num_tokens

    def _chunks(self) -> Iterable[tuple[int, np.ndarray]]:
        for start in range(0, self.num_tokens, CHUNK_TOKENS):
            yield start, np.asarray(self.tokens[start:start + CHUNK_TOKENS])

    def checksum(self) -> int:
        crc = 0
        for _, chunk in self._chunks():
            crc = zlib.crc32(chunk.tobytes(), crc)
        return crc

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError naming the first position whose id is >= vocab_size."""
        for start, chunk in self._chunks():
            bad = np.flatnonzero(chunk >= vocab_size)
            if len(bad):
                position = start + int(bad[0])
                largest = self.meta.get("max_token_id")
                hint = f">= {largest + 1}" if isinstance(largest, int) else "that covers the file's tokenizer"
                raise ValueError(f"token file {self.path!r} holds id {int(chunk[bad[0]])} at position {position}, "
                                 f">= the model's vocab_size {vocab_size}; use a model vocab_size {hint} or "
                                 "re-tokenize with the model's tokenizer")


def _same(saved, value) -> bool:
    """A saved state entry (maybe a numpy scalar after a checkpoint round trip) equals the current one."""
    if isinstance(value, str):
        return str(saved) == value
    try:
        return int(saved) == value
    except (TypeError, ValueError):
        return False


class _Seekable:
    """Iteration over batch(step) with a checkpointable position. Subclasses define `batch` and `_key`."""

    step: int = 0

    def _key(self) -> dict:
        """What must match for a saved position to mean the same data."""
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def state(self) -> dict:
        return {"step": self.step, **self._key()}

    def restore(self, state: dict) -> None:
        for name, value in self._key().items():
            saved = state.get(name)
            if not _same(saved, value):
                raise ValueError(f"cannot restore data position: state has {name}={saved!r} but this data has "
                                 f"{name}={value!r}; build the data with the checkpoint's {name}")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"state step must be >= 0, got {step}")
        self.step = step

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batch(self.step)
        self.step += 1
        return batch


def _check_size(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class PackedTokenData(_Seekable):
    """(B, T) rows cut from a token stream: window w is tokens [w*T, w*T + T + 1) (inputs and shifted targets).

    Windows are visited in a fresh permutation each epoch (seeded by (seed, epoch)); example i = step*B + b is
    window perm_epoch[i % W] of epoch i // W, so batches run across epoch ends without a gap and any step can be
    computed directly. The last partial window of the file is never used.
    segment_ids number the documents within a row from 1; a new document starts after each eos. loss_mask is 0
    where the input is eos (its target is the next document's first token, unpredictable from a document reset
    at the boundary) when mask_document_boundary (default), else 1 everywhere.
    """

    def __init__(self, token_file: TokenFile | str, batch_size: int, seq_len: int, seed: int = 0,
                 *, mask_document_boundary: bool = True):
        self.token_file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        self.batch_size, self.seq_len = _check_size(batch_size, "batch_size"), _check_size(seq_len, "seq_len")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed, self.mask_document_boundary, self.step = int(seed), mask_document_boundary, 0
        self.num_windows = (self.token_file.num_tokens - 1) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(f"seq_len={seq_len} needs {seq_len + 1} tokens per row but {self.token_file.path!r} "
                             f"holds {self.token_file.num_tokens}; lower seq_len or tokenize more text")
        if self.token_file.eos_id is None:
            raise ValueError(f"token file {self.token_file.path!r} records no eos_id; re-tokenize it")
        self.eos_id = int(self.token_file.eos_id)
        self.vocab_size = self.token_file.vocab_size
        self._permutations: dict[int, np.ndarray] = {}

    def _key(self) -> dict:
        return {**super()._key(), "num_windows": self.num_windows}

    @property
    def steps_per_epoch(self) -> float:
        return self.num_windows / self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._permutations[epoch] = rng.permutation(self.num_windows)
        return self._permutations[epoch]

    def window_indices(self, step: int) -> np.ndarray:
        """(B,) window numbers of the rows of batch `step`."""
        examples = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(examples, self.num_windows)
        return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)], np.int64)

    def batch(self, step: int) -> dict:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        T = self.seq_len
        rows = np.stack([np.asarray(self.token_file.tokens[w * T:w * T + T + 1])
                         for w in self.window_indices(int(step))]).astype(np.int32)
        inputs, targets = rows[:, :-1], rows[:, 1:]
        is_eos = inputs == self.eos_id
        segment_ids = 1 + np.cumsum(is_eos, axis=1) - is_eos  # the eos belongs to the document it ends
        loss_mask = ~is_eos if self.mask_document_boundary else np.ones_like(is_eos)
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask.astype(np.float32),
                "segment_ids": segment_ids.astype(np.int32)}


class TaskData(_Seekable):
    """A built-in task (name or Task object) as a seekable data object: batch(step) = task.batch(seed, step, B, T)."""

    def __init__(self, task: Task | str, batch_size: int, seq_len: int, seed: int = 0):
        self.task = get_task(task) if isinstance(task, str) else task
        self.batch_size, self.seq_len = _check_size(batch_size, "batch_size"), _check_size(seq_len, "seq_len")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed, self.step = int(seed), 0
        if self.seq_len < self.task.min_seq_len:
            raise ValueError(f"seq_len={seq_len} is too short for task {self.task.name!r} with "
                             f"{self.task.options()}: it needs seq_len >= {self.task.min_seq_len}; raise seq_len "
                             "or shrink the task options")
        self.vocab_size = self.task.vocab_size

    def _key(self) -> dict:
        return {**super()._key(), "task": self.task.name}

    def batch(self, step: int) -> dict:
        return self.task.batch(self.seed, step, self.batch_size, self.seq_len)

    def accuracy(self, predictions, batch: dict) -> dict:
        return self.task.accuracy(predictions, batch)


def make_data(name_or_path: str | os.PathLike, *, batch_size: int, seq_len: int, seed: int = 0,
              vocab_size: int, max_seq_len: int | None = None, **task_options) -> TaskData | PackedTokenData:
    """A task name ("mqar", "copy", "arith") or a token file path -> a data object checked against the model.

    vocab_size is the model's: the task's ids (or every id in the file) must be below it. max_seq_len, when
    given (e.g. the model's maximum positions), bounds seq_len. task_options go to the task; for a token file
    the only option is mask_document_boundary.
    """
    seq_len = _check_size(seq_len, "seq_len")
    vocab_size = _check_size(vocab_size, "vocab_size")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={max_seq_len}; lower seq_len")
    name = os.fspath(name_or_path)
    if name in TASKS:
        task = get_task(name, **task_options)
        if task.vocab_size > vocab_size:
            raise ValueError(f"task {name!r} uses ids up to {task.vocab_size - 1} but the model's vocab_size is "
                             f"{vocab_size}; raise vocab_size to >= {task.vocab_size} or shrink the task's vocab")
        return TaskData(task, batch_size, seq_len, seed)
    if not os.path.exists(name):
        raise ValueError(f"{name!r} is neither a built-in task {sorted(TASKS)} nor an existing token file; "
                         "tokenize text with `m1jax data tokenize`")
    unknown = sorted(set(task_options) - {"mask_document_boundary"})
    if unknown:
        raise ValueError(f"token file data takes no option(s) {unknown}; only mask_document_boundary")
    token_file = TokenFile(name)
    token_file.check_vocab(vocab_size)
    return PackedTokenData(token_file, batch_size, seq_len, seed, **task_options)
