# The two commands of the README: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build from local disk on the project's machines; override, e.g. TORCH=torch, elsewhere.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-compat test-fla lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e '.[dev,triton,fla]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/fastweights main

test: setup
	$(BIN)/python -m pytest -q
	$(MAKE) test-compat
	$(MAKE) test-fla

# GLA/DeltaNet (flash-linear-attention) are Triton kernels: on CPU they run under the interpreter.
test-fla: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests/test_hybrid_fla.py

# The GPU machines run transformers 5.17: the Hugging Face integration is also tested against it.
COMPAT := .cache/transformers-5.17
$(COMPAT)/.installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q --target $(COMPAT) --no-deps "transformers==5.17.0" "huggingface-hub>=1.5,<2"
	$(BIN)/python -m pip install -q --target $(COMPAT) httpx
	touch $@

test-compat: $(COMPAT)/.installed
	PYTHONPATH=$(COMPAT) $(BIN)/python -c "import transformers as t; assert t.__version__ == '5.17.0', t.__version__"
	PYTHONPATH=$(COMPAT) $(BIN)/python -m pytest -q -m "not gpu" tests/test_convert.py tests/test_hybrid_model.py \
		tests/test_packed_attention.py $(wildcard tests/test_generation.py)

lint: setup
	$(BIN)/ruff check fastweights tests benchmarks
