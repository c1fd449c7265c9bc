"""`m1jax eval` options (scaffold: the command is being built)."""
import argparse


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return p


def eval_main(args) -> int:
    raise SystemExit("m1jax eval: not built yet")
