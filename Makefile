# Two commands set everything up on a fresh machine with Python 3.11 and make:
#   make serve   - install, create the CA on first start, run the server and its mail sink
#   make test    - install (with the outside judges: pkilint, openssl, faketime, NSS tools, gpgsm, Postfix, Dovecot), run every test
# Then: make admin ARGS='user add alice@example.org', or `. .venv/bin/activate` for `mailkms` on PATH
PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PROJECT_ENVIRONMENT := $(VENV)
MAILKMS_DATA ?= ./mailkms-data
export MAILKMS_DATA
HOSTNAME ?= localhost
PUBLIC_URL ?=
PORT ?= 8443
MAIL_SINK_PORT ?= 2525
HTTP_PORT ?= 8080

.PHONY: install system-deps serve test test-fast lint bench clean admin client

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --all-extras --quiet
	touch $@

install: $(VENV)/.synced

# Debian tools the tests use as outside judges (as root; CI runs as root).
system-deps:
	@bash scripts/system-deps.sh

serve: install
	@if [ ! -f "$(MAILKMS_DATA)/ca/root.crt.pem" ]; then \
		$(BIN)/mailkms init --hostname "$(HOSTNAME)" $(if $(PUBLIC_URL),--public-url "$(PUBLIC_URL)"); fi
	$(BIN)/mailkms serve --port $(PORT) --mail-sink-port $(MAIL_SINK_PORT) --http-port $(HTTP_PORT)

# The admin commands and the client from the project's own .venv, on the same data folder as
# `make serve`: make admin ARGS='user add alice@example.org'   make client ARGS='status'
admin: install
	@$(BIN)/mailkms $(ARGS)

client: install
	@$(BIN)/mailkms-client $(ARGS)

# Bytecode is cached even where the environment says not to (PYTHONDONTWRITEBYTECODE): the end-to-end
# tests start hundreds of mailkms processes, and each would compile every module it imports again.
test: install system-deps
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(TOOLS)
