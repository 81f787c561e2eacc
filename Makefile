# Two set-up commands (see README): `make demo` and `make test`. Everything else hangs off `install`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STACK_STAMP := $(VENV)/.installed-stack
# Debian's packages of the clinical stack: the PACS, its DICOMweb plugin, and the browser that runs OHIF.
STACK_DEBS := orthanc orthanc-dicomweb chromium
export MONAI_LABEL_TRACKING_ENABLED ?= false
SRC := $(wildcard medmeta_plugin apps tests)

.PHONY: install install-stack test test-slow test-stack lint format demo demo-pacs clean

install: $(STAMP)

# Re-run only when the declared dependencies change; a second `make install` does nothing.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# The `stack` extra (Playwright) on top of `test`; Playwright's own browser download is never run.
install-stack: $(STACK_STAMP)

$(STACK_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,stack]"
	@touch $(STACK_STAMP)

lint: install
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

format: install
	$(BIN)/ruff check --fix $(SRC)
	$(BIN)/ruff format $(SRC)

test: lint
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info

# The demo: a MONAI Label server on the sample scans with the shipped backbone (see README, Quick start).
demo: install
	$(BIN)/medmeta demo

# The clinical stack (Orthanc + DICOMweb + Chromium from Debian's packages, OHIF from monailabel); see docs/STACK.md.
test-stack: install-stack
	@missing=$$(for p in $(STACK_DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | \
		grep -q ' installed$$' || echo $$p; done); \
	test -z "$$missing" || (echo "apt-get install $$missing" && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing)
	$(BIN)/python -m pytest -q -m stack

# The clinical stack for a person to try: Orthanc (Debian's packages) + the app on its DICOMweb + OHIF.
demo-pacs: install
	command -v Orthanc >/dev/null || (apt-get update -qq && apt-get install -y -qq orthanc orthanc-dicomweb)
	$(BIN)/medmeta demo-pacs
