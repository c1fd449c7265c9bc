"""The research notebooks run as notebooks (jupytext -> nbclient, a fresh kernel of this interpreter) and their
committed .ipynb outputs belong to the current .py sources. Each notebook runs under its own `# budget: N s`
(per cell; scale with M1JAX_NOTEBOOK_TIME_SCALE on a slow machine); together they take about 150 s on 2 cores."""
import importlib.util
import os
import sys

import jupytext
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS_DIR = os.path.join(HERE, "..", "notebooks")
_spec = importlib.util.spec_from_file_location("notebooks_render", os.path.join(NOTEBOOKS_DIR, "render.py"))
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)

SOURCES = render.notebook_sources(NOTEBOOKS_DIR)
OWN = ("01_lightning_attention", "02_hybrid_model", "03_routing", "04_cispo_mechanics", "05_planning_m1",
       "06_million_token_prompt")


def test_every_notebook_is_found():
    names = [os.path.splitext(os.path.basename(s))[0] for s in SOURCES]
    missing = [n for n in OWN if n not in names]
    assert not missing, f"notebooks {missing} are missing from notebooks/"
    assert "render" not in names


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_notebook_runs(source):
    budget = render.budget_seconds(source)
    try:
        nb, timings = render.execute(source)
    except CellExecutionError as err:
        pytest.fail(f"{os.path.basename(source)} failed in a cell:\n{err}", pytrace=False)
    print(f"{os.path.basename(source)}: {timings['wall_s']:.1f} s wall, {timings['kernel_cpu_s']:.1f} s kernel CPU, "
          f"budget {budget:.0f} s per cell")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every code cell must have run"


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_committed_outputs_match_source(source):
    """The .ipynb beside each .py holds the same cells (markdown and code), fully executed, without errors."""
    target = render.ipynb_path(source)
    fix = "run `make notebooks` (or `python notebooks/render.py NAME`) and commit the .ipynb"
    assert os.path.exists(target), f"{os.path.basename(target)} is missing: {fix}"
    committed = nbformat.read(target, as_version=4)
    assert render.cells_of(committed) == render.cells_of(jupytext.read(source)), \
        f"{os.path.basename(target)} does not hold the cells of {os.path.basename(source)}: {fix}"
    for cell in committed.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None, f"{os.path.basename(target)} has a cell never run: {fix}"
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, f"{os.path.basename(target)} holds an error output ({errors[0].ename}): {fix}"


def test_runner_uses_this_interpreter_and_reports_failures(tmp_path):
    """A notebook whose second cell raises makes execute raise, after the first cell saw sys.executable."""
    source = tmp_path / "99_broken.py"
    source.write_text("# %%\nimport sys\nassert sys.executable == %r, sys.executable\n\n"
                      "# %%\nraise RuntimeError('the cell failed on purpose')\n" % sys.executable)
    with pytest.raises(CellExecutionError, match="the cell failed on purpose"):
        render.execute(str(source), budget_s=60, cwd=str(tmp_path))


def test_budget_line_and_scale(tmp_path, monkeypatch):
    source = tmp_path / "98_budget.py"
    source.write_text("# %% [markdown]\n# A notebook.\n# budget: 42 s\n\n# %%\nx = 1\n")
    monkeypatch.delenv("M1JAX_NOTEBOOK_TIME_SCALE", raising=False)
    assert render.budget_seconds(str(source)) == 42.0
    monkeypatch.setenv("M1JAX_NOTEBOOK_TIME_SCALE", "2.5")
    assert render.budget_seconds(str(source)) == 105.0
    source.write_text("# %%\nx = 1\n")
    assert render.budget_seconds(str(source)) == 2.5 * render.DEFAULT_BUDGET_S
    monkeypatch.setenv("M1JAX_NOTEBOOK_TIME_SCALE", "fast")
    with pytest.raises(ValueError, match="M1JAX_NOTEBOOK_TIME_SCALE"):
        render.budget_seconds(str(source))
