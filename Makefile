# Two entry points for a newcomer: `make run` (the daemon on a local trial setup) and `make test`.
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := swaks opensmtpd opensmtpd-extras dovecot-core dovecot-imapd dovecot-lmtpd openssl tmux apache2-utils whois zsh fish mutt

.PHONY: run test install test-deps lint completions

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'

# Installs the Debian packages the tests use (as root; skipped when they are all present already).
test-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

run: install
	$(PY) scripts/trial.py

test: install test-deps
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check smtpd smtpctl shared tests bench scripts

completions: install
	$(PY) completions/generate.py
