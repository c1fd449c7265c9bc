"""The research notebooks (jupytext percent-format .py files) run top to bottom on tiny configs."""
import glob
import os
import runpy

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.py")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    runpy.run_path(path, run_name="__main__")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2
