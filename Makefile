# Two entry points for a newcomer: `make run` (the daemon on a local trial setup) and `make test`.
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python
# gcc and libcrypt-dev: crypt-r is published as source only, and pip compiles it (so test-deps runs before install).
APT_PACKAGES := gcc libcrypt-dev iproute2 util-linux swaks opensmtpd opensmtpd-extras dovecot-core dovecot-imapd dovecot-lmtpd openssl tmux apache2-utils whois zsh fish mutt bsd-mailx s-nail faketime opensmtpd-filter-dkimsign opensmtpd-filter-rspamd postgresql mariadb-server redis-server slapd ldap-utils

.PHONY: run test venv install bytecode test-deps lint completions

# 3.11 and older ship a stdlib module named `smtpd` that shadows ours.
NEW_ENOUGH := import sys; sys.exit(sys.version_info < (3, 12))

# The venv, made by $(PYTHON). One made by an older Python (say by `make run PYTHON=python3` on Debian 12, whose
# python3 is 3.11) is made again: reusing it would fail the same way on every run whatever PYTHON says.
venv:
	@if [ -x $(PY) ] && ! $(PY) -c '$(NEW_ENOUGH)' 2>/dev/null; then \
		echo "$(VENV) was made by $$($(PY) --version 2>&1), too old: making it again with $(PYTHON)"; \
		rm -rf $(VENV); \
	fi
	@if [ ! -x $(PY) ]; then \
		if ! $(PYTHON) -c '$(NEW_ENOUGH)' 2>/dev/null; then \
			found=$$($(PYTHON) --version 2>&1) || found="not found"; \
			echo "PySMTPD needs Python 3.12 or newer; $(PYTHON): $$found." >&2; \
			echo "Install one (Debian 12 ships only 3.11) and name it, e.g. make $(or $(MAKECMDGOALS),run) PYTHON=/usr/local/bin/python3.12" >&2; \
			exit 1; \
		fi; \
		echo "$(PYTHON) -m venv $(VENV)"; \
		$(PYTHON) -m venv $(VENV); \
	fi

# The packages, installed once and again only when pyproject.toml changes (the install is editable: code changes
# need none). Installing on every `make run` needed the package registry each time, for setuptools at least, so
# `make run` failed offline even on a machine set up before.
STAMP := $(VENV)/.installed

install: venv
	@if [ ! -f $(STAMP) ] || [ pyproject.toml -nt $(STAMP) ]; then \
		set -e; \
		echo "$(PY) -m pip install -q --upgrade pip"; \
		$(PY) -m pip install -q --upgrade pip; \
		echo "$(PY) -m pip install -q -e '.[test]'"; \
		$(PY) -m pip install -q -e '.[test]'; \
		touch $(STAMP); \
	fi

# Installs the Debian packages the tests use (as root; skipped when they are all installed already). Asks for the
# status `installed`: `dpkg -s` also succeeds for a package removed with its configuration files left behind.
test-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		[ "$$(dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null)" = installed ] || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# Our sources byte-compiled ahead (only the changed ones are compiled again). Where PYTHONDONTWRITEBYTECODE is set,
# as on this project's machines, Python would otherwise compile them in memory at every start of the daemon,
# smtpctl or sendmail: 0.13 s of CPU each time, 23% of two test files' time (measured 2026-12-08).
bytecode: install
	@$(PY) -m compileall -q smtpd smtpctl shared scripts tests

run: bytecode
	$(PY) scripts/trial.py

# Two workers (pytest-xdist): a test spends much of its time waiting for the daemons it starts (run one test at
# a time, the suite kept the CPUs busy 60% of its 12 minutes); two at once, with the byte-compiling above, run
# it in about 6 minutes on this project's 2-CPU machines (measured 2026-12-08).
test: test-deps bytecode
	$(VENV)/bin/pytest -q -n 2 --durations=20

lint: install
	$(VENV)/bin/ruff check smtpd smtpctl shared tests bench scripts

completions: install
	$(PY) completions/generate.py
