# webhookd — `make run` starts the service on webhookd.toml; `make test` runs the whole suite.
# Both create .venv and install what they need first, so they work on a fresh clone: `make run`
# only what the server needs (starlette, uvicorn), `make test` the test extra on top.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

install: $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/webhookd --config webhookd.toml serve

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

# The benchmark (bench/README.md): nginx from the OS packages as the receiver, everything on
# 127.0.0.1, a few minutes. BENCH_ARGS="--quick" for a one-run smoke check, "--only NAME" for one scenario.
.PHONY: bench
bench: $(TEST_STAMP)
	$(BIN)/pip install --quiet requests
	bash bench/ensure-nginx.sh
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
