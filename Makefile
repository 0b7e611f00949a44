# Thin wrappers: every target runs through uv, which is installed when missing.
UV := $(or $(shell command -v uv 2>/dev/null),$(HOME)/.local/bin/uv)
# Bytecode compiled at install: a sandboxed phase imports torch from a read-only environment, and
# without .pyc files every such process compiles torch's sources again (about 4 s on 2 cores).
SYNC := $(UV) sync --frozen --compile-bytecode
HOURS ?=
ARGS ?=
SOURCE ?= offline

.PHONY: setup prepare image test test-fast overnight bench-cpu bench-gpu bench-night bench-sandbox

$(UV):
	python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv

setup: $(UV)
	$(SYNC)

prepare: setup
	$(UV) run python -m dataprep --source $(SOURCE)

image: setup
	$(UV) run python -m sandbox.images

# The tests need the optional Ray extra (a real multi-node cluster night); the default install stays without it.
test: $(UV)
	$(SYNC) --extra ray
	$(UV) run pytest -ra

test-fast: $(UV)
	$(SYNC) --extra ray
	$(UV) run pytest -ra -m "not slow"

overnight: setup
	$(UV) run autoresearch overnight --source $(SOURCE) $(if $(HOURS),--hours $(HOURS)) $(ARGS)

bench-cpu: setup
	$(UV) run python bench/experiment.py --budget 60 $(ARGS)

bench-gpu: setup
	$(UV) run python bench/experiment.py --gpu auto --budget 300 --source $(SOURCE) $(ARGS)

bench-night: setup
	$(UV) run python bench/gpu_night.py --source $(SOURCE) $(ARGS)

bench-sandbox: setup
	$(UV) run python bench/experiment.py --budget 5 --repeat 5 $(ARGS)
