# The README's commands. `make train` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup train test test-fast test-pure bench clean

setup: $(VENV)/.deps $(VENV)/.built

# Pinned dependencies (torch==2.13.0 first, so nothing else pulls a CUDA build of torch).
$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=23.1"
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements-dev.txt
	touch $@

# The package itself, editable, built against the torch above (hence --no-build-isolation).
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -c "import torch_xent; torch_xent.show_config()"
	touch $@

train: setup
	$(PY) train.py

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The suite without the tests marked slow (minutes or several GB of memory each).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

# A pure-Python install as users get it without a compiler (TORCH_XENT_BUILD_EXT=0), in its own
# virtual environment, and the correctness tests that apply to it, run from tests/ so that they import
# the installed copy (not this checkout, which may hold a built extension).
PURE_VENV ?= .venv-pure
PURE_TESTS ?= test_cross_entropy.py test_aten.py test_worked_example.py test_linear.py test_torch_inputs.py test_compile.py
test-pure:
	$(PYTHON) -m venv $(PURE_VENV)
	$(PURE_VENV)/bin/python -m pip install --upgrade "pip>=23.1"
	$(PURE_VENV)/bin/python -m pip install torch==2.13.0
	$(PURE_VENV)/bin/python -m pip install -r requirements-dev.txt
	TORCH_XENT_BUILD_EXT=0 $(PURE_VENV)/bin/python -m pip install --no-build-isolation --no-deps --force-reinstall .
	cd tests && ../$(PURE_VENV)/bin/python -c "import torch_xent; torch_xent.show_config(); \
		assert not torch_xent._native.loaded(), 'the extension was loaded: not a pure-Python install'"
	cd tests && ../$(PURE_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS) $(PURE_TESTS)

bench: setup
	$(PY) benchmarks/bench_xent.py

clean:
	rm -rf build *.egg-info torch_xent/*.so $(VENV) $(PURE_VENV)
