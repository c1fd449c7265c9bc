"""The command line's checked argument types: every number is checked where argparse parses it, and the message
names the range (used by `m1jax.cli` and by each command's own module, which must not import `m1jax.cli` back)."""
from __future__ import annotations

import argparse
import math

SEED_MAX = 2**31 - 1


def count(minimum: int = 1, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum]; the message names the range."""
    span = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value

    parse.__name__ = f"integer {span}"
    return parse


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in the interval (low, high) with open or closed ends as given."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    span = " and ".join(parts) or "finite"

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number {span}, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {value:g}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {value:g}")
        return value

    parse.__name__ = f"number {span}"
    return parse


def mesh_spec(text: str) -> dict[str, int]:
    """An argparse type for --mesh: "data=2,fsdp=2,expert=2" with the known axis names, sizes >= 1 (the parser is
    m1jax.sharding.parse_mesh's)."""
    from m1jax.sharding import parse_mesh
    try:
        axes = parse_mesh(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if axes is None:
        raise argparse.ArgumentTypeError("empty --mesh: write axis=size, e.g. data=2,expert=4")
    return axes


mesh_spec.__name__ = "mesh"
SEED = count(0, SEED_MAX)
