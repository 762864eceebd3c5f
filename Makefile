# Two entry points on a fresh machine:  make demo   and   make test
# Each creates .venv/, installs the pinned Python packages, Debian's mosquitto
# (when missing) and the pinned MicroPython VM (npm, into node_modules/);
# make test also installs Debian's chromium for the dashboard test.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: setup demo test bench clean mosquitto-check node-check chromium-check

setup: $(VENV)/.installed node_modules/.installed mosquitto-check

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; install Python 3.11+" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: Python 3.11+ is required ($(PYTHON) is older)" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "make: could not create $(VENV) (on Debian: apt-get install python3-venv)" >&2; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

node-check:
	@command -v node >/dev/null && command -v npm >/dev/null || { \
	  echo "make: Node.js 18+ and npm are needed to run the MicroPython VM; installing Debian's nodejs and npm" >&2; \
	  $(MAKE) --no-print-directory apt PKGS="nodejs npm"; }

node_modules/.installed: package.json package-lock.json | node-check
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# the dashboard test drives Debian's chromium headless
chromium-check:
	@command -v chromium >/dev/null || $(MAKE) --no-print-directory apt PKGS=chromium

mosquitto-check:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || $(MAKE) --no-print-directory apt PKGS=mosquitto

# apt PKGS="...": install Debian packages, or say clearly why we cannot.
apt:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=sudo; else \
	  echo "make: $(PKGS) missing and this user cannot install Debian packages; run: sudo apt-get install $(PKGS)" >&2; exit 1; fi; \
	command -v apt-get >/dev/null || { echo "make: $(PKGS) missing and apt-get is not available; install $(PKGS) with your system's package manager" >&2; exit 1; }; \
	echo "make: installing Debian packages: $(PKGS)"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(PKGS) >/dev/null \
	  || { echo "make: apt-get install $(PKGS) failed" >&2; exit 1; }

demo: setup
	$(PY) -m fleet demo $(ARGS)

test: setup chromium-check
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) -m tools.bench sampler

clean:
	rm -rf $(VENV) node_modules var .pytest_cache
