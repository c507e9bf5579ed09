# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch's wheels on PyPI carry the CUDA libraries (about 5 GB of the 6 GB .venv). On a machine
# without a GPU, `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU build
# of the same pinned version instead (pip prefers its 2.14.1+cpu over PyPI's 2.14.1).
TORCH_INDEX ?=

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ -z "$(TORCH_INDEX)" ] && ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "note: no GPU here, but torch from PyPI brings its CUDA libraries (about 6 GB in $(VENV));" \
		     "for the CPU build: make $(or $(MAKECMDGOALS),install) TORCH_INDEX=https://download.pytorch.org/whl/cpu"; fi
	$(PY) -m pip install -q -e '.[test]' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/m2das demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests  # two workers; the SLURM tests share one

clean:
	rm -rf demo_out .pytest_cache
