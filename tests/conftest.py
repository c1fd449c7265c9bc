"""Test setup: 8 fake CPU devices for mesh tests, float32 matmuls at full precision."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


# Under CI every draw uses this seed, as hypothesis replays a fixed sequence there (below): a landing never depends
# on the day's draw, and a run of `CI=true make test` before landing is the run CI repeats. Elsewhere each test
# draws a fresh seed, so developers' runs keep exploring.
CI_SEED = 20261201


def _draw_seed() -> int:
    """A fresh seed per test (CI_SEED under CI), or the one in M1JAX_TEST_SEED to replay a failure."""
    fixed = os.environ.get("M1JAX_TEST_SEED") or (CI_SEED if os.environ.get("CI") else None)
    return int(fixed) if fixed else int(np.random.SeedSequence().entropy % (2**31))


@pytest.fixture(scope="session")
def draw_seed():
    """The seed-drawing function itself, for module-scoped problems (they record the seed on each test using them)."""
    return _draw_seed


@pytest.fixture
def seed(request) -> int:
    """The test's seed: printed in the report of a failing test (replay with M1JAX_TEST_SEED=<seed>)."""
    value = _draw_seed()
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """The one source of test randomness: a numpy Generator seeded by `seed`."""
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"M1JAX_TEST_SEED={value} reproduces this draw"))


# Property-based tests (hypothesis) explore fresh examples on a developer's machine; under CI they replay a fixed
# sequence (derandomize), so a landing never depends on what a random search happened to find that day.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")
