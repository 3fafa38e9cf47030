# The two commands of the README:
#   make demo  - set up, then run the main job on the embedded SQLite default
#   make test  - set up, lint and type-check, then run the whole test suite (SQLite and PostgreSQL)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser emulator samples demo lint test bench clean

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
	@echo "browse it: $(BIN)/imgstore --db $(DEMO_DB) serve   then open http://127.0.0.1:8000"

# The page tests drive Debian's headless Chromium; install it when missing (as root, with apt).
# Elsewhere those tests skip and say why; in CI (CI set) they fail without it.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "could not install chromium; the browser tests will say so"; \
	else echo "chromium and chromedriver are missing (Debian: apt-get install chromium chromium-driver); the browser tests will skip"; fi

# The int8 extractor's refusal test runs a CPU without int8 dot products (a Haswell: AVX2, no
# VNNI) under QEMU's user-mode emulation (Debian's qemu-user); installed when missing, as root.
emulator:
	@if command -v qemu-x86_64 >/dev/null || [ "$$(uname -m)" != x86_64 ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null) \
	  || echo "could not install qemu-user; the int8 refusal test will say so"; \
	else echo "qemu-user is missing (Debian: apt-get install qemu-user); the int8 refusal test will skip"; fi

# Lint and type-check the package (configuration in pyproject.toml); `make test` runs it first.
lint: $(STAMP)
	$(BIN)/ruff check imgstore
	$(BIN)/mypy

# Real files for the format tests, fetched by pip once (tests/camera_samples.py): the phone and
# camera HEIC/HEIF files of pillow-heif's source package (iPhone, Galaxy, Sony, Xiaomi, Nokia) and
# the ~1,000 odd and broken files of Pillow's. Without them those tests fail in CI and skip,
# saying so, elsewhere.
samples: $(STAMP)
	@$(BIN)/python tests/camera_samples.py >/dev/null || true

test: $(STAMP) browser emulator samples lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info $(DEMO_DIR) $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
