# The two commands of the quick start: `make run` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test setup system-deps proto docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,gateway]'
	touch $@

setup: $(VENV)/.installed

system-deps:
	scripts/system-deps.sh

# Start policyd on the embedded default (SQLite + in-process store) with the sample policy,
# and print a demo key with credit. Ctrl-C stops it.
run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/demo.sh

# The whole test suite, against the embedded store, a real redis-server and a real PostgreSQL
# (installed from Debian's packages when missing, started on loopback by the tests).
test: setup system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/test.sh

proto: setup
	$(PY) scripts/gen_proto.py

# the configuration reference in README.md, from policyd/settings.py
docs: setup
	$(PY) scripts/gen_config_reference.py

bench: setup system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m bench $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) policyd.db policyd.db-wal policyd.db-shm .pytest_cache
