# Every target sets up what it needs; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint check bench bench-mesh soak torture sim clean

MINUTES ?= 10
# Most tests wait on timers and other processes, not the CPU: two pytest workers finish the suite in about
# two thirds of the time on two cores. Tests that make network namespaces share one worker (xdist_group).
# A worker that crashes ends the run, failed, instead of being replaced (a replacement once left the run hanging).
TEST_WORKERS ?= 2

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; run: make PYTHON=python3 ..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --max-worker-restart=0

lint: $(STAMP)
	$(VENV)/bin/ruff check zmesh tests examples benchmarks
	$(VENV)/bin/ruff format --check zmesh tests examples benchmarks
	$(VENV)/bin/mypy

check: lint test

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]' || echo "Ray could not be installed: benchmarking zmesh alone"
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/security_cost.py

# Not in CI: the mesh's figures (convergence, failure detection, names, restarts, cross-node calls; Ray beside them).
# STALL_MINUTES=10 runs the full stall-tolerance check.
STALL_MINUTES ?= 2
bench-mesh: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]' || echo "Ray could not be installed: benchmarking zmesh alone"
	$(PY) benchmarks/mesh.py --stall-minutes $(STALL_MINUTES)

# Not in CI: a million calls, 100,000 put/get, 10,000 creations; prints RSS, fds and threads per process.
soak: $(STAMP)
	$(PY) benchmarks/soak.py

# Not in CI: the workload-space test, then the mesh's invariant checker, with fresh seeds for MINUTES minutes each; failures print as minimal reproducers.
torture: $(STAMP)
	ZMESH_TORTURE_MINUTES=$(MINUTES) $(PY) -m pytest -q tests/integration/test_torture.py tests/integration/test_torture_tasks.py -x --timeout=0
	ZMESH_SIM_MINUTES=$(MINUTES) $(PY) -m pytest -q -s tests/unit/test_mesh_invariants.py -k drawn -x --timeout=0

# Not in CI: the simulated mesh's invariants (tests/sim/) over fresh drawn histories for MINUTES minutes; a failure prints its shrunk history.
sim: $(STAMP)
	ZMESH_SIM_MINUTES=$(MINUTES) $(PY) -m pytest -q -s tests/unit/test_mesh_invariants.py -k drawn -x --timeout=0

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
