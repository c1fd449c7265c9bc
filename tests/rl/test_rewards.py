"""Verifiable rewards: numeric answers, format, sandboxed code execution, batch scoring that never stops."""
import functools
import math
import socket
import threading

import numpy as np
import pytest

from m1jax.rl import rewards

ARITH = {"prompt": "12+30=", "answer": 42}
SQUARE_TESTS = {"tests": ["assert square(3) == 9", "assert square(-4) == 16"]}
CORRECT = "```python\ndef square(x):\n    return x * x\n```"
WRONG = "def square(x):\n    return 2 * x\n"
LOOPS = "def square(x):\n    while True:\n        pass\n"
HOGS = "def square(x):\n    return x * x\nhog = [bytes(2**24) for _ in range(10**5)]\n"
RAISES = "def square(x):\n    raise RuntimeError('boom')\n"
TIMEOUT_S = 1.0


@pytest.mark.parametrize(
    "completion, example, want",
    [
        ("42\n", ARITH, 1.0),
        ("the answer is 42", ARITH, 1.0),
        ("12+30=42.\nnow 7", ARITH, 1.0),  # only the text before the first stop counts
        ("42.0<end_of_sentence>", ARITH, 1.0),
        ("41\n", ARITH, 0.0),
        ("4 2\n", ARITH, 0.0),
        ("42abc\n", ARITH, 0.0),
        ("x42\n", ARITH, 0.0),
        ("\n42", ARITH, 0.0),
        ("%$#@ garbage", ARITH, 0.0),
        ("", ARITH, 0.0),
        ("7-12=-5\n", {"answer": "-5"}, 1.0),
        ("12-5\n", {"answer": -5}, 0.0),
        ("2.5 |", {"answer": 2.5, "stop": "|"}, 1.0),
        ("2.50", {"answer": "2.5"}, 1.0),
    ],
)
def test_arith_reward(completion, example, want):
    assert rewards.arith_reward(completion, example) == want


def test_arith_reward_rejects_unverifiable_examples():
    with pytest.raises(ValueError, match="answer"):
        rewards.arith_reward("42", {"prompt": "12+30="})
    for bad in ("forty-two", None, float("nan"), True):
        with pytest.raises(ValueError, match="answer"):
            rewards.arith_reward("42", {"answer": bad})


@pytest.mark.parametrize(
    "completion, want",
    [("42\n", 1.0), (" -7 <end_of_sentence>", 1.0), ("42", 0.0), ("the answer is 42\n", 0.0), ("\n", 0.0)],
)
def test_format_reward(completion, want):
    assert rewards.format_reward(completion, ARITH) == want


def test_weighted_reward_sums_terms_and_checks_all():
    combined = rewards.weighted_reward([(rewards.arith_reward, 1.0), (rewards.format_reward, 0.25)])
    assert combined("42\n", ARITH) == 1.25
    assert combined("answer: 42\n", ARITH) == 1.0
    assert combined("41\n", ARITH) == 0.25
    with pytest.raises(ValueError, match="answer"):
        rewards.score_batch(combined, ["42\n"], [{"prompt": "1+1="}])


def test_extract_code_takes_last_fenced_block():
    text = "first\n```python\nx = 1\n```\nthen\n```\ny = 2\n```\n"
    assert rewards.extract_code(text) == "y = 2\n"
    assert rewards.extract_code("z = 3") == "z = 3"


def test_code_reward_outcomes():
    reward = functools.partial(rewards.code_reward, timeout_s=TIMEOUT_S, memory_mb=256)
    assert reward(CORRECT, SQUARE_TESTS) == 1.0
    assert reward(WRONG, SQUARE_TESTS) == 0.0
    assert reward(CORRECT, {"tests": "assert square(2) == 4\nassert square(0) == 0"}) == 1.0
    with pytest.raises(rewards.ProgramError, match="boom"):
        reward(RAISES, SQUARE_TESTS)
    with pytest.raises(rewards.ProgramError, match="SyntaxError"):
        reward("def square(x) return x", SQUARE_TESTS)
    with pytest.raises(ValueError, match="tests"):
        reward(CORRECT, {"tests": []})


def test_run_program_timeout_and_memory_limits():
    looped = rewards.run_program(LOOPS + "square(1)\n", timeout_s=TIMEOUT_S)
    assert looped.outcome == "timeout"
    assert TIMEOUT_S <= looped.seconds < TIMEOUT_S + 1.5
    hog = rewards.run_program(HOGS, memory_mb=256, timeout_s=5.0)
    assert hog.outcome == "memory" and hog.seconds < 5.0
    assert rewards.run_program("x = bytearray(100 * 2**20)", memory_mb=512).outcome == "passed"


def test_run_program_cannot_fake_a_pass_by_exiting_early():
    for early_exit in ("import sys; sys.exit(0)", "import os; os._exit(0)"):
        assert rewards.run_program(early_exit, "assert False").outcome == "error"


def test_run_program_caps_output_size():
    spam = "import sys\nfor _ in range(40):\n    sys.stdout.write('x' * 2**20)\n"
    assert rewards.run_program(spam, timeout_s=5.0).outcome == "error"


def test_sandbox_has_empty_workdir_stripped_environment_and_limits(monkeypatch):
    monkeypatch.setenv("M1JAX_TEST_SECRET", "token")
    program = "import os\nassert os.listdir('.') == []\nassert 'M1JAX_TEST_SECRET' not in os.environ\n"
    program += "assert set(os.environ) <= {'PATH', 'HOME', 'LC_ALL', 'LC_CTYPE'}, sorted(os.environ)\n"
    program += "import resource\nassert resource.getrlimit(resource.RLIMIT_AS) == (300 * 2**20,) * 2\n"
    program += "assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)\n"
    program += "assert resource.getrlimit(resource.RLIMIT_CPU)[0] == 3\n"
    result = rewards.run_program(program, timeout_s=1.5, memory_mb=300)
    assert result.outcome == "passed", result.stderr_tail


@pytest.fixture
def listening_port():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(3)
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()
    thread.join()


def test_network_is_blocked_with_and_without_a_namespace(listening_port, monkeypatch):
    connect = f"import socket\ns = socket.create_connection(('127.0.0.1', {listening_port}), timeout=0.5)\n"
    with socket.create_connection(("127.0.0.1", listening_port), timeout=0.5):
        pass  # the server is reachable from outside the sandbox
    result = rewards.run_program(connect)
    assert result.outcome == "error" and "OSError" in result.stderr_tail
    monkeypatch.setattr(rewards, "_unshare_prefix", lambda: ())  # the in-process socket patch alone
    result = rewards.run_program(connect)
    assert result.outcome == "error" and "network access is disabled" in result.stderr_tail


@pytest.mark.skipif(not rewards.network_isolation_available(), reason="no network namespace on this host")
def test_network_namespace_blocks_even_a_bypassed_socket_module(listening_port, monkeypatch):
    # reach the original socket type behind the in-process patch: only the namespace stops it
    program = (
        "import socket\nreal = socket.socket.__mro__[2]\ns = real(socket.AF_INET, socket.SOCK_STREAM)\n"
        f"try:\n    s.connect(('127.0.0.1', {listening_port}))\n    connected = True\n"
        "except OSError:\n    connected = False\nassert not connected, 'connected'\n"
    )
    result = rewards.run_program(program)
    assert result.network_isolated and result.outcome == "passed", result.stderr_tail
    monkeypatch.setattr(rewards, "_unshare_prefix", lambda: ())
    unisolated = rewards.run_program(program)
    assert not unisolated.network_isolated and unisolated.outcome == "failed", unisolated.stderr_tail


def test_score_batch_counts_failures_and_goes_on():
    # a looser limit than elsewhere: six programs share two CPU cores here
    reward = functools.partial(rewards.code_reward, timeout_s=1.5, memory_mb=256)
    completions = [CORRECT, WRONG, LOOPS + "square(1)\n", HOGS, RAISES, CORRECT]
    scores, stats = rewards.score_batch(reward, completions, [SQUARE_TESTS] * 6, max_workers=6)
    np.testing.assert_array_equal(scores, [1, 0, 0, 0, 0, 1])
    assert scores.dtype == np.float32
    assert stats["timeouts"] == 1 and stats["errors"] == 2 and stats["count"] == 6
    assert stats["error_types"] == {"ProgramMemoryError": 1, "ProgramError": 1}
    assert math.isclose(stats["mean"], 2 / 6, rel_tol=1e-6)


def test_score_batch_scores_raising_and_non_finite_rewards_zero():
    def flaky(completion, example):
        if completion == "raise":
            raise KeyError("no such thing")
        if completion == "slow":
            raise TimeoutError("too slow")
        return float("nan") if completion == "nan" else 0.5

    scores, stats = rewards.score_batch(flaky, ["ok", "raise", "nan", "slow"], [ARITH] * 4)
    np.testing.assert_array_equal(scores, [0.5, 0, 0, 0])
    assert stats["errors"] == 2 and stats["timeouts"] == 1
    assert stats["error_types"] == {"KeyError": 1, "NonFiniteReward": 1}
    assert "KeyError" in stats["first_error"]
    _, clean = rewards.score_batch(rewards.arith_reward, ["42\n"], [ARITH])
    assert clean["errors"] == clean["timeouts"] == 0 and clean["first_error"] is None


def test_score_batch_rejects_unverifiable_tasks_up_front():
    calls = []

    def counting(completion, example):
        calls.append(completion)
        return 1.0

    with pytest.raises(ValueError, match=r"examples\[1\].*verifiable"):
        rewards.score_batch(counting, ["a", "b"], [ARITH, {"prompt": "write a poem"}])
    assert calls == []
    with pytest.raises(ValueError, match=r"examples\[0\].*tests"):
        rewards.score_batch(rewards.code_reward, [CORRECT], [ARITH])
    with pytest.raises(ValueError, match=r"examples\[0\].*answer"):
        rewards.score_batch(functools.partial(rewards.arith_reward), ["1"], [SQUARE_TESTS])
    with pytest.raises(ValueError, match="completions"):
        rewards.score_batch(rewards.arith_reward, ["1", "2"], [ARITH])
    scores, _ = rewards.score_batch(rewards.format_reward, ["1\n"], [{"prompt": "any"}])
    assert scores.tolist() == [1.0]
