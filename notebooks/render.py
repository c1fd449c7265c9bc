"""Execute the research notebooks and write their outputs: `make notebooks`, or `python notebooks/render.py [NAME...]`.

Each notebook is a jupytext pair: `NN_name.py` (percent format) is the source a researcher edits, `NN_name.ipynb`
is the same cells with their outputs (text and figures), committed so a repository browser shows them. This script
reads the `.py` with jupytext, runs it top to bottom in a fresh Jupyter kernel (nbclient) whose working directory is
`notebooks/`, and writes the `.ipynb`. tests/test_notebooks.py runs the same `execute` on every notebook.

The kernel is the interpreter running this script (a kernelspec written to a temporary directory), so the notebooks
see the same installed m1jax, whatever Jupyter kernels the machine has. Each notebook may state its time budget
on two otherwise idle CPU cores in a line `# budget: N s` (default DEFAULT_BUDGET_S); a cell running longer than
the budget stops the run. On a slower or busy machine, scale every budget with M1JAX_NOTEBOOK_TIME_SCALE (e.g. 3).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import resource
import sys
import tempfile
import time
from typing import Iterator

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_NAME = "m1jax-notebooks"
DEFAULT_BUDGET_S = 30.0
_BUDGET = re.compile(r"^#\s*budget:\s*([0-9.]+)\s*s\b", re.MULTILINE)


def notebook_sources(directory: str = HERE) -> list[str]:
    """Paths of every notebook source `NN_*.py` in `directory`, in order (this script is not one)."""
    return sorted(glob.glob(os.path.join(directory, "[0-9][0-9]_*.py")))


def ipynb_path(source: str) -> str:
    return os.path.splitext(source)[0] + ".ipynb"


def time_scale() -> float:
    """M1JAX_NOTEBOOK_TIME_SCALE (default 1): every budget is multiplied by it."""
    raw = os.environ.get("M1JAX_NOTEBOOK_TIME_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"M1JAX_NOTEBOOK_TIME_SCALE={raw!r}: pass a positive number (e.g. 3 on a slow machine)")
    return value


def budget_seconds(source: str) -> float:
    """The notebook's `# budget: N s` line (else DEFAULT_BUDGET_S), times time_scale()."""
    with open(source, encoding="utf-8") as f:
        match = _BUDGET.search(f.read())
    return (float(match.group(1)) if match else DEFAULT_BUDGET_S) * time_scale()


@contextlib.contextmanager
def kernelspec_for_this_interpreter() -> Iterator[str]:
    """A kernelspec named KERNEL_NAME that launches ipykernel with sys.executable, found through JUPYTER_PATH."""
    with tempfile.TemporaryDirectory(prefix="m1jax-kernel-") as root:
        spec_dir = os.path.join(root, "kernels", KERNEL_NAME)
        os.makedirs(spec_dir)
        with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
            json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                       "display_name": "m1jax (this interpreter)", "language": "python",
                       "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"}}, f)  # figures inline
        before = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = root if before is None else root + os.pathsep + before
        try:
            yield KERNEL_NAME
        finally:
            if before is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = before


def _strip_volatile(nb: nbformat.NotebookNode) -> None:
    """Drop per-run timestamps so re-rendering an unchanged notebook changes only what it prints."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)


def execute(source: str, *, budget_s: float | None = None, cwd: str = HERE) -> tuple[nbformat.NotebookNode, dict]:
    """Run the notebook source top to bottom in a fresh kernel. Returns (executed notebook, timings), timings with
    "wall_s" and "kernel_cpu_s" (user + system CPU seconds of the kernel process, which busy cores do not inflate).

    Raises nbclient's CellExecutionError (with the failing cell and its traceback) when a cell raises, and
    CellTimeoutError when one cell runs past the budget.
    """
    nb = jupytext.read(source)
    budget = budget_seconds(source) if budget_s is None else budget_s
    with kernelspec_for_this_interpreter() as kernel_name:
        client = NotebookClient(nb, kernel_name=kernel_name, timeout=int(budget) + 1, allow_errors=False,
                                resources={"metadata": {"path": cwd}})
        begin, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        client.execute()
        seconds = time.perf_counter() - begin
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    _strip_volatile(nb)
    return nb, {"wall_s": seconds, "kernel_cpu_s": cpu}


def cells_of(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """(cell type, source) of every cell: how a committed .ipynb is compared with its .py."""
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def render(source: str) -> dict:
    """Execute one notebook and write its .ipynb beside it. Returns the timings of `execute`."""
    nb, timings = execute(source)
    nbformat.write(nb, ipynb_path(source))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names or prefixes (e.g. 03 or 03_routing); default: all")
    args = parser.parse_args(argv)
    sources = notebook_sources()
    if args.names:
        chosen = [s for s in sources if any(os.path.basename(s).startswith(n) for n in args.names)]
        unknown = [n for n in args.names if not any(os.path.basename(s).startswith(n) for s in sources)]
        if unknown:
            parser.error(f"no notebook matches {unknown}; notebooks: {[os.path.basename(s) for s in sources]}")
        sources = chosen
    failed = []
    for source in sources:
        name = os.path.basename(source)
        try:
            timings = render(source)
        except (CellExecutionError, CellTimeoutError) as err:  # report it, render the others, exit non-zero
            print(f"{name}: FAILED, its .ipynb is left as it was\n{err}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        print(f"{os.path.basename(ipynb_path(source)):34s} {timings['wall_s']:6.1f} s wall, "
              f"{timings['kernel_cpu_s']:6.1f} s kernel CPU (budget {budget_seconds(source):.0f} s)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
