"""`m1jax` command line: params | plan | train | generate | convert | data tokenize | rl | serve | eval | bench."""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys


def _mesh_arg(text: str | None) -> dict[str, int] | None:
    from m1jax.sharding import parse_mesh
    return parse_mesh(text)


def _overrides(args) -> dict:
    out = {}
    for field in ("compute_dtype", "param_dtype"):
        if getattr(args, field, None):
            out[field] = getattr(args, field)
    return out


def _config(args):
    from m1jax.config import M1Config
    if getattr(args, "config", None):
        return M1Config.from_hf(args.config, **_overrides(args))
    return M1Config.from_preset(args.preset, **_overrides(args))


def cmd_params(args) -> int:
    from m1jax.params import count_params, params_table
    cfg = _config(args)
    if args.json:
        print(json.dumps(count_params(cfg)))
    else:
        print(f"{args.config or args.preset}: {cfg.num_layers} layers ({cfg.layer_types.count('softmax')} softmax), "
              f"hidden {cfg.hidden_size}, {cfg.num_experts} experts top-{cfg.experts_per_token}")
        print(params_table(cfg))
    return 0


def cmd_plan(args) -> int:
    from m1jax.plan import plan_table
    print(plan_table(_config(args), _mesh_arg(args.mesh) or {}, batch_size=args.batch_size, seq_len=args.seq_len,
                     remat=args.remat, training=not args.inference))
    return 0


def _maybe_distributed(args) -> None:
    """Multi-host: JAX's coordinator settings from flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID."""
    address = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return
    import jax
    num = args.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    pid = args.process_id if args.process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "0"))
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def cmd_train(args) -> int:
    _maybe_distributed(args)
    from m1jax.train.loop import TrainConfig, train
    from m1jax.train.optimizer import OptimizerConfig
    from m1jax.train.step import LossConfig
    cfg = TrainConfig(
        out=args.out, preset=args.preset, data=args.data or args.task, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep, log_every=args.log_every, eval_every=args.eval_every,
        microbatches=args.microbatches, remat=args.remat, mesh=_mesh_arg(args.mesh),
        optimizer=OptimizerConfig(learning_rate=args.lr, warmup_steps=args.warmup, schedule=args.schedule,
                                  eps=args.eps, weight_decay=args.weight_decay),
        loss=LossConfig(logit_z_loss_coef=args.z_loss), model_overrides=_overrides(args),
        tensorboard=args.tensorboard)
    result = train(cfg)
    summary = {"steps": cfg.steps, "resumed_from": result.resumed_from,
               "final_loss": result.history[-1]["loss"] if result.history else None, **result.final_eval}
    print(json.dumps(summary))
    return 0


def cmd_convert(args) -> int:
    from m1jax.checkpoint.hf import save_pretrained
    from m1jax.checkpoint.state import load_any
    config, params = load_any(args.checkpoint, dtype=args.dtype)
    files = save_pretrained(args.out, config, params, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {len(files)} files to {args.out}")
    return 0


def cmd_data(args) -> int:
    from m1jax.tokenizer import load_tokenizer
    from m1jax.train.data import tokenize_files
    info = tokenize_files(load_tokenizer(args.tokenizer), args.input, args.out)
    print(json.dumps(info))
    return 0


def cmd_generate(args) -> int:
    from m1jax.inference.cli import generate_main
    return generate_main(args)


def cmd_rl(args) -> int:
    from m1jax.rl.cli import rl_main
    return rl_main(args)


def cmd_serve(args) -> int:
    from m1jax.serve.cli import serve_main
    return serve_main(args)


def cmd_eval(args) -> int:
    from m1jax.eval.cli import eval_main
    return eval_main(args)


def cmd_bench(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", f"{args.name}.py")
    if not os.path.exists(script):
        available = sorted(n[:-3] for n in os.listdir(os.path.join(root, "benchmarks")) if n.endswith(".py"))
        raise SystemExit(f"no benchmark {args.name!r}; available: {available}")
    sys.argv = [script] + args.rest
    runpy.run_path(script, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m1jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p, preset="tiny"):
        p.add_argument("--preset", default=preset, help="named config (see m1jax.PRESETS)")
        p.add_argument("--config", help="a config.json (either flavour) instead of --preset")
        p.add_argument("--compute-dtype", dest="compute_dtype", choices=["float32", "bfloat16"])
        p.add_argument("--param-dtype", dest="param_dtype", choices=["float32", "bfloat16"])

    p = sub.add_parser("params", help="parameter counts per component")
    model_args(p, "minimax-m1-80k")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("plan", help="per-device memory for a mesh, from abstract shapes")
    model_args(p, "minimax-m1-80k")
    p.add_argument("--mesh", help="e.g. data=8,fsdp=8,expert=2")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    p.add_argument("--inference", action="store_true", help="plan inference (bf16 weights + cache), not training")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train (or resume) a model")
    model_args(p)
    p.add_argument("--task", default="mqar", help="built-in task: mqar, copy, arith")
    p.add_argument("--data", help="a tokens.bin from `m1jax data tokenize` (instead of --task)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint-every", type=int, default=0, help="0 = never")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--mesh", help="e.g. data=2,fsdp=2,expert=2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW eps (the paper used 1e-15)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--z-loss", type=float, default=0.0, help="logit z-loss coefficient")
    p.add_argument("--microbatches", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to OUT/tensorboard")
    p.add_argument("--coordinator", help="multi-host: coordinator host:port (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.set_defaults(func=cmd_train)

    from m1jax.inference.cli import add_generate_arguments  # one definition of generate's options
    p = add_generate_arguments(sub.add_parser("generate", help="generate text from a checkpoint"))
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="write a checkpoint (training output or HF) as a Hugging Face directory")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("data", help="data preparation")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    t = data_sub.add_parser("tokenize", help="text or .jsonl files -> tokens.bin (+ .json sidecar)")
    t.add_argument("--tokenizer", required=True, help="tokenizer.json, a checkpoint directory, or 'byte'")
    t.add_argument("--input", nargs="+", required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_data)

    from m1jax.rl.cli import add_rl_arguments
    p = add_rl_arguments(sub.add_parser("rl", help="reinforcement learning (CISPO and baselines) on a verifiable task"))
    p.set_defaults(func=cmd_rl)

    from m1jax.serve.cli import add_serve_arguments
    p = add_serve_arguments(sub.add_parser("serve", help="serve a checkpoint over HTTP (seed API + OpenAI-compatible)"))
    p.set_defaults(func=cmd_serve)

    from m1jax.eval.cli import add_eval_arguments
    p = add_eval_arguments(sub.add_parser("eval", help="score a checkpoint on a benchmark suite (math, code, long)"))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="run a GPU benchmark script from benchmarks/")
    p.add_argument("name")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"m1jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
