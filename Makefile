# `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.kpface-installed

.PHONY: install test demo bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned in setup.cfg (a looser spec may pull a multi-GB CUDA build).
	$(PIP) install -q -e '.[export,openvino,coreml,bench,dev,cluster,triton,hub,gallery]'
	# MTCNN's real weights ship inside the facenet-pytorch wheel; its own pins clash with
	# ours and it imports torchvision, so it is installed without dependencies and never
	# imported: kpface reads the three .pt files through importlib.metadata.
	$(PIP) install -q --no-deps facenet-pytorch==2.6.0
	# dlib's ResNet face descriptor (dlib_resnet_v1) ships in this sdist of model files (~100 MB,
	# no dependencies); kpface reads the .dat through importlib.metadata and never imports it.
	$(PIP) install -q face-recognition-models==0.3.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/kpface demo

bench: $(STAMP)
	$(VENV)/bin/kpface bench

clean:
	rm -rf $(VENV) build *.egg-info
