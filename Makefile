# lowbit: every target creates .venv when it is missing.
# uv is used when it is on PATH (fast); otherwise plain pip. torch comes from the local
# CPU wheel folder (pip's find-links); override TORCH_WHEELS if yours lives elsewhere.
PY        ?= python3
VENV      ?= .venv
TORCH_WHEELS ?= $(shell $(PY) -m pip config get global.find-links 2>/dev/null || echo /opt/wheels)
TORCH_SPEC ?= torch==2.13.0
EXTRAS    ?= dev
VPY       := $(VENV)/bin/python
UV        := $(shell command -v uv 2>/dev/null)
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export FLWR_TELEMETRY_ENABLED ?= 0
# Every spawned rank imports transformers: let Python cache bytecode, or each one recompiles it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py lowbit/codec/_native.c lowbit/quant/_laq.c
ifneq ($(UV),)
	[ -x $(VPY) ] || $(UV) venv --python $(PY) $(VENV)
	$(UV) pip install --python $(VPY) --compile-bytecode --find-links $(TORCH_WHEELS) "$(TORCH_SPEC)"
	$(UV) pip install --python $(VPY) --compile-bytecode --find-links $(TORCH_WHEELS) -e ".[$(EXTRAS)]"
else
	[ -x $(VPY) ] || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install "$(TORCH_SPEC)"
	$(VPY) -m pip install -e ".[$(EXTRAS)]"
endif
	touch $@

demo: venv
	$(VPY) -m lowbit.cli demo

test: venv
	$(VPY) -m pytest -q tests

bench: venv
	$(VPY) benchmarks/codec_throughput.py --json benchmarks/results/codec_throughput.json

clean:
	rm -rf $(VENV) .ray_tmp .pytest_cache
