# slc — every target creates .venv and installs what it needs, so a fresh machine
# with nothing but Python can run `make demo` and `make test`.
#
# torch is pinned so pip takes the CPU build this machine has on disk; an
# unpinned torch would pull several GB of CUDA packages. Override with e.g.
#   make test TORCH_SPEC="torch==2.5.1"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY          = $(VENV)/bin/python
PIP         = $(PY) -m pip
STAMP       = $(VENV)/.installed
FUZZ_SECONDS ?= 600

.PHONY: help install models demo test test-unit test-notebooks browser-test bench fuzz soak render notebooks lab clean

help:
	@echo "make demo          create .venv, fetch the real models, compress them, print the table"
	@echo "make test          the whole suite: unit tests, nbval on every notebook, browser check"
	@echo "make bench         codec and model benchmarks (tables for the README)"
	@echo "make fuzz          coverage-guided fuzzing of the stream and file parsers (FUZZ_SECONDS=$(FUZZ_SECONDS))"
	@echo "make render        notebooks -> self-contained HTML in build/html/"
	@echo "make notebooks     re-execute the notebooks in place (after changing what slc prints)"
	@echo "make lab           JupyterLab on the project"

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[notebooks,dev]" "$(TORCH_SPEC)"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

models: $(STAMP)
	$(PY) -m slc.models fetch

demo: models
	$(PY) -m slc.demo

test-unit: models
	$(PY) -m pytest tests -q -p no:cacheprovider

test-notebooks: models
	$(PY) -m pytest --nbval notebooks --nbval-sanitize-with notebooks/sanitize.cfg -q -p no:cacheprovider

browser-test: models
	$(PY) -m pytest tests/browser -q -p no:cacheprovider -m browser

# The browser check runs inside test-unit when Chromium + chromedriver are installed
# (tests/browser skips cleanly otherwise; .ci/run installs them).
test: test-unit test-notebooks

bench: models
	$(PY) bench/codec.py
	$(PY) bench/model.py

fuzz: $(STAMP)
	$(PY) bench/fuzz.py --seconds $(FUZZ_SECONDS)

soak: models
	$(PY) bench/soak.py

render: models
	$(PY) -m slc.render notebooks build/html

# Re-execute the notebooks in place (outputs kept, metadata stripped): run after changing slc output.
notebooks: models
	$(PY) -m slc.render --update notebooks/*.ipynb

lab: models
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf build .pytest_cache .hypothesis
