# The two quick-start commands are `make demo` and `make test`; both install what they need.
PY := .venv/bin/python
STAMP := .venv/.heinfer-installed

.PHONY: setup demo test lint bench train
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m heinfer_models.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m bench.first_bench

train: $(STAMP)
	$(PY) -m pip install -q -e ".[train]"
	$(PY) -m heinfer_models.train fmnist-cryptonets
	$(PY) -m heinfer_models.train fmnist-tenseal-tutorial
