# slc — every target creates .venv and installs what it needs, so a fresh machine
# with nothing but Python can run `make demo` and `make test`.
#
# Installs come from requirements.lock: the exact versions (every extra) that were
# tested, so a fresh machine gets what CI got. pyproject.toml only states ranges.
# `make lock` re-resolves those ranges in a throwaway venv and rewrites the lock.
#
# torch is pinned so pip takes the CPU build this machine has on disk; an
# unpinned torch would pull several GB of CUDA packages. The lock pins it, and
# `make lock` resolves with TORCH_SPEC, e.g.
#   make lock TORCH_SPEC="torch==2.5.1"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY          = $(VENV)/bin/python
PIP         = $(PY) -m pip
STAMP       = $(VENV)/.installed
LOCK        = requirements.lock
LOCKENV    ?= build/lockenv
FUZZ_SECONDS ?= 600
PEERS_DIR  ?= build/peers

.PHONY: help install lock lint models demo test test-unit test-heavy test-notebooks browser-test bench peers fuzz soak render notebooks lab clean

help:
	@echo "make demo          create .venv, fetch the real models, compress them, print the table"
	@echo "make test          the whole suite: ruff, unit tests, nbval on every notebook, browser check"
	@echo "make lint          ruff check on slc, tests, bench, scripts"
	@echo "make test-heavy    real-model work that takes minutes (block-wise vs whole model, the default recipe)"
	@echo "make lock          re-resolve pyproject's ranges in a throwaway venv, rewrite $(LOCK)"
	@echo "make bench         codec and model benchmarks (tables for the README)"
	@echo "make peers         bench-only: build llama.cpp's llama-quantize / llama-imatrix into $(PEERS_DIR) (~15 min)"
	@echo "make fuzz          coverage-guided fuzzing of the stream and file parsers (FUZZ_SECONDS=$(FUZZ_SECONDS))"
	@echo "make render        notebooks -> self-contained HTML in build/html/"
	@echo "make notebooks     re-execute the notebooks in place (after changing what slc prints)"
	@echo "make lab           JupyterLab on the project"

$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r $(LOCK) || { echo "pip could not install $(LOCK), made for $$(sed -n 's/^# Python \(.*\)\.$$/\1/p' $(LOCK));" \
	    "on another Python or platform run \`make lock\` first"; exit 1; }
	$(PIP) install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# Resolve pyproject.toml's ranges (all extras, torch pinned by TORCH_SPEC) in a fresh
# throwaway venv and freeze it: --all keeps setuptools (torch needs it at run time),
# pip itself is left out, --exclude-editable leaves out slc. torch's local label (+cpu)
# is dropped so the pin reads torch==X.Y.Z as in TORCH_SPEC (pip still takes the CPU
# wheel from disk). The recipe fails if the lock names a CUDA package (nvidia-*, triton).
lock:
	rm -rf $(LOCKENV)
	$(PYTHON) -m venv $(LOCKENV)
	$(LOCKENV)/bin/python -m pip install -q --upgrade pip
	$(LOCKENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LOCKENV)/bin/python -m pip install -q -e ".[notebooks,dev]" "$(TORCH_SPEC)"
	$(LOCKENV)/bin/python -m pip check
	{ echo "# Exact versions slc is tested with: pyproject.toml's dependencies with every extra"; \
	  echo "# (notebooks, dev), torch pinned by TORCH_SPEC=$(TORCH_SPEC)."; \
	  echo "# Produced by \`make lock\`: a fresh venv installed from pyproject's ranges, then"; \
	  echo "# \`pip freeze --all --exclude-editable\` less pip itself, torch's +cpu label dropped."; \
	  echo "# Python $$($(LOCKENV)/bin/python -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())')."; \
	  echo "# \`make\` installs this file, then \`pip install --no-deps -e .\`. Run \`make lock\` to refresh it."; \
	  $(LOCKENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/^(torch[a-z]*==[^+]+)\+[a-z0-9.]+$$/\1/'; \
	} > $(LOCK).tmp
	! grep -inE '^(nvidia-|triton)' $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCKENV)
	@echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) pins"

lint: $(STAMP)
	$(VENV)/bin/ruff check slc tests bench scripts

models: $(STAMP)
	$(PY) -m slc.models fetch

demo: models
	$(PY) -m slc.demo

test-unit: models
	$(PY) -m pytest tests -q -p no:cacheprovider -m "not heavy"

# Real-model work that takes minutes: block-wise vs whole-model allocation and GPTQ on SmolLM2, and
# compress_to_budget's whole default recipe (distillation included) landing on SmolLM2.
test-heavy: models
	$(PY) -m pytest tests -q -p no:cacheprovider -m heavy

test-notebooks: models
	$(PY) -m pytest --nbval notebooks --nbval-sanitize-with notebooks/sanitize.cfg -q -p no:cacheprovider

browser-test: models
	$(PY) -m pytest tests/browser -q -p no:cacheprovider -m browser

# The browser check runs inside test-unit when Chromium + chromedriver are installed
# (tests/browser skips cleanly otherwise; .ci/run installs them).
test: lint test-unit test-notebooks

bench: models
	$(PY) bench/codec.py
	$(PY) bench/model.py

# llama.cpp's own quantiser for bench/peers.py, from the source the llama-cpp-python sdist vendors (CPU,
# cached: a second run does nothing). Nothing else depends on it; bench/peers.py says to run this if missing
# (another PEERS_DIR: give bench/peers.py the same folder as SLC_PEERS_DIR).
peers: $(STAMP)
	PYTHON=$(PY) scripts/build_peers.sh $(PEERS_DIR)

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
