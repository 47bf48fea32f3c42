# The two commands of the README: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup demo test test-all clean

setup:
	@bash tools/setup_env.sh $(VENV)

demo: setup
	@bash tools/demo.sh $(VENV) $(DEMO_OUT)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-all: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
