# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install when the project's dependencies change.
# pip's notices about this machine's local package mirrors are filtered out; its exit code is kept.
# Bytecode: pip compiles every installed file on one core (about 50 of its 130 s here: torch's
# CUDA wheel alone is 6 GB); --no-compile and compileall on all cores give the same .pyc files in
# about half that time. compileall's exit status is ignored: some packages ship files for newer
# Pythons (torch's py312_intrinsics.py) that never compile here and are never imported.
PIP_INSTALL = bash -o pipefail -c "$(BIN)/python -m pip install -q --no-compile -e '.[$(1)]' 2>&1 | { grep -v '^WARNING: Location' || true; }"
COMPILE_VENV = $(BIN)/python -m compileall -qq -j 0 $(VENV)/lib >/dev/null 2>&1 || true
EXTRAS := test,runtimes
$(STAMP): pyproject.toml | $(BIN)/python
	$(call PIP_INSTALL,$(EXTRAS))
	$(COMPILE_VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh

# Two pytest workers (pytest-xdist): most tests run one torch thread or a subprocess, so two
# processes keep both CI cores busy (measured on a quiet 2-core machine: 16:22 serial -> 7:10).
# TEST_WORKERS=0 runs in one process; more workers need more RAM (each imports torch).
# --durations: the 20 slowest tests end every run's log (the suite's 15-minute budget in CI).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=20 tests

# The docs site: the pinned `docs` extra (mkdocs, mkdocs-material) into the same venv, then
# `mkdocs build --strict`; the CLI and config reference pages are generated from the code during
# the build (tools/gen_cli_reference.py is an mkdocs hook), so they cannot go stale.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): pyproject.toml | $(STAMP)
	$(call PIP_INSTALL,docs)
	$(COMPILE_VENV)
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs demo-out .pytest_cache site
