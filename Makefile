# Everything a new user needs: `make tour` (the main job) and `make test` (the whole suite) create
# .venv on first use. A GPU user picks their own torch build, e.g.
#   make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" tour
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# torchvision pairs with one torch release (0.28 with 2.13); installed right after it so nothing upgrades torch.
TORCHVISION_SPEC ?= torchvision==0.28.0
# TransformerLens 3.9 (the last release with HookedTransformer), overlaid on .venv for a second test pass.
TL3_SPEC ?= transformer-lens==3.9.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install tour test test-tl3 lab bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch (or one pulled in by a dependency) is a multi-GB CUDA build.
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install $(TORCHVISION_SPEC)
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps --upgrade --target $(VENV)/tl3 $(TL3_SPEC) better-abc
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (workbench)"
	touch $(STAMP)

tour: $(STAMP)
	$(VENV)/bin/workbench tour --out report

test: $(STAMP)
	$(PY) -m pytest
	$(MAKE) --no-print-directory test-tl3

# The transformer tests again, against TransformerLens 3.9's HookedTransformer. The path is absolute so that
# tests running a subprocess in a scratch folder get 3.9 too. The README test is left out: the README's
# all-MiniLM block reads a raw Hugging Face model, which needs TransformerLens 4's adapters (the `minilm`
# extra requires 4.x), so under 3.9 it fails by design; the first pass runs the README as a user has it.
test-tl3: $(STAMP)
	PYTHONPATH=$(abspath $(VENV))/tl3 WORKBENCH_EXPECT_TL=3 $(PY) -m pytest -m transformer -q \
		--deselect tests/test_readme.py::test_readme_python_blocks_run_as_written

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root,)

bench: $(STAMP)
	$(PY) benchmarks/cache.py

# The API reference: every public package's docstrings rendered by pdoc into docs/api/index.html.
API_MODULES := workbench workbench.groups workbench.hooks workbench.data workbench.zoo workbench.symmetry \
	workbench.probing workbench.similarity workbench.stitching workbench.widgets
docs: $(STAMP)
	$(PY) -m pdoc --docformat google --no-show-source $(API_MODULES) -o docs/api

clean:
	rm -rf $(VENV) report docs/api .pytest_cache
