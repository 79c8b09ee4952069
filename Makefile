# `make demo`, `make test` and `make test-fast` work on a fresh machine: each creates or refreshes
# .venv at the repository root, then uses it (tools/install.sh: uv when it can, else pip). The demo
# needs only the package; the tests and the viewer also need the `test` and `app` extras.
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
FULL := $(VENV)/.installed-full
TORCH := torch==2.14.1 torchvision==0.29.1
TORCH_RANGE := "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"

.PHONY: venv demo test test-fast lint view clean

INSTALL := VENV=$(VENV) tools/install.sh
INSTALL_COMPILED := UV_COMPILE_BYTECODE=1 $(INSTALL)

$(CORE): pyproject.toml tools/install.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(INSTALL) $(TORCH) -e . || $(INSTALL) $(TORCH_RANGE) -e .
	touch $(CORE)

# the tests start many interpreters and import much more: compile every installed module once
$(FULL): $(CORE)
	$(INSTALL_COMPILED) $(TORCH) -e ".[test,app]" || $(INSTALL_COMPILED) $(TORCH_RANGE) -e ".[test,app]"
	touch $(FULL)

venv: $(FULL)

# uv installs no bytecode for the demo's environment: the demo's first run writes that of what it
# imports (about 17 s), even under PYTHONDONTWRITEBYTECODE, which would make every run compile again
demo: $(CORE)
	PYTHONDONTWRITEBYTECODE= $(PY) tools/demo.py --overwrite

view: $(FULL)
	$(PY) tools/view.py

# the full suite, what CI runs: one pytest-xdist worker per core (whole files each), one torch thread each
test: $(FULL)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile --durations=15 tests

# daily work: no subprocess-heavy, multi-process or browser tests
test-fast: $(FULL)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

lint: $(FULL)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) demo-output
