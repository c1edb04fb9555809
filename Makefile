# The two commands of the README:
#   make demo   set up a fresh machine (.venv) and run the main job
#   make test   set up a fresh machine (.venv) and run the test suite
# Both honour PIP_FIND_LINKS (a folder of prebuilt wheels, e.g. ../shared/wheels) and
# TURBOX_VENV (another venv location); see tools/setup_env.sh.

TURBOX_VENV ?= $(CURDIR)/.venv
export TURBOX_VENV
PY := $(TURBOX_VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-cuda clean

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) tools/train.py configs/smoke/smoke_turbox.py --work-dir work_dirs/demo/train
	$(PY) tools/benchmark.py configs/smoke/smoke_stock.py configs/smoke/smoke_turbox.py \
		--iters 24 --warmup 4 --out work_dirs/demo/benchmark

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

# On a CUDA machine: only the GPU tests.
test-cuda: setup
	$(PY) -m pytest tests -m cuda $(PYTEST_ARGS)

clean:
	rm -rf work_dirs build dist *.egg-info .pytest_cache
