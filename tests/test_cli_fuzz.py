"""Property-based fuzzing of the `m1jax` argument parser (hypothesis): whatever the command line, parsing ends in
a checked Namespace or a clear usage error (exit status 2, `m1jax CMD: error: ...` naming the flag), never a
traceback or a hang. Only parsing and the post-parse checks run here: no command executes."""
import contextlib
import io
import math
import re

import pytest
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings, strategies as st

from m1jax.cli import parse_args

# (command prefix, flag, accepts(value) for a parsed value): every number the CLI takes.
INT_FLAGS = {
    "train": {"--steps": 1, "--checkpoint-every": 0, "--keep": 1, "--seed": 0, "--batch-size": 1, "--seq-len": 1,
              "--warmup": 0, "--microbatches": 1, "--log-every": 1, "--eval-every": 0, "--num-processes": 1,
              "--process-id": 0},
    "plan": {"--batch-size": 1, "--seq-len": 1},
    "generate": {"--max-new-tokens": 1, "--top-k": 1, "--seed": 0, "--chunk-size": 1},
    "rl": {"--steps": 1, "--group-size": 2, "--prompts-per-step": 1, "--updates-per-batch": 1,
           "--max-new-tokens": 1, "--seed": 0, "--checkpoint-every": 0, "--keep": 1, "--digits": 1,
           "--eval-every": 0, "--eval-prompts": 0, "--warmup": 0},
    "serve": {"--max-batch": 1, "--max-queue": 1, "--chunk-size": 16, "--max-context": 16, "--decode-steps": 1,
              "--prefill-batch": 1},
    "eval": {"--samples": 1, "--max-new-tokens": 1, "--top-k": 1, "--limit": 1, "--batch-size": 1, "--workers": 1,
             "--pad-multiple": 0, "--memory-mb": 16},
}
FLOAT_FLAGS = {  # flag: (low, high, low_open, high_open)
    "train": {"--lr": (0, 10, True, False), "--eps": (0, 1, True, False), "--weight-decay": (0, 10, False, False),
              "--z-loss": (0, 10, False, False)},
    "generate": {"--temperature": (0, 100, False, False), "--top-p": (0, 1, True, False),
                 "--expert-threshold": (0, 1, False, True)},
    "convert": {"--max-shard-gb": (0, 1024, True, False)},
    "rl": {"--lr": (0, 10, True, False), "--eps-high": (0, 100, False, False), "--temperature": (0, 100, True, False),
           "--weight-decay": (0, 10, False, False), "--adam-eps": (0, 1, True, False)},
    "serve": {"--request-timeout": (0, math.inf, True, False)},
    "eval": {"--temperature": (0, math.inf, False, False), "--top-p": (0, 1, True, False),
             "--timeout": (0, math.inf, True, False)},
}

numbers = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "1e3", "0x10", "1_000", "٣", "nan", "-inf", "1/2", "--", "-1", "0", "2**40",
                     "9" * 5000, "1.0", "\x00", "１"]),
    st.text(max_size=12))


def _required(command: str, tmp: str) -> list[str]:
    return {"train": ["train", "--out", f"{tmp}/run", "--preset", "tiny"],
            "plan": ["plan", "--preset", "tiny"],
            "generate": ["generate", "--checkpoint", tmp, "--prompt", "x"],
            "convert": ["convert", "--checkpoint", tmp, "--out", f"{tmp}/hf"],
            "rl": ["rl", "--init", tmp, "--out", f"{tmp}/rl", "--prompts-per-step", "8", "--group-size", "8",
                   "--updates-per-batch", "1"],
            "serve": ["serve", "--checkpoint", tmp],
            "eval": ["eval", "--checkpoint", tmp, "--suite", "math"]}[command]


def _parse(argv):
    """(Namespace or None, exit code or None, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parse_args(argv), None, err.getvalue()
        except SystemExit as exit_info:
            return None, exit_info.code, err.getvalue()


def _in_range(value, low, high, low_open, high_open) -> bool:
    return ((value > low) if low_open else (value >= low)) and ((value < high) if high_open else (value <= high))


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.parametrize("command", sorted(set(INT_FLAGS) | set(FLOAT_FLAGS)))
def test_every_number_is_checked_with_the_flag_named(command, seed, tmp_path):
    flags = {**INT_FLAGS.get(command, {}), **FLOAT_FLAGS.get(command, {})}

    @hypothesis_seed(seed)
    @FUZZ
    @given(flag=st.sampled_from(sorted(flags)), text=numbers)
    def check(flag, text):
        args, code, err = _parse(_required(command, str(tmp_path)) + [f"{flag}={text}"])
        if args is None:
            assert code == 2, (flag, text, err)
            errors = [line for line in err.split("\n") if line.startswith(f"m1jax {command}: error: ")]
            assert len(errors) == 1 and flag in errors[0], (flag, text, err)
            assert "Traceback" not in err
            return
        value = getattr(args, flag[2:].replace("-", "_"))
        if flag in INT_FLAGS.get(command, {}):
            assert isinstance(value, int) and value >= flags[flag], (flag, text, value)
        else:
            assert isinstance(value, float) and _in_range(value, *flags[flag]), (flag, text, value)

    check()


def test_random_command_lines_end_in_a_namespace_or_a_usage_error(seed, tmp_path):
    flags = sorted({f for table in (INT_FLAGS, FLOAT_FLAGS) for cmd in table.values() for f in cmd}
                   | {"--preset", "--config", "--out", "--mesh", "--task", "--data", "--checkpoint", "--prompt",
                      "--init", "--algo", "--ops", "--dtype", "--remat", "--schedule", "--quiet", "--verbose"})
    commands = ["train", "plan", "params", "generate", "convert", "rl", "data", "bench", "nonsense", ""]
    words = st.one_of(st.sampled_from(flags), numbers, st.sampled_from(["tiny", "mqar", "data=2", str(tmp_path),
                                                                        "tokenize", "-h"]))

    @hypothesis_seed(seed)
    @FUZZ
    @given(command=st.sampled_from(commands), rest=st.lists(words, max_size=8))
    def check(command, rest):
        args, code, err = _parse([command] + rest)
        if args is None:
            assert code in (0, 2), (command, rest, code, err)  # 0: --help / -h
            assert "Traceback" not in err
            if code == 2:
                # the message line (user text in it may hold line breaks of its own)
                assert re.search(r"^m1jax( [a-z]+)*: error: ", err, re.MULTILINE), (command, rest, err)

    check()
