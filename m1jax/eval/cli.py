"""`m1jax eval`: score a checkpoint on a benchmark suite.

    m1jax eval --checkpoint DIR --suite math|code|long [--data FILE.jsonl] [--samples K] [--max-new-tokens N]
               [--temperature T --top-p P] [--lengths 1K 4K ...] [--tasks ...] [--limit N] [--out DIR]

math and code read --data (default: the small sample file shipped in m1jax/eval/samples/, for a smoke run);
long generates its items. Results: OUT/samples.jsonl (one scored sample a line; a rerun resumes), OUT/results.json
and OUT/results.md. See m1jax/eval/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

SUITES = ("math", "code", "long")
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from m1jax.cli_args import SEED, count, real
    from m1jax.eval.long_suite import DEFAULT_LENGTHS, TASKS, parse_length
    p.add_argument("--checkpoint", required=True, help="a training output or a Hugging Face directory")
    p.add_argument("--suite", required=True, choices=SUITES)
    p.add_argument("--data", help="jsonl file (math: problem, answer; code: HumanEval layout); not for long")
    p.add_argument("--samples", type=count(1), default=1, help="samples per problem (K)")
    p.add_argument("--max-new-tokens", type=count(1), help="default: math 2048, code 512, long 128")
    p.add_argument("--temperature", type=real(0), default=1.0, help="0: greedy (the paper: 1.0)")
    p.add_argument("--top-p", type=real(0, 1, low_open=True), default=0.95, help="the paper: 0.95")
    p.add_argument("--top-k", type=count(1))
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--lengths", nargs="+", type=parse_length, default=list(DEFAULT_LENGTHS),
                   help="long: prompt lengths in tokens (4096, 4K, 1M)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="long: which tasks")
    p.add_argument("--limit", type=count(1), help="math/code: the first N records; long: items per task and length "
                   "(default 4)")
    p.add_argument("--batch-size", type=count(1), default=8, help="rows generated together")
    p.add_argument("--chunk-size", type=count(1), default=4096, help="prompt tokens per prefill call")
    p.add_argument("--pad-multiple", type=count(0), default=0, help="pad each batch's prompts to a multiple of this "
                   "many tokens (0: automatic buckets); fewer distinct widths compile fewer programs")
    p.add_argument("--tokenizer", help="tokenizer.json or 'byte' (default: the checkpoint's, else byte-level)")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompts even if the checkpoint has a "
                   "chat template")
    p.add_argument("--timeout", type=real(0, low_open=True), default=5.0, help="code: seconds per program")
    p.add_argument("--memory-mb", type=count(16), default=1024, help="code: address-space limit per program")
    p.add_argument("--workers", type=count(1), default=4, help="code: programs run in parallel")
    p.add_argument("--out", help="output directory (default runs/eval-SUITE)")
    p.add_argument("--quiet", action="store_true")
    return p


def build_suite(args, encode, render=None):
    """The suite object for args.suite (reads and checks --data); render: messages -> prompt text (long: to fit
    each item to its length as the model will see it)."""
    from m1jax.eval.data import read_jsonl
    if args.suite not in SUITES:
        raise ValueError(f"unknown suite {args.suite!r}; choose one of {list(SUITES)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: pass a positive number")
    if args.suite == "long":
        from m1jax.eval.long_suite import LongSuite
        if args.data:
            raise ValueError("the long suite generates its own items; drop --data")
        return LongSuite(encode, lengths=args.lengths, tasks=args.tasks, items_per_length=args.limit or 4,
                         seed=args.seed, render=render)
    from m1jax.eval.code_suite import CodeSuite
    from m1jax.eval.math_suite import MathSuite
    cls = MathSuite if args.suite == "math" else CodeSuite
    records = read_jsonl(args.data or os.path.join(SAMPLES_DIR, f"{args.suite}.jsonl"), required=cls.required)
    records = records[:args.limit] if args.limit else records
    if args.suite == "code":
        return CodeSuite(records, timeout_s=args.timeout, memory_mb=args.memory_mb)
    return MathSuite(records)


def eval_main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run `m1jax eval` (args parsed by the m1jax CLI, or a list of strings); prints results.md, returns 0."""
    if args is None or not isinstance(args, argparse.Namespace):
        args = add_eval_arguments(argparse.ArgumentParser(prog="m1jax eval")).parse_args(args)
    from m1jax.checkpoint.load import load_any
    from m1jax.eval.prompts import load_formatter
    from m1jax.eval.runner import run_eval
    from m1jax.model import M1ForCausalLM
    from m1jax.progress import status
    if args.data and not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data!r} does not exist")
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} is not a directory")
    config, params = load_any(args.checkpoint)
    from m1jax.tokenizer import checkpoint_tokenizer
    tokenizer = checkpoint_tokenizer(args.checkpoint, config.vocab_size, args.tokenizer)
    formatter = load_formatter(args.checkpoint, use_template=not args.no_chat_template)
    suite = build_suite(args, tokenizer.encode, render=formatter)
    if args.suite == "long":
        too_long = [n for n in args.lengths if n + (args.max_new_tokens or suite.default_max_new_tokens)
                    > config.max_position_embeddings]
        if too_long:
            raise ValueError(f"--lengths {too_long} + the new tokens exceed the model's max_position_embeddings="
                             f"{config.max_position_embeddings}; ask for shorter lengths")
    if suite.use_chat and formatter.kind == "plain" and not args.no_chat_template:
        status("eval: the checkpoint has no chat template (tokenizer_config.json); using plain prompts",
               quiet=args.quiet)
    if args.suite != "long" and not args.data:
        status(f"eval: no --data; scoring the built-in sample file ({SAMPLES_DIR}/{args.suite}.jsonl), a smoke "
               "test and not the benchmark", quiet=args.quiet)
    out = args.out or os.path.join("runs", f"eval-{args.suite}")
    data = os.path.abspath(args.data) if args.data else f"builtin:{args.suite}.jsonl"
    result = run_eval(suite, M1ForCausalLM(config), params, tokenizer, out=out, samples=args.samples,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p if args.temperature > 0 else None, top_k=args.top_k, seed=args.seed,
                      batch_size=args.batch_size, chunk_size=args.chunk_size, pad_multiple=args.pad_multiple,
                      formatter=formatter,
                      settings={"checkpoint": os.path.abspath(args.checkpoint),
                                "data": data if args.suite != "long" else None,
                                "lengths": args.lengths if args.suite == "long" else None},
                      workers=args.workers, quiet=args.quiet)
    with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
        sys.stdout.write(f.read())
    print(json.dumps({"out": out, "summary": result["summary"]}))
    return 0
