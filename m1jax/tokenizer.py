"""Tokenizers: a byte-level one for the built-in tasks and tests, and the checkpoint's BPE.

Both classes share one small interface, so data and generation code never ask which one they hold:

    vocab_size            ids are 0 .. vocab_size - 1
    pad_id, bos_id, eos_id  special ids (None where the tokenizer has none)
    encode(text, *, add_bos=False, add_eos=False) -> list[int]
    encode_batch(texts, ...) -> list[list[int]]
    decode(ids) -> str     special ids are skipped

MiniMax-M1 ships a `tokenizer.json` (a byte-level BPE; the model's vocab is 200,064 rows) and a
`tokenizer_config.json` that names bos `<beginning_of_sentence>` and eos `<end_of_sentence>`.
`load_tokenizer` reads both; `load_tokenizer(None)` or `load_tokenizer("byte")` gives the byte tokenizer.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then four special ids.

    Layout: 0..255 bytes, 256 pad, 257 bos, 258 eos, 259 sep (a separator the tasks may use); vocab_size 260.
    `decode` skips the specials and replaces invalid UTF-8 with U+FFFD, so any id sequence decodes.
    """

    num_bytes = 256
    pad_id = 256
    bos_id = 257
    eos_id = 258
    sep_id = 259
    vocab_size = 260

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.bos_id, self.eos_id, self.sep_id)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}; decode bytes first")
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}) for ByteTokenizer, got {bad[:5]}")
        return bytes(i for i in ids if i < self.num_bytes).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def _special_token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token entry must be a string or a dict with 'content', got {value!r}")


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json, with the interface of `ByteTokenizer`.

    bos/eos/pad are given as token strings (e.g. "<end_of_sentence>"); each must exist in the vocabulary.
    `vocab_size` counts added tokens too. A checkpoint's embedding may have more rows than this (M1 pads to
    200,064); a model vocab >= vocab_size is what matters.
    """

    def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist; pass the path of a tokenizer.json")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # the library raises a bare Exception for unreadable files
            raise ValueError(f"cannot read tokenizer file {path!r} ({err}); is it a tokenizers-library "
                             "tokenizer.json?") from err
        self.path = path
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._token_id(bos_token, "bos_token")
        self.eos_id = self._token_id(eos_token, "eos_token")
        self.pad_id = self._token_id(pad_token, "pad_token")

    def _token_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in the vocabulary of {self.path!r}; "
                             "fix tokenizer_config.json or pass another token")
        return token_id

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        for flag, token_id, name in ((add_bos, self.bos_id, "bos"), (add_eos, self.eos_id, "eos")):
            if flag and token_id is None:
                raise ValueError(f"add_{name}=True but {self.path!r} has no {name} token; "
                                 f"name one with {name}_token=...")
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}; decode bytes first")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}) for {self.path!r}, got {bad[:5]}")
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str, *,
              special_tokens: Sequence[str] = ("<beginning_of_sentence>", "<end_of_sentence>")) -> HFTokenizer:
    """Train a small byte-level BPE on `texts` (for experiments and tests), save it as tokenizer.json at
    out_path and load it back; the special tokens (M1's names by default) become bos and eos."""
    byte_alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} cannot hold the {len(byte_alphabet)} byte symbols and "
                         f"{len(special_tokens)} special tokens; raise vocab_size")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                             initial_alphabet=byte_alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(out_path)
    bos, eos = (list(special_tokens) + [None, None])[:2]
    return HFTokenizer(out_path, bos_token=bos, eos_token=eos)


def load_tokenizer(path: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """None or "byte" -> ByteTokenizer; a checkpoint directory or a tokenizer.json path -> HFTokenizer.

    Special tokens (bos_token, eos_token, pad_token) come from tokenizer_config.json beside tokenizer.json when
    that file exists; otherwise they are unknown (None).
    """
    if path is None or path == "byte":
        return ByteTokenizer()
    path = os.fspath(path)
    if os.path.isdir(path):
        json_path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(json_path):
            raise ValueError(f"no {TOKENIZER_FILE} in directory {path!r}; pass a directory that has one, "
                             "the path of a tokenizer.json, or 'byte' for the byte tokenizer")
    elif os.path.isfile(path):
        json_path = path
    else:
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist; pass a checkpoint directory, "
                                "a tokenizer.json, or 'byte'")
    specials = {}
    config_path = os.path.join(os.path.dirname(json_path), TOKENIZER_CONFIG_FILE)
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path!r} is not valid JSON ({err}); fix or remove it") from err
        for key in ("bos_token", "eos_token", "pad_token"):
            specials[key] = _special_token_text(config.get(key))
    return HFTokenizer(json_path, **specials)


def checkpoint_tokenizer(checkpoint: str | os.PathLike, vocab_size: int, path: str | None = None):
    """The tokenizer for a checkpoint: `path` if given, else the checkpoint's tokenizer.json, else bytes; an error
    when it has more ids than the model's vocabulary (vocab_size)."""
    if path is None:
        checkpoint = os.fspath(checkpoint)
        path = checkpoint if os.path.isfile(os.path.join(checkpoint, TOKENIZER_FILE)) else "byte"
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer ({tokenizer!r}) has {tokenizer.vocab_size} ids but the model only "
                         f"{vocab_size}; pass the checkpoint's tokenizer with --tokenizer")
    return tokenizer


def decode_known(tokenizer, ids) -> str:
    """Text of ids; ids outside the tokenizer's vocabulary (a model's embedding may have spare rows) are left out."""
    return tokenizer.decode([i for i in ids if 0 <= i < tokenizer.vocab_size])
