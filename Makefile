# Set-up and entry points. `make demo` and `make test` set up .venv first (Python 3.11+).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch first (the CPU wheel where one is at hand), then the rest, then harden itself, and torchattacks last
# without its requirements (torchvision, requests, tqdm: harden's code path imports none of them). Last, so that
# no later resolver run reports its missing requirements as an ERROR. pyautoattack (tests only) likewise.
$(STAMP): setup.cfg pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip install --quiet --no-deps torchattacks==3.5.1
	# tests only: the AutoAttack authors' reference code, to cross-check our standard suite (torch + numpy only)
	$(BIN)/pip install --quiet --no-deps pyautoattack==0.2.0
	touch $(STAMP)

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

test: setup
	$(BIN)/python -m pytest -q -n auto  # one worker per core (pytest-xdist), one thread each (tests/conftest.py)

clean:
	rm -rf $(VENV) examples/out
