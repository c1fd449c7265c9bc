"""`m1jax serve` options (scaffold: the command is being built)."""
import argparse


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return p


def serve_main(args) -> int:
    raise SystemExit("m1jax serve: not built yet")
