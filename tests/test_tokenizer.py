"""Tokenizers: byte-level round trips, a tiny BPE trained here behind the same interface, and loading rules."""
import json
import os
import shutil

import pytest

from m1jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

M1_TOKENIZER_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "minimax-m1",
                                   "tokenizer_config.json")
ALPHABET = list("abcdefgh xyz,.!?\n\t0123456789") + ["é", "ü", "漢", "字", "🙂", "ß"]


def random_texts(rng, count, max_len=40):
    return ["".join(rng.choice(ALPHABET, size=rng.integers(0, max_len))) for _ in range(count)]


@pytest.fixture
def bpe(tmp_path, rng):
    corpus = random_texts(rng, 200) + ["the cat sat on the mat. " * 10]
    return train_bpe(corpus, 320, str(tmp_path / "tokenizer.json"))


def test_byte_round_trip_and_specials(rng):
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 and len(set(tok.special_ids)) == 4
    assert all(256 <= i < tok.vocab_size for i in tok.special_ids)
    for text in random_texts(rng, 20):
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert ids[1:-1] == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode([tok.pad_id, *ids, tok.sep_id, tok.pad_id]) == text


def test_byte_decode_replaces_invalid_utf8_and_rejects_bad_ids():
    tok = ByteTokenizer()
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"
    assert tok.decode(tok.encode("漢")[:2]) == "\ufffd"
    with pytest.raises(ValueError, match="ids must lie in"):
        tok.decode([260])
    with pytest.raises(ValueError, match="ids must lie in"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="text must be a str"):
        tok.encode(b"bytes")


def test_bpe_round_trip_and_interface(bpe, rng):
    assert isinstance(bpe, HFTokenizer) and bpe.vocab_size == 320
    assert bpe.bos_id is not None and bpe.eos_id is not None and bpe.bos_id != bpe.eos_id
    texts = random_texts(rng, 30)
    batch = bpe.encode_batch(texts, add_eos=True)
    for text, ids in zip(texts, batch):
        assert ids == bpe.encode(text, add_eos=True) and ids[-1] == bpe.eos_id
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text  # eos skipped on decode
        assert bpe.decode([bpe.bos_id] + ids) == text
    merged = bpe.encode("the cat sat on the mat. ")
    assert len(merged) < len("the cat sat on the mat. ")  # the merges learned from the corpus apply
    with pytest.raises(ValueError, match="ids must lie in"):
        bpe.decode([bpe.vocab_size])


def test_load_tokenizer_byte_and_paths(bpe, tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    # No tokenizer_config.json beside it: specials unknown.
    plain = load_tokenizer(tmp_path)
    assert isinstance(plain, HFTokenizer) and plain.eos_id is None and plain.bos_id is None
    with pytest.raises(ValueError, match="has no eos token"):
        plain.encode("x", add_eos=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<beginning_of_sentence>", "special": True}, "eos_token": "<end_of_sentence>"}))
    for path in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path / "tokenizer.json")):
        loaded = load_tokenizer(path)
        assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (bpe.bos_id, bpe.eos_id, bpe.vocab_size)
        assert loaded.encode("abc def") == bpe.encode("abc def")


def test_load_tokenizer_bad_input(tmp_path, bpe):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no tokenizer.json in directory"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        load_tokenizer(broken)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<no_such_token>"}))
    with pytest.raises(ValueError, match="eos_token '<no_such_token>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="cannot hold the 256 byte symbols"):
        train_bpe(["abc"], 100, str(tmp_path / "small.json"))


@pytest.mark.skipif(not os.path.isfile(M1_TOKENIZER_CONFIG), reason="released tokenizer_config.json not present")
def test_m1_tokenizer_config_names_bos_and_eos(tmp_path):
    special = ["<end_of_document>", "<beginning_of_sentence>", "<end_of_sentence>"]
    tiny = train_bpe(["some text to learn merges from"] * 5, 300, str(tmp_path / "tokenizer.json"),
                     special_tokens=special)
    shutil.copy(M1_TOKENIZER_CONFIG, tmp_path / "tokenizer_config.json")
    loaded = load_tokenizer(tmp_path)
    assert loaded.bos_id == tiny.tokenizer.token_to_id("<beginning_of_sentence>")
    assert loaded.eos_id == tiny.tokenizer.token_to_id("<end_of_sentence>")
    assert loaded.pad_id is None
