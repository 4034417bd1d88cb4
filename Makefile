# webhookd — `make run` starts the service on webhookd.toml; `make test` runs the whole suite.
# Both create .venv and install what they need first, so they work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/webhookd --config webhookd.toml serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The benchmark (bench/README.md): nginx from the OS packages as the receiver, everything on
# 127.0.0.1, a few minutes. BENCH_ARGS="--quick" for a one-run smoke check, "--only NAME" for one scenario.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/pip install --quiet requests
	bash bench/ensure-nginx.sh
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
