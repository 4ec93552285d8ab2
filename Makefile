# Every target that needs Python creates .venv and installs the project first,
# so each command works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXTRAS := test,docs,lint,zstd,prometheus,opentelemetry,asyncio,bench

.PHONY: demo test bare lint format docs bench faults race memcached clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

## make demo: the example application (SQLite file + in-process memory backend)
demo: $(STAMP)
	$(BIN)/cachedecor demo $(DEMO_ARGS)

## make memcached: make sure memcached and twemproxy exist (installs Debian's memcached and nutcracker as root)
memcached:
	@bash tools/ensure-memcached.sh

## make test: lint, then the whole suite against real servers (it also builds the docs),
##   then what a bare install gives (make bare)
test: $(STAMP) memcached lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory bare

# A bare install: cachedecor without extras (only pytest beside it), on the oldest and
# the newest dependency versions pyproject.toml allows; tests/bare and dogpile.cache's
# own backend suites run there.
BARE_OLDEST := SQLAlchemy==2.0.2 dogpile.cache==1.3.3 pymemcache==4.0.0 msgpack==1.0.0 click==8.1.0
BARE_TESTS := --noconftest -p no:cacheprovider tests/bare tests/test_dogpile_suite.py

.venv-bare-%/.installed-stamp: pyproject.toml
	@rm -rf .venv-bare-$*
	$(PYTHON) -m venv .venv-bare-$*
	.venv-bare-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-bare-$*/bin/python -m pip install --quiet --upgrade -e . pytest pytest-timeout \
		$(if $(filter oldest,$*),$(BARE_OLDEST),)
	@touch $@

## make bare: the bare-install suite on the oldest and the newest allowed dependencies
bare: .venv-bare-oldest/.installed-stamp .venv-bare-newest/.installed-stamp memcached
	.venv-bare-oldest/bin/python -m pytest $(BARE_TESTS)
	.venv-bare-newest/bin/python -m pytest $(BARE_TESTS)

## make bench: hit path against the floor, plain dogpile and the database (prints ratios);
##   then what invalidation and the outbox add to a committing transaction; then the cost
##   of choosing a memcached node per key, for each placement at 3, 20 and 100 nodes
bench: $(STAMP) memcached
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/writes.py $(if $(findstring --quick,$(BENCH_ARGS)),--quick,)
	$(BIN)/python benchmarks/routing.py $(if $(findstring --quick,$(BENCH_ARGS)),--quick,)

## make faults: what a caller sees (latency, result, counters) for each kind of cache failure;
##   then how long an old row is served after each writer or node fault, with and without the outbox
faults: $(STAMP) memcached
	$(BIN)/python benchmarks/faults.py
	$(BIN)/python benchmarks/outbox_faults.py

## make race: readers and writers racing on PostgreSQL + memcached/Redis, naive vs cachedecor
##   (RACE_ARGS="--backend memcached --proxy twemproxy": memcached behind twemproxy)
race: $(STAMP) memcached
	$(BIN)/python benchmarks/race.py $(RACE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cachedecor tests tools benchmarks
	$(BIN)/ruff format --check cachedecor tests tools benchmarks
	$(BIN)/mypy
	$(BIN)/python tools/check_architecture.py

format: $(STAMP)
	$(BIN)/ruff check --fix cachedecor tests tools benchmarks
	$(BIN)/ruff format cachedecor tests tools benchmarks

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .venv-bare-* docs/_build .mypy_cache .ruff_cache .hypothesis
