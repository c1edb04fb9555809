# The two commands of the README:
#   make demo   set up a fresh machine (.venv) and run the main job
#   make test   set up a fresh machine (.venv) and run the test suite
# Both honour PIP_FIND_LINKS (a folder of prebuilt wheels, e.g. ../shared/wheels) and
# TURBOX_VENV (another venv location); see tools/setup_env.sh.

TURBOX_VENV ?= $(CURDIR)/.venv
export TURBOX_VENV
PY := $(TURBOX_VENV)/bin/python
PYTEST_ARGS ?=
# Processes that run the test files (pytest-xdist, a whole file to one process, so a module's
# fixtures are built once); 0 runs everything in this one process.
TEST_WORKERS ?= 2
# Threads of torch (and OpenMP) in each test process, and in the trainings the tests start:
# the machine's cores shared among the workers, so that the workers do not oversubscribe the
# cores (2 workers of 2 threads each on 2 cores ran two slow tests 8% slower than 1 thread each).
# (TEST_WORKERS=0: one process, every core; never fewer than 1 thread.)
TEST_THREADS ?= $(shell w=$(TEST_WORKERS); [ "$$w" -gt 0 ] || w=1; t=$$(( $$(nproc) / w )); \
	echo $$(( t > 0 ? t : 1 )))

.PHONY: setup demo test test-cuda clean

setup:
	bash tools/setup_env.sh

# Sparse4D v3 stock vs turbox: tiny configs without a GPU, full size with one.
demo: setup
	PYTHON=$(PY) bash tools/sparse4d_benchmark.sh auto work_dirs/demo/benchmark

test: setup
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile \
		$(PYTEST_ARGS)

# On a CUDA machine: only the GPU tests.
test-cuda: setup
	$(PY) -m pytest tests -m cuda $(PYTEST_ARGS)

clean:
	rm -rf work_dirs build dist *.egg-info .pytest_cache
