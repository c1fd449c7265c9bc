"""Token files, packing with segment ids, seekable data objects and their checks."""
import json
import os

import numpy as np
import pytest

from m1jax.tokenizer import ByteTokenizer, train_bpe
from m1jax.train.data import PackedTokenData, TaskData, TokenFile, make_data, tokenize_files
from m1jax.tasks import get_task

WORDS = ["alpha", "beta", "gamma", "delta", "lightning", "attention", "état", "漢字", "\n", "42"]


def random_documents(rng, count):
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(count)]


@pytest.fixture
def corpus(tmp_path, rng):
    """Two plain-text files (one document each) and a .jsonl file (one document per line), drawn from `rng`."""
    docs = random_documents(rng, 12)
    (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
    (tmp_path / "b.md").write_text(docs[1], encoding="utf-8")
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[2:])]
    lines.insert(3, "   ")  # blank lines are skipped
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths = [str(tmp_path / n) for n in ("a.txt", "b.md", "c.jsonl")]
    return paths, docs


@pytest.fixture
def bpe(tmp_path, corpus):
    return train_bpe(corpus[1] * 3, 300, str(tmp_path / "tokenizer.json"))


def test_tokenize_round_trip_with_a_tiny_bpe(tmp_path, corpus, bpe):
    paths, docs = corpus
    out = str(tmp_path / "tokens.bin")
    meta = tokenize_files(bpe, paths, out)
    assert meta["dtype"] == "uint16" and meta["num_documents"] == len(docs) and meta["eos_id"] == bpe.eos_id
    expected = [i for d in docs for i in bpe.encode(d) + [bpe.eos_id]]
    assert meta["num_tokens"] == len(expected) and meta["max_token_id"] == max(expected)
    token_file = TokenFile(out)
    assert token_file.tokens.dtype == np.uint16 and token_file.vocab_size == bpe.vocab_size
    np.testing.assert_array_equal(token_file.tokens, expected)
    ends = np.flatnonzero(token_file.tokens == bpe.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert [bpe.decode(token_file.tokens[s:e]) for s, e in zip(starts, ends)] == docs
    assert not os.path.exists(out + ".tmp")


class WideTokenizer(ByteTokenizer):
    """A byte tokenizer whose ids are shifted past 65536, so files need uint32."""

    vocab_size = 70_000
    eos_id = 69_999

    def encode(self, text, *, add_bos=False, add_eos=False):
        return [66_000 + i for i in super().encode(text)] + ([self.eos_id] if add_eos else [])


def test_wide_vocab_uses_uint32(tmp_path, corpus):
    out = str(tmp_path / "wide.bin")
    tokenize_files(WideTokenizer(), corpus[0][:1], out)
    token_file = TokenFile(out)
    assert token_file.dtype == np.uint32 and token_file.tokens.max() == 69_999
    document_bytes = np.frombuffer(corpus[1][0].encode(), np.uint8).astype(np.int64)
    np.testing.assert_array_equal(token_file.tokens[:-1], 66_000 + document_bytes)


def test_corrupt_or_missing_files_raise_naming_the_path(tmp_path, corpus):
    out = str(tmp_path / "tokens.bin")
    tokenize_files(ByteTokenizer(), corpus[0], out)
    data = open(out, "rb").read()
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        TokenFile(tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match="no such.txt"):
        tokenize_files(ByteTokenizer(), [str(tmp_path / "no such.txt")], out + "2")
    open(out, "wb").write(data[:-2])  # truncated by one uint16 token
    with pytest.raises(ValueError, match=f"{out}.*truncated"):
        TokenFile(out)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    open(out, "wb").write(bytes(flipped))
    with pytest.raises(ValueError, match=f"{out}.*crc32"):
        TokenFile(out)
    TokenFile(out, verify_checksum=False)  # the size still matches, so only the checksum can tell
    open(out, "wb").write(data)
    meta = json.load(open(out + ".json"))
    json.dump({**meta, "dtype": "float32"}, open(out + ".json", "w"))
    with pytest.raises(ValueError, match="does not describe an m1jax-tokens file"):
        TokenFile(out)
    open(out + ".json", "w").write("{ truncated")
    with pytest.raises(ValueError, match="sidecar .* is corrupt"):
        TokenFile(out)
    os.remove(out + ".json")
    with pytest.raises(FileNotFoundError, match="has no sidecar"):
        TokenFile(out)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt' is not UTF-8 text"):
        tokenize_files(ByteTokenizer(), [str(tmp_path / "latin1.txt")], out)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string field \"text\""):
        tokenize_files(ByteTokenizer(), [str(tmp_path / "bad.jsonl")], out)


def test_check_vocab_names_the_first_bad_position(tmp_path, corpus):
    out = str(tmp_path / "tokens.bin")
    tokenize_files(ByteTokenizer(), corpus[0], out)
    token_file = TokenFile(out)
    token_file.check_vocab(260)
    tokens = np.asarray(token_file.tokens)
    first_bad = int(np.flatnonzero(tokens >= 200)[0])
    with pytest.raises(ValueError, match=f"id {tokens[first_bad]} at position {first_bad}, >= the model's vocab"):
        token_file.check_vocab(200)
    with pytest.raises(ValueError, match="use a model vocab_size >= 259"):
        make_data(out, batch_size=2, seq_len=8, vocab_size=258)


def slow_segment_ids(row, eos_id):
    ids, current = [], 1
    for token in row:
        ids.append(current)
        current += token == eos_id
    return ids


@pytest.fixture
def packed_file(tmp_path, rng):
    """Short random documents of random byte tokens, so rows hold several documents."""
    (tmp_path / "docs.jsonl").write_text("".join(
        json.dumps({"text": "".join(rng.choice(list("abcdef"), size=rng.integers(1, 12)))}) + "\n"
        for _ in range(60)))
    out = str(tmp_path / "tokens.bin")
    tokenize_files(ByteTokenizer(), [str(tmp_path / "docs.jsonl")], out)
    return TokenFile(out)


def test_packed_rows_segments_and_masks(packed_file, rng):
    eos = ByteTokenizer.eos_id
    T = 13  # not a divisor of the file length
    data = PackedTokenData(packed_file, batch_size=5, seq_len=T, seed=int(rng.integers(1000)))
    tokens = np.asarray(packed_file.tokens)
    batch = data.batch(4)
    for b, w in enumerate(data.window_indices(4)):
        np.testing.assert_array_equal(batch["inputs"][b], tokens[w * T:w * T + T])
        np.testing.assert_array_equal(batch["targets"][b], tokens[w * T + 1:w * T + T + 1])
        assert batch["segment_ids"][b].tolist() == slow_segment_ids(batch["inputs"][b], eos)
    np.testing.assert_array_equal(batch["loss_mask"], (batch["inputs"] != eos).astype(np.float32))
    assert batch["segment_ids"].max() > 1  # rows do hold several documents
    unmasked = PackedTokenData(packed_file, 5, T, data.seed, mask_document_boundary=False).batch(4)
    assert np.all(unmasked["loss_mask"] == 1)
    # Each epoch visits every window exactly once, in an order that changes between epochs.
    W = data.num_windows
    assert W == (len(tokens) - 1) // T
    steps = -(-2 * W // 5)
    visited = np.concatenate([data.window_indices(s) for s in range(steps)])[:2 * W]
    assert sorted(visited[:W]) == list(range(W)) and sorted(visited[W:]) == list(range(W))
    assert not np.array_equal(visited[:W], visited[W:])


@pytest.mark.parametrize("kind", ["tokens", "task"])
def test_seekable_iteration_and_restore(kind, packed_file, rng):
    seed = int(rng.integers(1000))
    make = (lambda: PackedTokenData(packed_file, 3, 11, seed)) if kind == "tokens" else (
        lambda: TaskData("arith", 3, 29, seed))
    data = make()
    first = [next(data) for _ in range(6)]
    for step, item in enumerate(first):
        for key in item:
            np.testing.assert_array_equal(item[key], data.batch(step)[key])
    saved = make()
    for _ in range(2):
        next(saved)
    state = {k: np.asarray(v) if not isinstance(v, str) else v for k, v in saved.state().items()}
    resumed = make()
    resumed.restore(state)
    assert resumed.step == 2
    for expected, item in zip(first[2:], resumed):
        for key in item:
            np.testing.assert_array_equal(item[key], expected[key])
    other = PackedTokenData(packed_file, 4, 11, seed) if kind == "tokens" else TaskData("arith", 3, 29, seed + 1)
    with pytest.raises(ValueError, match="cannot restore data position"):
        other.restore(state)


def test_make_data_checks_vocab_and_seq_len(packed_file):
    data = make_data("mqar", batch_size=2, seq_len=33, seed=1, vocab_size=256, num_pairs=4)
    assert isinstance(data, TaskData) and data.task == get_task("mqar", num_pairs=4)
    assert data.accuracy(data.batch(0)["targets"], data.batch(0))["accuracy"] == 1.0
    with pytest.raises(ValueError, match="raise vocab_size to >= 260"):
        make_data("arith", batch_size=2, seq_len=40, vocab_size=256)
    with pytest.raises(ValueError, match="seq_len=10 is too short for task 'mqar'"):
        make_data("mqar", batch_size=2, seq_len=10, vocab_size=256, num_pairs=4)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=32"):
        make_data("copy", batch_size=2, seq_len=33, vocab_size=256, max_seq_len=32)
    with pytest.raises(ValueError, match="neither a built-in task"):
        make_data("nope", batch_size=2, seq_len=8, vocab_size=256)
    packed = make_data(packed_file.path, batch_size=2, seq_len=9, seed=3, vocab_size=260)
    assert isinstance(packed, PackedTokenData) and packed.batch(0)["inputs"].shape == (2, 9)
    with pytest.raises(ValueError, match=r"needs \d+ tokens per row but"):
        make_data(packed_file.path, batch_size=2, seq_len=10**6, vocab_size=260)
    with pytest.raises(ValueError, match="takes no option"):
        make_data(packed_file.path, batch_size=2, seq_len=9, vocab_size=260, num_pairs=3)
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        packed.batch(-1)
