"""A transformers-shaped face over m1jax, so the seed's snippet runs as written against a local directory:

    from m1jax import MiniMaxM1Tokenizer, MiniMaxM1ForCausalLM
    tokenizer = MiniMaxM1Tokenizer.from_pretrained(dir)
    model = MiniMaxM1ForCausalLM.from_pretrained(dir)
    inputs = tokenizer(text, return_tensors="np")
    outputs = model.generate(**inputs, max_new_tokens=200)
    print(tokenizer.decode(outputs[0]))
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)

Nothing here is a second engine: the tokenizer is m1jax.tokenizer's (the directory's tokenizer.json, else the byte
tokenizer), chat prompts come from m1jax.serve.chat_template (the directory's template, else M1's), loading is
m1jax.checkpoint.load.load_any and generation is m1jax.generate. As in transformers, generate returns the prompt
(left-padded across a batch) followed by the new tokens, shape (B, P + n).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np


class MiniMaxM1Tokenizer:
    """Wraps an m1jax tokenizer. pad_token_id falls back to eos (then 0) for left-padding batches."""

    def __init__(self, tokenizer, chat_template: str):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MiniMaxM1Tokenizer":
        from m1jax.serve.chat_template import template_of
        from m1jax.tokenizer import load_tokenizer
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a directory; pass a local checkpoint directory")
        has_json = os.path.isfile(os.path.join(path, "tokenizer.json"))
        return cls(load_tokenizer(path if has_json else "byte"), template_of(path))

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def pad_token_id(self) -> int:
        for value in (self.tokenizer.pad_id, self.tokenizer.eos_id):
            if value is not None:
                return value
        return 0

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None) -> dict[str, Any]:
        """{"input_ids", "attention_mask"}: lists, or left-padded (B, T) int32 arrays with return_tensors="np"."""
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be 'np' or None (m1jax has no torch tensors), "
                             f"got {return_tensors!r}")
        single = isinstance(text, str)
        rows = [self.tokenizer.encode(t) for t in ([text] if single else text)]
        if return_tensors is None:
            ids = rows[0] if single else rows
            mask = [1] * len(rows[0]) if single else [[1] * len(r) for r in rows]
            return {"input_ids": ids, "attention_mask": mask}
        width = max(1, max(len(r) for r in rows))
        ids = np.full((len(rows), width), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for b, row in enumerate(rows):
            if row:
                ids[b, width - len(row):], mask[b, width - len(row):] = row, 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of ids (special tokens are always skipped; ids past the tokenizer's vocabulary are left out)."""
        from m1jax.tokenizer import decode_known
        return decode_known(self.tokenizer, np.asarray(ids).reshape(-1).tolist())

    def batch_decode(self, rows: Any, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row) for row in rows]

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True, **kwargs: Any):
        """OpenAI-style messages (string contents, tool_calls, tool turns) -> token ids (or the text with
        tokenize=False), rendered as transformers renders the template."""
        from m1jax.serve.chat_template import render_chat, to_template_messages
        text = render_chat(to_template_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt,
                           template=self.chat_template, **kwargs)
        return self.tokenizer.encode(text) if tokenize else text


class MiniMaxM1ForCausalLM:
    """An m1jax model with its parameters. generate(input_ids, attention_mask=None, max_new_tokens=20, ...)."""

    def __init__(self, config, params, eos_token_id: int | None = None, pad_token_id: int = 0):
        from m1jax.model import M1ForCausalLM
        self.config, self.params = config, params
        self.module = M1ForCausalLM(config)
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | None = None) -> "MiniMaxM1ForCausalLM":
        from m1jax.checkpoint.load import load_any
        config, params = load_any(path, dtype=dtype)
        tokenizer = MiniMaxM1Tokenizer.from_pretrained(path)
        return cls(config, params, tokenizer.eos_token_id, tokenizer.pad_token_id)

    def __call__(self, input_ids: Any) -> np.ndarray:
        """(B, T) ids -> (B, T, V) float32 logits."""
        import jax.numpy as jnp
        return np.asarray(self.module.apply({"params": self.params}, jnp.asarray(input_ids)).logits)

    def generate(self, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, eos_token_id: int | None = None,
                 expert_threshold: float = 0.0) -> np.ndarray:
        """(B, T) ids (left-padded where attention_mask is 0) -> (B, P + n) int32: prompts then new tokens."""
        from m1jax.inference.generate import generate
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
        rows = [[int(t) for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        out = generate(self.module, self.params, rows, max_new_tokens=max_new_tokens,
                       temperature=temperature if do_sample else 0.0, top_k=top_k if do_sample else None,
                       top_p=top_p if do_sample else None, seed=seed, eos_id=eos,
                       expert_threshold=expert_threshold, pad_id=self.pad_token_id)
        return out.tokens
