"""`m1jax generate`: text in, streamed text out, then usage and a routing summary (or one JSON object with --json).

    m1jax generate --checkpoint DIR (--prompt TEXT | --prompt-file F) [--max-new-tokens N] [--temperature T]
                   [--top-k K] [--top-p P] [--seed S] [--expert-threshold X] [--tokenizer PATH] [--json]

DIR is a Hugging Face directory (config.json + safetensors) or a training output (model_config.json +
checkpoints/). The tokenizer is --tokenizer, else the checkpoint's tokenizer.json, else the byte-level one; its eos
id (when it has one) stops generation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TextIO

import numpy as np

from m1jax.inference.generate import GenerateOutput, generate
from m1jax.model import M1ForCausalLM
from m1jax.tokenizer import checkpoint_tokenizer, decode_known


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from m1jax.cli_args import SEED, count, real  # the command line's checked number types
    parser.add_argument("--checkpoint", required=True, help="a training output or a Hugging Face directory")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="a UTF-8 text file holding the prompt")
    parser.add_argument("--max-new-tokens", type=count(1), default=64, help="tokens to generate at most")
    parser.add_argument("--temperature", type=real(0, 100), default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=count(1), help="sample among the k likeliest tokens (default: all)")
    parser.add_argument("--top-p", type=real(0, 1, low_open=True), help="nucleus sampling mass (default: 1, off)")
    parser.add_argument("--seed", type=SEED, default=0, help="sampling seed")
    parser.add_argument("--expert-threshold", type=real(0, 1, high_open=True), default=0.0,
                        help="skip lower-ranked experts whose routing weight is below this (0: never)")
    parser.add_argument("--tokenizer", help="tokenizer.json or 'byte' (default: the checkpoint's, else byte-level)")
    parser.add_argument("--chunk-size", type=count(1), default=4096, help="prompt tokens per prefill call")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return parser


def _prompt_text(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if not os.path.isfile(args.prompt_file):
        raise ValueError(f"--prompt-file {args.prompt_file!r} does not exist")
    with open(args.prompt_file, encoding="utf-8") as f:
        return f.read()


class _TextStream:
    """Prints the completion's text as tokens arrive (decoding the whole completion, printing what is new)."""

    def __init__(self, tokenizer, stop_ids: set[int], out: TextIO):
        self.tokenizer, self.stop_ids, self.out = tokenizer, stop_ids, out
        self.ids: list[int] = []
        self.printed = ""
        self.stopped = False

    def __call__(self, step: int, tokens: np.ndarray) -> None:
        token = int(tokens[0])
        if self.stopped:
            return
        self.stopped = token in self.stop_ids
        if not self.stopped:
            self.ids.append(token)
        text = decode_known(self.tokenizer, self.ids)
        if text.endswith("\ufffd") and not self.stopped:  # an incomplete UTF-8 sequence: wait for more bytes
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def _summary_lines(out: GenerateOutput) -> list[str]:
    u = out.usage
    lines = [f"usage: prompt {u.prompt_tokens} tokens, completion {u.completion_tokens} tokens; "
             f"prefill {u.prefill_seconds:.3f} s ({u.prefill_tokens_per_second:.1f} tok/s), "
             f"decode {u.decode_seconds:.3f} s ({u.decode_tokens_per_second:.1f} tok/s), "
             f"compile {u.compile_seconds:.1f} s",
             "routing: (token, expert) choices per layer; busiest expert / mean"]
    r = out.routing
    for layer, (kind, counts, ratio) in enumerate(zip(r.layer_types, r.tokens_per_expert, r.imbalance)):
        skipped = int(counts.sum() - r.expert_calls[layer].sum())
        lines.append(f"  layer {layer:3d} {kind:9s} {ratio:5.2f}x  {counts.tolist()}"
                     + (f"  ({skipped} skipped)" if skipped else ""))
    return lines


def generate_main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `m1jax generate` with arguments parsed by the m1jax CLI (`m1jax.cli.parse_args(["generate", ...])`).
    Returns the exit code."""
    out = out or sys.stdout
    quiet = bool(getattr(args, "quiet", False))
    from m1jax.checkpoint.load import load_any
    from m1jax.progress import progress_bar, stderr_is_terminal, status
    status(f"loading {args.checkpoint} ...", quiet=quiet)
    config, params = load_any(args.checkpoint)
    tokenizer = checkpoint_tokenizer(args.checkpoint, config.vocab_size, args.tokenizer)
    prompt_ids = tokenizer.encode(_prompt_text(args))
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenization; give some text with --prompt or --prompt-file")
    eos_id = tokenizer.eos_id
    text_stream = None if args.json else _TextStream(tokenizer, {eos_id} if eos_id is not None else set(), out)
    # A bar on stderr only where it does not garble text streaming to the same terminal.
    streaming_to_terminal = text_stream is not None and stderr_is_terminal(out)
    with progress_bar(args.max_new_tokens, desc="generate", unit="tok", quiet=quiet or streaming_to_terminal) as bar:
        def stream(step: int, tokens: np.ndarray) -> None:
            bar.update(1)
            if text_stream is not None:
                text_stream(step, tokens)

        result = generate(M1ForCausalLM(config), params, [prompt_ids], max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          eos_id=eos_id, expert_threshold=args.expert_threshold,
                          chunk_size=getattr(args, "chunk_size", 4096), stream=stream)
    completion = result.completions[0]
    if args.json:
        json.dump({"text": decode_known(tokenizer, completion), "prompt_ids": prompt_ids, "completion_ids": completion,
                   "stopped": bool(eos_id is not None and completion and completion[-1] == eos_id),
                   "usage": result.usage.to_dict(), "routing": result.routing.to_dict()}, out)
        out.write("\n")
    else:
        out.write("\n\n" + "\n".join(_summary_lines(result)) + "\n")
    return 0


