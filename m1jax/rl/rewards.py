"""Verifiable, rule-based rewards: exact numeric answers, program execution against tests, an optional format reward.

A reward function follows ``RewardFn``: ``(completion: str, example: dict) -> float``. ``score_batch`` applies
one to a batch and never lets a failing reward stop training: a call that raises scores 0 and is counted under
"errors", one that raises ``TimeoutError`` (``code_reward`` does when a program runs past its limit) scores 0
and is counted under "timeouts".

Examples: arithmetic tasks carry ``"answer"`` (an integer or a number string, e.g. ``{"prompt": "12+30=",
"answer": 42}``), programming tasks carry ``"tests"`` (Python source, or a list of statements, that asserts on
the candidate's definitions). An example without the key its reward needs has no verifiable answer:
``score_batch`` rejects the batch up front with a ValueError.

Sandbox of ``run_program`` (what is guaranteed, and what is only best-effort):
- guaranteed: a separate ``python -I`` process (no user site, no PYTHON* variables, no script dir on sys.path);
  a wall-clock timeout after which its whole process group is killed; rlimits (``resource.setrlimit``) on
  address space (``memory_mb``), CPU seconds, file size (stdout/stderr/files capped at 16 MiB) and core files
  (none); an empty fresh working directory; an environment stripped to PATH, HOME and the locale; stdin closed.
  The rlimits are set by the sandboxed interpreter itself, first thing, before it reads the candidate, rather
  than in a ``preexec_fn``: Python code between fork and exec can deadlock a multithreaded parent such as a
  JAX training process (JAX warns about exactly that), and without ``preexec_fn`` subprocess spawns with vfork.
  When the caller runs as root, the program runs as root too and could raise its own hard limits.
- network: when ``unshare -n`` (or ``unshare -rn`` through a user namespace) works on the host, the program runs
  in its own network namespace with only a downed loopback, so no connection can leave it
  (``network_isolation_available()`` says whether this holds here). On top of that, and always, ``socket``
  is patched inside the process so that creating a socket raises; this layer is best-effort only: a program
  that reaches the original socket type (through the patched class's bases, say) gets around it.
- not guaranteed: the program can read the rest of the file system with the caller's permissions, spawn
  children (killed with the group at timeout unless they start their own session), and, by introspecting the
  harness that runs it, fake a pass. Run untrusted code under a stronger sandbox (a container) as well.
"""
from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

EOS_TEXT = "<end_of_sentence>"  # MiniMax-M1's eos token, as it appears in decoded text
DEFAULT_STOPS = ("\n", EOS_TEXT)
OUTPUT_LIMIT_BYTES = 16 * 2**20


class RewardFn(Protocol):
    def __call__(self, completion: str, example: Mapping[str, Any]) -> float: ...


class RewardTimeout(TimeoutError):
    """The verification ran past its time limit (scored 0 and counted as a timeout by ``score_batch``)."""


class ProgramError(RuntimeError):
    """The candidate program crashed before its tests could pass (an exception other than an assertion)."""


class ProgramMemoryError(ProgramError):
    """The candidate program ran out of its memory limit."""


# ---------------------------------------------------------------------------------------------------- numbers
_NUMBER = re.compile(r"(?<![\w.])([+-]?)(\d+(?:\.\d+)?)(?!\w)")


def answer_text(completion: str, stops: Sequence[str] = DEFAULT_STOPS) -> str:
    """The completion up to (not including) the first stop string."""
    cut = min((i for i in (completion.find(s) for s in stops if s) if i >= 0), default=len(completion))
    return completion[:cut]


def parse_last_number(text: str) -> fractions.Fraction | None:
    """The last standalone integer or decimal in ``text`` as an exact Fraction ("x2", "4b" are not numbers)."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    sign, digits = matches[-1]
    return fractions.Fraction(sign + digits)


def _expected_number(example: Mapping[str, Any]) -> fractions.Fraction:
    if "answer" not in example:
        raise ValueError(f"example has no 'answer' (keys: {sorted(example)}): numeric tasks need a verifiable answer")
    answer = example["answer"]
    try:
        if isinstance(answer, bool):
            raise TypeError
        if isinstance(answer, float):
            if not math.isfinite(answer):
                raise TypeError
            answer = repr(answer)
        return fractions.Fraction(answer.strip() if isinstance(answer, str) else answer)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"example['answer']={answer!r} is not a number: numeric tasks need a numeric answer") from None


def _stops(example: Mapping[str, Any]) -> Sequence[str]:
    stops = example.get("stop", DEFAULT_STOPS)
    return (stops,) if isinstance(stops, str) else stops


def arith_reward(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 if the last number before the first stop (``example["stop"]``, default newline or eos) equals
    ``example["answer"]`` exactly, else 0.0. Garbage or no number scores 0."""
    expected = _expected_number(example)
    return float(parse_last_number(answer_text(completion, _stops(example))) == expected)


def chain_reward(completion: str, example: Mapping[str, Any]) -> float:
    """The chain task's outcome reward (``m1jax.tasks.chains``): 1.0 if the text after the last "#" of the
    completion's first line is exactly ``example["answer"]``, else 0.0. The steps are not graded."""
    from m1jax.tasks.chains import score_chain
    return float(score_chain(completion, str(example["answer"])))


_BARE_NUMBER = re.compile(r"\s*[+-]?\d+(?:\.\d+)?\s*")


def format_reward(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 if the completion is a bare number terminated by a stop string (newline or eos by default), else 0.0.

    Correctness is not checked (combine with ``arith_reward`` through ``weighted_reward``); a completion cut at the
    length limit, without a stop, fails.
    """
    stops = _stops(example)
    head = answer_text(completion, stops)
    terminated = len(head) < len(completion)
    return float(terminated and _BARE_NUMBER.fullmatch(head) is not None)


# ---------------------------------------------------------------------------------------------------- programs
CODE_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last fenced code block (```python ... ```) of the completion, or the whole completion if it has none."""
    blocks = CODE_FENCE.findall(completion)
    return blocks[-1] if blocks else completion


# Runs inside the sandboxed interpreter: sets the rlimits given in argv, reads a nonce from stdin, blocks sockets,
# runs candidate then tests in one namespace, prints the nonce only if both finished (so exiting early with
# status 0 is no pass). Exit codes: 0 pass, 2 assertion, 3 out of memory, 1 anything else.
_HARNESS = r'''
import os, resource, sys, traceback

def main():
    memory_bytes, cpu_seconds, output_bytes = (int(a) for a in sys.argv[1:4])
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nonce = sys.stdin.readline().strip()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(os.devnull)
    import socket, _socket

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    socket.socket = _socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
        setattr(socket, name, refuse)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        for path in sys.argv[4:]:
            with open(path) as f:
                exec(compile(f.read(), os.path.basename(path), "exec"), namespace)
    except AssertionError:
        traceback.print_exc(); sys.stderr.flush(); os._exit(2)
    except MemoryError:
        os.write(2, b"MemoryError\n"); os._exit(3)
    except BaseException:
        traceback.print_exc(); sys.stderr.flush(); os._exit(1)
    sys.stdout.flush()
    os.write(1, ("\n" + nonce + "\n").encode())

main()
'''


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """What became of one sandboxed run: outcome is "passed", "failed" (an assertion), "error" (another
    exception, a crash or a signal), "memory" (out of its address-space limit) or "timeout"."""

    outcome: str
    returncode: int | None
    stderr_tail: str
    seconds: float
    network_isolated: bool


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """The command prefix that gives the child its own network namespace here, or () if none works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in ("-n", "-rn"):
        try:
            probe = subprocess.run([unshare, flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return (unshare, flags)
    return ()


def network_isolation_available() -> bool:
    """Whether programs run in their own network namespace on this host (the guaranteed network block)."""
    return bool(_unshare_prefix())


def _tail(path: str, limit: int = 2000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - limit))
        return f.read().decode("utf-8", "replace")


def run_program(source: str, tests: str = "", *, timeout_s: float = 2.0, memory_mb: int = 512) -> ExecutionResult:
    """Run ``source`` then ``tests`` (Python, one namespace) in the sandbox described in the module docstring."""
    if not (timeout_s > 0 and memory_mb >= 64):
        raise ValueError(f"timeout_s={timeout_s!r}, memory_mb={memory_mb!r}: expected timeout_s > 0, memory_mb >= 64")
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="m1jax-reward-") as root:
        io_dir, work_dir = os.path.join(root, "io"), os.path.join(root, "work")
        os.mkdir(io_dir)
        os.mkdir(work_dir)
        files = {"harness.py": _HARNESS, "candidate.py": source, "tests.py": tests}
        for name, text in files.items():
            with open(os.path.join(io_dir, name), "w") as f:
                f.write(text)
        out_path, err_path = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
        prefix = _unshare_prefix()
        limits = (memory_mb * 2**20, math.ceil(timeout_s) + 1, OUTPUT_LIMIT_BYTES)
        argv = [*prefix, sys.executable, "-I", os.path.join(io_dir, "harness.py"), *map(str, limits)]
        argv += [os.path.join(io_dir, name) for name in ("candidate.py", "tests.py")]
        env = {"PATH": os.defpath, "HOME": work_dir, "LC_ALL": "C.UTF-8"}
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work_dir, env=env, start_new_session=True,
            )
            timed_out = False
            try:
                process.communicate((nonce + "\n").encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process)
        seconds = time.monotonic() - start
        code = process.returncode
        stderr = _tail(err_path)
        passed = code == 0 and nonce in _tail(out_path, 200)
        timed_out = timed_out or code == -signal.SIGXCPU
        outcome = (
            "passed" if passed else "timeout" if timed_out else "failed" if code == 2 else "memory" if code == 3
            else "error"
        )
    return ExecutionResult(outcome, code, stderr, seconds, bool(prefix))


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _tests_source(example: Mapping[str, Any]) -> str:
    if "tests" not in example:
        raise ValueError(f"example has no 'tests' (keys: {sorted(example)}): programming tasks need tests to verify")
    tests = example["tests"]
    if isinstance(tests, str) and tests.strip():
        return tests
    if isinstance(tests, (list, tuple)) and tests and all(isinstance(t, str) for t in tests):
        return "\n".join(tests)
    raise ValueError(f"example['tests']={tests!r}: expected Python source or a non-empty list of statements")


def code_reward(
    completion: str, example: Mapping[str, Any], *, timeout_s: float = 2.0, memory_mb: int = 512,
) -> float:
    """1.0 if the completion's program passes ``example["tests"]`` in the sandbox, 0.0 if an assertion fails.

    A run past ``timeout_s`` raises RewardTimeout; a crash raises ProgramError (ProgramMemoryError when out of
    memory): ``score_batch`` scores both 0 and counts them. Bind other limits with functools.partial.
    """
    result = run_program(extract_code(completion), _tests_source(example), timeout_s=timeout_s, memory_mb=memory_mb)
    if result.outcome == "timeout":
        raise RewardTimeout(f"program ran past {timeout_s} s")
    if result.outcome == "memory":
        raise ProgramMemoryError(f"program exceeded {memory_mb} MiB")
    if result.outcome == "error":
        raise ProgramError(f"program crashed (returncode {result.returncode}): {result.stderr_tail[-500:]}")
    return float(result.outcome == "passed")


# ---------------------------------------------------------------------------------------------------- batches
def _check_verifiable(example: Mapping[str, Any]) -> None:
    if "answer" not in example and "tests" not in example:
        raise ValueError(f"example has neither 'answer' nor 'tests' (keys: {sorted(example)}): no verifiable answer")


def _check_nothing(example: Mapping[str, Any]) -> None:
    del example


arith_reward.check_example = _expected_number
chain_reward.check_example = _expected_number
code_reward.check_example = _tests_source
format_reward.check_example = _check_nothing


def example_checker(reward_fn: RewardFn) -> Callable[[Mapping[str, Any]], Any]:
    """The reward's ``check_example`` (raises ValueError for an unverifiable example), seen through partials.

    Reward functions without one require an "answer" or "tests" key.
    """
    while isinstance(reward_fn, functools.partial):
        reward_fn = reward_fn.func
    return getattr(reward_fn, "check_example", _check_verifiable)


def weighted_reward(terms: Sequence[tuple[RewardFn, float]]) -> RewardFn:
    """sum_k weight_k * reward_k(completion, example), e.g. ``[(arith_reward, 1.0), (format_reward, 0.1)]``."""
    if not terms:
        raise ValueError("terms is empty: pass (reward_fn, weight) pairs")

    def combined(completion: str, example: Mapping[str, Any]) -> float:
        return sum(weight * fn(completion, example) for fn, weight in terms)

    def check(example: Mapping[str, Any]) -> None:
        for fn, _ in terms:
            example_checker(fn)(example)

    combined.check_example = check
    return combined


def _score_one(reward_fn: RewardFn, completion: str, example: Mapping[str, Any]) -> tuple[float, str | None, str]:
    try:
        reward = float(reward_fn(completion, example))
    except TimeoutError as e:
        return 0.0, "timeout", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - any failure of a reward scores 0 and is counted, training goes on
        return 0.0, type(e).__name__, f"{type(e).__name__}: {e}"
    if not math.isfinite(reward):
        return 0.0, "NonFiniteReward", f"reward {reward}"
    return reward, None, ""


def score_batch(
    reward_fn: RewardFn, completions: Sequence[str], examples: Sequence[Mapping[str, Any]], *, max_workers: int = 1,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rewards (len(completions),) float32 and stats for a batch; ``max_workers`` > 1 scores in parallel threads.

    Every example is checked first (ValueError names the index). Then a reward that raises scores 0 and is
    counted: stats = {"count", "mean", "errors", "timeouts", "error_types" (name -> count), "first_error"}.
    """
    if len(completions) != len(examples):
        raise ValueError(
            f"completions has {len(completions)} entries but examples has {len(examples)}: pass one example per "
            "completion (repeat each example G times for G samples)"
        )
    if max_workers < 1:
        raise ValueError(f"max_workers={max_workers}, expected >= 1")
    check = example_checker(reward_fn)
    for index, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise ValueError(f"examples[{index}] is a {type(example).__name__}, expected a dict")
        try:
            check(example)
        except ValueError as e:
            raise ValueError(f"examples[{index}]: {e}") from None
    with ThreadPoolExecutor(max_workers) as pool:
        scored = list(pool.map(functools.partial(_score_one, reward_fn), completions, examples))
    rewards = np.array([reward for reward, _, _ in scored], dtype=np.float32)
    failures = Counter(kind for _, kind, _ in scored if kind is not None)
    timeouts = failures.pop("timeout", 0)
    stats = {
        "count": len(scored),
        "mean": float(rewards.mean()) if len(scored) else 0.0,
        "errors": sum(failures.values()),
        "timeouts": timeouts,
        "error_types": dict(failures),
        "first_error": next((message for _, kind, message in scored if kind is not None), None),
    }
    return rewards, stats
