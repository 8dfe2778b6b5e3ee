# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install demo test

# torch is installed first and pinned only when absent: a CPU machine then gets the 2.13.0 build the
# project is tested with, and a machine that already has its own (CUDA) torch keeps it.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e .

demo: install
	$(PYTHON) -m llamatron demo

# The test extras only for the tests: the demo needs none of them. One worker per core (at most 8), a
# whole test file per worker at a time (a file's fixtures, e.g. the Slurm cluster, are built once).
test: install
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pytest -q -n auto --maxprocesses 8 --dist loadfile
