# freeze-parity: every target creates the virtual environment on first use.
# VENV may point outside the clone (.ci/run does, keyed by a hash of the
# dependency files) so CI clones share one ~7 GB environment.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
# The project itself is installed editable from *this* checkout; the stamp is
# keyed by the checkout's path, so a shared VENV is re-pointed at each clone.
PROJECT_STAMP := $(VENV)/.project-$(shell echo "$(abspath .)" | md5sum | cut -c1-12)
# two xdist workers (the machine has 2 cores); each test file is one work unit
# (tests/conftest.py), so module fixtures are built once and shared runs computed once
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: venv test demo bench lint clean

venv: $(PROJECT_STAMP)

$(DEPS_STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -c constraints.txt setuptools wheel
	# Runtime and dev dependencies from pyproject.toml, pinned by constraints.txt.
	$(PY) -c "import tomllib,sys; p=tomllib.load(open('pyproject.toml','rb'))['project']; print('\n'.join(p['dependencies']+p['optional-dependencies']['dev']))" > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet -c constraints.txt -r $(VENV)/requirements.txt
	touch $@

$(PROJECT_STAMP): $(DEPS_STAMP) pyproject.toml
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@echo "$(abspath .)" > $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/freeze-parity compare

bench: venv
	$(VENV)/bin/freeze-parity bench
	$(VENV)/bin/freeze-parity bench --replicas 2
	$(VENV)/bin/freeze-parity bench --port
	$(VENV)/bin/freeze-parity bench --verdicts
	$(VENV)/bin/freeze-parity bench --verdicts --arch vit

lint: venv
	$(VENV)/bin/ruff check shared tf_impl torch_impl tests

clean:
	rm -rf .venv build *.egg-info .pytest_cache reports
