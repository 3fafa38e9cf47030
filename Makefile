# The two commands of the README:
#   make demo  - set up, then run the main job on the embedded SQLite default
#   make test  - set up, then run the whole test suite (SQLite and PostgreSQL)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

DEMO_DB ?= imgstore.db

demo: $(STAMP)
	$(BIN)/imgstore --db $(DEMO_DB) db upgrade
	$(BIN)/imgstore --db $(DEMO_DB) info

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info demo-store
