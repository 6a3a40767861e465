# diffquant: the two commands a new user needs are `make demo` and `make test`.
# Both create .venv and install everything on first use (CPU torch from this machine's pip).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DQ := $(BIN)/diffquant
TORCH_SPEC ?= torch==2.13.0

MODEL ?= tiny-sdxl
RECIPE ?= int8_w8a8
RECIPES ?= all
ARGS ?=
DEMO := artifacts/demo

.PHONY: install demo test bench bench-scale calibrate quantize sweep clean-artifacts help

help:
	@echo "make demo        calibrate, quantize (int8_w8a8) and generate with the tiny default model"
	@echo "make test        run the test suite"
	@echo "make bench       run the benchmarks (figures go to benchmarks/RESULTS.md)"
	@echo "make bench-scale stage two at real model size (an SD 1.5-size UNet; separate: ~15 min) [ARGS='--family sdxl --blockwise']"
	@echo "make calibrate MODEL=sdxl [ARGS='--device cuda --num-prompts 64']"
	@echo "make quantize  MODEL=sdxl RECIPE=int8_w8a8 [CALIB=DIR] [ARGS=...]   (CALIB: this artifact, not the newest of MODEL)"
	@echo "make sweep     MODEL=tiny-sdxl [RECIPES=int8_w8a8,fp8]"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

demo: install
	$(DQ) calibrate --model tiny-sdxl --num-prompts 4 --steps 3 --out $(DEMO)/calib
	$(DQ) quantize --calib $(DEMO)/calib --recipe int8_w8a8 --out $(DEMO)/int8_w8a8 --overwrite
	$(DQ) generate --model tiny-sdxl --prompt "a lighthouse on a cliff at sunset" --out $(DEMO)/reference.png
	$(DQ) generate --checkpoint $(DEMO)/int8_w8a8 --prompt "a lighthouse on a cliff at sunset" --out $(DEMO)/int8_w8a8.png --compare $(DEMO)/reference.png
	@echo "demo done: $(DEMO)/int8_w8a8.png (quantized) next to $(DEMO)/reference.png (unquantized)."
	@echo "Both are 64 px noise: the tiny model's weights are random. The PSNR above says how close the quantized image is to the reference."

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/run_all.py --results benchmarks/RESULTS.md

# Stage two on an SD 1.5-size UNet (3.4 GB, ~15 min on 2 cores): prints its markdown section.
bench-scale: install
	$(BIN)/python benchmarks/bench_scale.py $(ARGS)

calibrate: install
	$(DQ) calibrate --model $(MODEL) $(ARGS)

quantize: install
	$(DQ) quantize $(if $(CALIB),--calib $(CALIB),--model $(MODEL)) --recipe $(RECIPE) $(ARGS)

sweep: install
	$(DQ) sweep --model $(MODEL) --recipes $(RECIPES) $(ARGS)

clean-artifacts:
	find artifacts -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
