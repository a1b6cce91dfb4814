# Two entry points: `make demo` (the main job on the default corpus) and `make test` (the test suite).
# Both create .venv in the repository root and install treeffn into it first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
EXTRAS  ?= test,plot,data,tensorboard,eval,hf,gguf
STAMP   := $(VENV)/.installed-$(shell echo "$(EXTRAS)" | tr ',' '-')

.PHONY: demo test test-slow bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch ' + v + ' installed; expected 2.13.0')"
	@touch $@

install: $(STAMP)

demo: install
	$(BIN)/treeffn demo --overwrite

test: install
	$(BIN)/python -m pytest -q -rs

test-slow: install
	$(BIN)/python -m pytest -q -rs -m slow

bench: install
	$(BIN)/treeffn bench train-ffn
	$(BIN)/treeffn bench layer

clean:
	rm -rf $(VENV) build src/*.egg-info
