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
DEMO_DIR ?= demo-photos

# Ingest scikit-image's photos plus transformed copies (offline), then query with one of them.
demo: $(STAMP)
	$(BIN)/python -m imgstore.samples $(DEMO_DIR)
	$(BIN)/imgstore --db $(DEMO_DB) ingest $(DEMO_DIR)
	$(BIN)/imgstore --db $(DEMO_DB) index list
	$(BIN)/imgstore --db $(DEMO_DB) query $(DEMO_DIR)/originals/chelsea.png -k 8
	$(BIN)/imgstore --db $(DEMO_DB) info
	@echo "browse it over HTTP: $(BIN)/imgstore --db $(DEMO_DB) serve   (then open http://127.0.0.1:8000/docs)"

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info $(DEMO_DIR) $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
