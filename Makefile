# Every target installs what it needs: a fresh clone runs `make test` or `make serve` and nothing else.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint conformance serve redis tools clean
.PHONY: images stack stack-down

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e '.[dev,model,api,worker]'
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e clients/python  # tests/client
	@touch $(STAMP)

redis:
	@bash scripts/ensure-redis.sh

tools:
	@bash scripts/ensure-tools.sh

# The tests' Redis: TEST_REDIS_URL, else this machine's on REDIS_PORT (6379); started here when it is local and silent
test: install tools
	@SUPIR_REDIS_URL="$${TEST_REDIS_URL:-}" bash scripts/ensure-redis.sh
	@VENV=$(VENV) bash scripts/ensure-corpus.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist load

# Tests run on TEST_WORKERS processes (tests/conftest.py says which stay together), one torch thread each: the tiny
# models gain nothing from a second thread (measured), and processes then share the cores instead of fighting.
TEST_WORKERS ?= 4
test: export OMP_NUM_THREADS := 1

lint: install
	$(VENV)/bin/ruff check supir_core api jobs worker tests bench clients
	$(VENV)/bin/ruff format --check supir_core api jobs worker tests bench clients
	$(VENV)/bin/mypy supir_core api jobs worker clients/python/supir_client

conformance: install
	$(PY) -c 'from supir_core.conformance import write_ckpt_twin; write_ckpt_twin("tests/data/conformance/A")'
	$(VENV)/bin/supir conformance tests/data/conformance/A --out out/conformance-A.safetensors --check

serve: install
	@VENV=$(VENV) bash scripts/serve.sh

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache

# the API and CPU worker images (docker/, scripts/images.sh; makes a Debian base image when no registry answers)
images:
	@bash scripts/images.sh api worker-cpu

# the compose stack on CPU with the tiny test model, API on 127.0.0.1:8000 (scripts/stack.sh); stack-down removes it
stack:
	@bash scripts/stack.sh up

stack-down:
	@bash scripts/stack.sh down
