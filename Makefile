# relayd: the two commands of the README are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
CONFIG ?= config/relayd.toml

.PHONY: run test test-fast test-min lint bench bench-quick debs haraka clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## run: set up and run the daemon in the foreground on the embedded default (./var)
run: $(STAMP)
	$(BIN)/relayd --config $(CONFIG)

## debs: Debian packages the tests and benchmarks use (swaks, postfix's smtp-sink/smtp-source)
debs:
	sh scripts/install-debs.sh

## haraka: the bench's Haraka peer, npm packages into .cache/haraka (pinned; ~10 s when fresh)
haraka: debs
	sh scripts/install-haraka.sh

## test: set up, then ruff, mypy and the whole pytest suite (slow tests included)
test: $(STAMP) debs haraka lint
	PROMTOOL=$(CURDIR)/.cache/prometheus/usr/bin/promtool $(BIN)/pytest -q -p no:cacheprovider tests bench

## test-fast: the suite without the slow end-to-end and crash tests
test-fast: $(STAMP) lint
	$(BIN)/pytest -q -p no:cacheprovider -m 'not slow' tests

## test-min: the fast suite with every runtime dependency at its declared floor,
## in its own venv (constraints generated from pyproject by scripts/min-constraints.py)
VENV_MIN := .cache/venv-min
test-min: debs
	test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python scripts/min-constraints.py > $(VENV_MIN)/constraints.txt
	$(VENV_MIN)/bin/pip install --quiet -c $(VENV_MIN)/constraints.txt -e '.[test]'
	$(VENV_MIN)/bin/python scripts/min-constraints.py --check
	$(VENV_MIN)/bin/pytest -q -p no:cacheprovider -m 'not slow' tests

lint: $(STAMP)
	$(BIN)/ruff check relayd control tests bench
	$(BIN)/mypy

## bench: the standard benchmark set against Postfix (with and without OpenDKIM), Haraka,
## stock aiosmtpd and smtp-sink
bench: $(STAMP) debs haraka
	$(BIN)/python -m bench.run

bench-quick: $(STAMP) debs haraka
	$(BIN)/python -m bench.run --quick

## install: relayd in its own venv ($(INSTALL_VENV)), then its service files (relayd install-service)
INSTALL_VENV ?= /opt/relayd
INSTALL_ARGS ?=
install:
	$(PYTHON) -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/pip install --quiet --upgrade .
	$(INSTALL_VENV)/bin/relayd install-service $(INSTALL_ARGS)

clean:
	rm -rf $(VENV) var .cache .pytest_cache .mypy_cache .ruff_cache
