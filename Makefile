# The two quick-start commands are `make demo` and `make test`; both install what they need.
PY := .venv/bin/python
STAMP := .venv/.heinfer-installed
PYFHEL_STAMP := .venv/.pyfhel-installed

.PHONY: setup demo test lint bench train
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m heinfer_client.demo_service

# Pyfhel (second backend) has no wheel for Python 3.11: built offline from source once (~4 min).
$(PYFHEL_STAMP): $(STAMP) scripts/build_pyfhel.sh
	bash scripts/build_pyfhel.sh --install
	touch $(PYFHEL_STAMP)

test: $(STAMP) $(PYFHEL_STAMP)
	$(PY) -m ruff check .
	HEINFER_REQUIRE_PYFHEL=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

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

train: $(STAMP)
	$(PY) -m pip install -q -e ".[train]"
	$(PY) -m heinfer_models.train fmnist-cryptonets
	$(PY) -m heinfer_models.train fmnist-tenseal-tutorial
