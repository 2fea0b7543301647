# The two quick-start commands are `make demo` and `make test`; both install what they need.
PY := .venv/bin/python
STAMP := .venv/.heinfer-installed
PYFHEL_STAMP := .venv/.pyfhel-installed

.PHONY: setup demo test lint bench train lock dist web
setup: $(STAMP)

$(STAMP): pyproject.toml requirements/dev.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m heinfer_client.demo_service

# Pyfhel (second backend) has no wheel for Python 3.11: built offline from source once (~4 min).
$(PYFHEL_STAMP): $(STAMP) scripts/build_pyfhel.sh
	bash scripts/build_pyfhel.sh --install
	touch $(PYFHEL_STAMP)

# torch is the compiler's optional `train` extra, needed by the PyTorch import tests only (so not
# by `make demo`); it is not in the lock (PyPI's default torch wheel is a multi-GB CUDA build):
# this exact pin installs the CPU build (docs/COMPILER.md, "From PyPI to torch").
TORCH_STAMP := .venv/.torch-installed
$(TORCH_STAMP): $(STAMP)
	@# pip's "Location ... is ignored" lines come from local index mirrors (as in setup.sh)
	bash -o pipefail -c '$(PY) -m pip install -q "torch==2.13.0" 2>&1 | { grep -v "^WARNING: Location" || true; }'
	touch $(TORCH_STAMP)

# The browser client's test needs Debian chromium and web/node_modules (npm ci).
BROWSER_STAMP := web/node_modules/.heinfer-installed
$(BROWSER_STAMP): web/package-lock.json scripts/setup_browser.sh
	bash scripts/setup_browser.sh
	touch $(BROWSER_STAMP)

test: $(STAMP) $(TORCH_STAMP) $(PYFHEL_STAMP) $(BROWSER_STAMP)
	$(PY) -m ruff check .
	HEINFER_REQUIRE_PYFHEL=1 HEINFER_REQUIRE_BROWSER=1 $(PY) -m pytest -q

# Rebuild the committed page (server/static/app) from web/ after changing web/src or web/static.
web: $(BROWSER_STAMP)
	cd web && npm run build

lint: $(STAMP)
	$(PY) -m ruff check .

# Re-resolve the lock files after a dependency change in pyproject.toml (docs/RELEASING.md).
# One universal resolution for every supported Python (3.11-3.13), with hashes; the server lock is
# the same versions restricted to what the image needs.
UV := uv==0.13.9
LOCK_ARGS := --universal --python-version 3.11 --generate-hashes --no-header --quiet
lock: $(STAMP)
	$(PY) -m pip install -q $(UV)
	$(PY) -m uv pip compile pyproject.toml $(LOCK_ARGS) --extra server --extra dev -o requirements/dev.txt
	$(PY) -m uv pip compile pyproject.toml $(LOCK_ARGS) --extra server -c requirements/dev.txt -o requirements/server.txt

# Release artefacts: sdist and wheel into dist/, checked as PyPI would (docs/RELEASING.md);
# without PYTHONDONTWRITEBYTECODE, under which setuptools warns that it skips byte-compiling.
dist: $(STAMP)
	rm -rf dist
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

# Benchmarks: run on an otherwise idle machine (2 cores: anything else in parallel skews them).
bench: $(STAMP)
	$(PY) -m heinfer_packing.calibrate --bits 51,29,29,29,29,51
	$(PY) -m heinfer_packing.calibrate --bits 34,29,29,29,29,29,39
	$(PY) -m bench.first_bench
	$(PY) -m bench.service_bench
	$(PY) -m bench.throughput_bench
	$(PY) -m bench.conformal_bench
	$(PY) -m bench.alexnet_bench --images 50 --imagenet --budgets 16 12 8
	$(PY) -m pip install -q -e ".[train]"
	$(PY) -m bench.degree_bench
	$(PY) -m bench.plots
	$(PY) -m bench.zoo_bench --recalibrate
	$(PY) -m bench.privacy_bench

train: $(STAMP)
	$(PY) -m pip install -q -e ".[train]"
	$(PY) -m heinfer_models.train fmnist-cryptonets
	$(PY) -m heinfer_models.train fmnist-tenseal-tutorial
