"""`m1jax` command line: params | plan | train | generate | convert | data tokenize | rl | serve | eval | bench.

Every number on the command line is checked where it is parsed (an argparse type that names the flag and the
range); checks that need the model (--seq-len against its position limit) run right after parsing. Both end in
`m1jax CMD: error: ...` and exit status 2, like any usage error. Errors of the run itself (a missing or damaged
checkpoint, bad data) print one line on stderr and exit 2; --verbose prints the traceback too.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import traceback

from m1jax.cli_args import SEED, count, mesh_spec, real


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (none for flags and options without one) and keeps epilogs' line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action, argparse._HelpAction):
            return action.help or ""
        return super()._get_help_string(action)


class UsageError(ValueError):
    """A command line that parsed but cannot run (e.g. --seq-len past the model's limit); exit status 2."""


def _policy(args):
    """The RunPolicy of the run-time flags (--compute-dtype, --param-dtype, --remat); unset flags keep its defaults."""
    from m1jax.config import RunPolicy
    flags = {field: getattr(args, field) for field in ("compute_dtype", "param_dtype", "remat")
             if getattr(args, field, None)}
    return RunPolicy(**flags)


def _config(args):
    from m1jax.config import M1Config
    if getattr(args, "config", None):
        return M1Config.from_hf(args.config)
    return M1Config.from_preset(args.preset)


def _check_out_dir(path: str, flag: str = "--out") -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file; pass a directory (new or an earlier run's)")


def _check_exists(path: str | None, flag: str) -> None:
    if path is not None and not os.path.exists(path):
        raise UsageError(f"{flag} {path!r} does not exist")


def _check_seq_len(args, config) -> None:
    limit = config.max_position_embeddings
    if args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's limit of {limit} positions "
                         f"(max_position_embeddings of {getattr(args, 'config', None) or args.preset}); "
                         f"pass --seq-len <= {limit}")


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


def check_plan(args) -> None:
    _check_seq_len(args, _config(args))


def cmd_plan(args) -> int:
    from m1jax.plan import plan_table
    print(plan_table(_config(args), args.mesh or {}, batch_size=args.batch_size, seq_len=args.seq_len,
                     policy=_policy(args), training=not args.inference))
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


def train_config(args):
    """The TrainConfig of parsed `m1jax train` arguments, checked against the model (UsageError names the flag)."""
    from m1jax.train.loop import TrainConfig
    from m1jax.train.optimizer import OptimizerConfig
    _check_out_dir(args.out)
    _check_exists(args.data, "--data")
    _check_seq_len(args, _config(args))
    if args.batch_size % args.microbatches:
        raise UsageError(f"--batch-size {args.batch_size} does not split into --microbatches {args.microbatches}; "
                         "pick a batch size divisible by it")
    if args.num_processes is not None and args.process_id is not None and args.process_id >= args.num_processes:
        raise UsageError(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")
    return TrainConfig(
        out=args.out, preset=args.preset, data=args.data or args.task, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep, log_every=args.log_every, eval_every=args.eval_every,
        microbatches=args.microbatches, policy=_policy(args), mesh=args.mesh,
        optimizer=OptimizerConfig(learning_rate=args.lr, warmup_steps=args.warmup, schedule=args.schedule,
                                  eps=args.eps, weight_decay=args.weight_decay),
        logit_z_loss_coef=args.z_loss,
        tensorboard=args.tensorboard, progress=not args.quiet)


def cmd_train(args) -> int:
    _maybe_distributed(args)
    from m1jax.train.loop import train
    cfg = args.run_config  # built and checked once, by train_config while parsing
    result = train(cfg)
    summary = {"steps": cfg.steps, "resumed_from": result.resumed_from, "out": cfg.out,
               "final_loss": result.history[-1]["loss"] if result.history else None, **result.final_eval}
    print(json.dumps(summary))
    return 0


def check_convert(args) -> None:
    _check_exists(args.checkpoint, "--checkpoint")
    _check_out_dir(args.out)


def cmd_convert(args) -> int:
    from m1jax.checkpoint.hf import save_pretrained, tensor_maps
    from m1jax.checkpoint.load import load_any
    from m1jax.progress import progress_bar, status
    status(f"loading {args.checkpoint} ...", quiet=args.quiet)
    config, params = load_any(args.checkpoint, dtype=args.dtype)
    with progress_bar(len(tensor_maps(config)), desc=f"writing {args.out}", unit="tensor", quiet=args.quiet) as bar:
        files = save_pretrained(args.out, config, params, max_shard_bytes=int(args.max_shard_gb * 2**30),
                                on_tensor=lambda name, index, count: bar.update(1))
    print(f"wrote {len(files)} files to {args.out}")
    return 0


def check_data(args) -> None:
    for path in args.input:
        _check_exists(path, "--input")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a directory; pass the tokens file to write, e.g. OUT/tokens.bin")


def cmd_data(args) -> int:
    from m1jax.tokenizer import load_tokenizer
    from m1jax.train.data import tokenize_files
    info = tokenize_files(load_tokenizer(args.tokenizer), args.input, args.out)
    print(json.dumps(info))
    return 0


def check_generate(args) -> None:
    _check_exists(args.checkpoint, "--checkpoint")
    _check_exists(args.prompt_file, "--prompt-file")


def cmd_generate(args) -> int:
    from m1jax.inference.cli import generate_main
    return generate_main(args)


def check_rl(args):
    from m1jax.rl.cli import config_from_args
    _check_exists(args.init, "--init")
    _check_out_dir(args.out)
    rows = args.prompts_per_step * args.group_size
    if rows % args.updates_per_batch:
        raise UsageError(f"--prompts-per-step {args.prompts_per_step} x --group-size {args.group_size} = {rows} "
                         f"responses do not split into --updates-per-batch {args.updates_per_batch} equal minibatches")
    from m1jax.rl.rollout import get_rl_task
    options = {k: getattr(args, k) for k in ("digits", "ops") if getattr(args, k, None) is not None}
    try:
        get_rl_task(args.task, seed=args.seed, **options)
    except ValueError as err:
        raise UsageError(" ".join(f"--{k} {v!r}" for k, v in options.items()) + f": {err}") from None
    return config_from_args(args)  # the RLConfig, with its own checks


def cmd_rl(args) -> int:
    from m1jax.rl.cli import rl_main
    return rl_main(args)


def cmd_serve(args) -> int:
    from m1jax.serve.cli import serve_main
    return serve_main(args)


def cmd_eval(args) -> int:
    from m1jax.eval.cli import eval_main
    return eval_main(args)


def _benchmarks_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def check_bench(args) -> None:
    if not os.path.exists(os.path.join(_benchmarks_dir(), f"{args.name}.py")):
        names = os.listdir(_benchmarks_dir()) if os.path.isdir(_benchmarks_dir()) else []
        available = sorted(n[:-3] for n in names if n.endswith(".py"))
        raise UsageError(f"no benchmark {args.name!r}; available: {available}")


def cmd_bench(args) -> int:
    script = os.path.join(_benchmarks_dir(), f"{args.name}.py")
    sys.argv = [script] + args.rest
    runpy.run_path(script, run_name="__main__")
    return 0


def _epilog() -> str:
    from m1jax.config import PRESETS
    from m1jax.tasks import TASKS
    return (f"presets (--preset): {', '.join(sorted(PRESETS))}\n"
            f"tasks (--task): {', '.join(sorted(TASKS))} (built in, no downloads)")


def build_parser() -> argparse.ArgumentParser:
    from m1jax.config import PRESETS
    from m1jax.tasks import TASKS
    epilog = _epilog()
    parser = argparse.ArgumentParser(prog="m1jax", description=__doc__, formatter_class=HelpFormatter, epilog=epilog)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines on stderr")
    common.add_argument("--verbose", "-v", action="store_true", help="print the full traceback of an error")

    def command(name: str, help_text: str, func, check=None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common], formatter_class=HelpFormatter,
                           epilog=epilog, conflict_handler="resolve")  # a command may define --quiet itself
        p.set_defaults(func=func, check=check, command_parser=p)
        return p

    def model_args(p, preset="tiny", with_config=True):
        p.add_argument("--preset", default=preset, choices=sorted(PRESETS), metavar="PRESET",
                       help="named model config (listed below)")
        if with_config:
            p.add_argument("--config", help="a config.json (either flavour) instead of --preset")
        p.add_argument("--compute-dtype", dest="compute_dtype", choices=["float32", "bfloat16"],
                       help="run-time policy (not the model): activations' dtype (default float32)")
        p.add_argument("--param-dtype", dest="param_dtype", choices=["float32", "bfloat16"],
                       help="run-time policy (not the model): parameters' dtype (default float32)")

    p = command("params", "parameter counts per component", cmd_params)
    model_args(p, "minimax-m1-80k")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")

    p = command("plan", "per-device memory for a mesh, from abstract shapes", cmd_plan, check_plan)
    model_args(p, "minimax-m1-80k")
    p.add_argument("--mesh", type=mesh_spec, help="e.g. data=8,fsdp=8,expert=2 (default: one device)")
    p.add_argument("--batch-size", type=count(1), default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=count(1), default=8192, help="tokens per sequence")
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"], help="activation recomputation")
    p.add_argument("--inference", action="store_true", help="plan inference (bf16 weights + cache), not training")

    p = command("train", "train (or resume) a model; rerunning on the same --out resumes", cmd_train)
    model_args(p, with_config=False)
    p.add_argument("--task", default="mqar", choices=sorted(TASKS), help="built-in task")
    p.add_argument("--data", help="a tokens.bin from `m1jax data tokenize` (instead of --task)")
    p.add_argument("--steps", type=count(1), default=100, help="optimizer steps in all (a resumed run trains on)")
    p.add_argument("--out", required=True, help="the run directory (checkpoints/, metrics.jsonl, run_config.json)")
    p.add_argument("--checkpoint-every", type=count(0), default=100,
                   help="steps between checkpoints; the final step is always saved (0: only the final step)")
    p.add_argument("--keep", type=count(1), default=3, help="newest checkpoints kept")
    p.add_argument("--mesh", type=mesh_spec, help="e.g. data=2,fsdp=2,expert=2 (default: one device)")
    p.add_argument("--seed", type=SEED, default=0, help="initialisation and data seed")
    p.add_argument("--batch-size", type=count(1), default=8, help="sequences per step")
    p.add_argument("--seq-len", type=count(1), default=128, help="tokens per sequence (at most the model's limit)")
    p.add_argument("--lr", type=real(0, 10, low_open=True), default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=count(0), default=20, help="linear warmup steps")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"], help="decay after warmup")
    p.add_argument("--eps", type=real(0, 1, low_open=True), default=1e-8, help="AdamW eps (the paper used 1e-15)")
    p.add_argument("--weight-decay", type=real(0, 10), default=0.1, help="AdamW weight decay")
    p.add_argument("--z-loss", type=real(0, 10), default=0.0, help="logit z-loss coefficient")
    p.add_argument("--microbatches", type=count(1), default=1, help="gradient accumulation steps")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"], help="activation recomputation")
    p.add_argument("--log-every", type=count(1), default=1, help="steps between metrics.jsonl lines")
    p.add_argument("--eval-every", type=count(0), default=0, help="steps between held-out evaluations (0: at the end)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to OUT/tensorboard")
    p.add_argument("--coordinator", help="multi-host: coordinator host:port (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=count(1), help="multi-host: processes in all")
    p.add_argument("--process-id", type=count(0), help="multi-host: this process's index")
    p.set_defaults(check=train_config)

    from m1jax.inference.cli import add_generate_arguments  # one definition of generate's options
    add_generate_arguments(command("generate", "generate text from a checkpoint", cmd_generate, check_generate))

    p = command("convert", "write a checkpoint (training output or HF) as a Hugging Face directory", cmd_convert,
                check_convert)
    p.add_argument("--checkpoint", required=True, help="a training output or Hugging Face directory")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the checkpoint's")
    p.add_argument("--max-shard-gb", type=real(0, 1024, low_open=True), default=5.0, help="safetensors shard size")

    p = command("data", "data preparation", None)
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    t = data_sub.add_parser("tokenize", help="text or .jsonl files -> tokens.bin (+ .json sidecar)",
                            parents=[common], formatter_class=HelpFormatter)
    t.add_argument("--tokenizer", required=True, help="tokenizer.json, a checkpoint directory, or 'byte'")
    t.add_argument("--input", nargs="+", required=True, help="UTF-8 text or .jsonl files")
    t.add_argument("--out", required=True, help="the tokens file to write")
    t.set_defaults(func=cmd_data, check=check_data, command_parser=t)

    from m1jax.rl.cli import add_rl_arguments
    add_rl_arguments(command("rl", "reinforcement learning (CISPO and baselines) on a verifiable task", cmd_rl,
                             check_rl))

    from m1jax.serve.cli import add_serve_arguments
    add_serve_arguments(command("serve", "serve a checkpoint over HTTP (seed API + OpenAI-compatible)", cmd_serve))

    from m1jax.eval.cli import add_eval_arguments
    add_eval_arguments(command("eval", "score a checkpoint on a benchmark suite (math, code, long)", cmd_eval))

    p = command("bench", "run a GPU benchmark script from benchmarks/", cmd_bench, check_bench)
    p.add_argument("name", help="a script name in benchmarks/ (without .py)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check a command line; a bad one exits with status 2 and a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command_parser = getattr(args, "command_parser", parser)
    for action in command_parser._actions:  # Python 3.12's argparse turns `--flag=--` into [] past the type check
        if action.option_strings and action.nargs is None and isinstance(getattr(args, action.dest, None), list):
            command_parser.error(f"argument {'/'.join(action.option_strings)}: expected one value, got '--'")
    check = getattr(args, "check", None)
    if check is not None:  # a check that builds the command's config returns it: the command runs that one
        try:
            args.run_config = check(args)
        except (ValueError, FileNotFoundError) as err:  # UsageError, or a config's own check
            args.command_parser.error(_one_line(err))
    return args


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault: one line, no traceback (unless --verbose). They include the checkpoint
    loaders' CheckpointError (a ValueError naming the step or file)."""
    return ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, MemoryError


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    saved_verbose = os.environ.get("M1JAX_VERBOSE")
    if args.verbose:  # the checkpoint loaders then keep the libraries' own logs and tracebacks
        os.environ["M1JAX_VERBOSE"] = "1"
    try:
        return args.func(args)
    except _user_errors() as err:
        if args.verbose:
            traceback.print_exc()
        print(f"m1jax {args.command}: error: {_one_line(err)}", file=sys.stderr)
        if not args.verbose:
            print("(--verbose shows where it happened)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"m1jax {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if saved_verbose is None:
            os.environ.pop("M1JAX_VERBOSE", None)
        else:
            os.environ["M1JAX_VERBOSE"] = saved_verbose


if __name__ == "__main__":
    sys.exit(main())
