# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each bootstraps .venv with the first Python >= 3.12 that really runs.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PY_CANDIDATES := python3.13 python3.12 python3 python \
	$(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python) \
	$(wildcard /usr/local/bin/python3.1[2-9]) $(wildcard /usr/bin/python3.1[2-9])
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
REF_PY_CANDIDATES := python3.11 $(wildcard $(HOME)/.pyenv/versions/3.11*/bin/python)

.PHONY: demo test bench card-wheels fixtures clean notebooks

$(STAMP): setup.cfg pyproject.toml
	@set -e; found=""; \
	for c in $(PY_CANDIDATES); do \
	  if "$$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then found="$$c"; break; fi; \
	done; \
	if [ -z "$$found" ]; then \
	  echo "error: no working Python >= 3.12 found (tried: $(PY_CANDIDATES)). Install Python 3.12 (jax 0.11 needs it) and retry." >&2; exit 1; \
	fi; \
	echo "using $$found ($$("$$found" --version 2>&1))"; \
	rm -rf $(VENV); "$$found" -m venv $(VENV); \
	$(PY) -m pip install --quiet --upgrade pip; \
	$(PY) -m pip install --quiet -e '.[test]'; \
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m m1jax.demo

# Two workers that take tests from each other's queue (worksteal). A worker that dies (a native crash: one
# segfault inside XLA's CPU compiler was seen in CI on 2026-11-30 and not reproduced in later runs) reruns its
# test once on a fresh worker; an ordinary failure is never rerun. (loadfile was used before: after a worker
# crash its rescheduling left both workers waiting for work, and the run hung until CI's limit.)
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --reruns 1 --only-rerun "crashed while running" tests

# Re-execute every notebook (notebooks/NN_*.py, jupytext percent format) and refresh the committed .ipynb outputs.
notebooks: $(STAMP)
	$(PY) notebooks/render.py

# GPU benchmarks (run on the device machine with its own python: `python3 benchmarks/NAME.py`)
bench:
	PYTHONPATH=. python3 benchmarks/lightning_attention.py

# The GPU machine has no fastapi or uvicorn, nor the lightning peer flash-linear-attention (nothing can be fetched
# there): `benchmarks/serve.py --http` and the lightning benchmarks need them carried as wheels. This downloads
# setup.cfg's server pins and their needs, and fla-core (pure Python + Triton: the card's torch and triton serve it)
# with einops, into .whl/ (git-ignored); a device call names .whl in its carry and starts with the install line
# printed last.
CARD_PEERS := fla-core==0.6.0 einops==0.8.2
card-wheels: $(STAMP)
	rm -rf .whl; $(PY) -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux2014_x86_64 -d .whl \
	  $$(grep -Eo '(fastapi|uvicorn|httpx)==[0-9.]+' setup.cfg)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .whl $(CARD_PEERS)
	@echo 'python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.'

# Regenerate the parity fixtures with transformers in a separate Python 3.11 venv (never in .venv).
fixtures:
	@set -e; found=""; \
	for c in $(REF_PY_CANDIDATES); do "$$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' >/dev/null 2>&1 && { found="$$c"; break; }; done; \
	[ -n "$$found" ] || { echo "error: the reference needs Python 3.11 (CPU torch wheel)" >&2; exit 1; }; \
	[ -x .refvenv/bin/python ] || { "$$found" -m venv .refvenv; .refvenv/bin/pip install --quiet torch==2.13.0 transformers==5.24.0 safetensors numpy; }; \
	.refvenv/bin/python tests/fixtures/make_parity_fixtures.py

clean:
	rm -rf $(VENV) *.egg-info
