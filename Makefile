# Two commands do all set-up on a fresh machine:
#   make demo   create .venv if missing, install, train the demo model, then infill and add a track with it
#   make test   create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
.PHONY: install demo test test-fast lint format clean-demo docs audio-deps gallery

# torch goes in first, pinned: anything resolving a bare `torch` requirement before it would
# pull multi-GB CUDA wheels. DeepSpeed compiles its ops lazily (DS_BUILD_OPS=0) and needs the
# installed torch at build time, hence --no-build-isolation.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.14"
	touch $@

install: $(VENV)/.installed

DEMO_PIECE ?= data/music21_midi/bach/bwv1.6.mid

demo: $(VENV)/.installed
	$(PY) -m mmm.train +experiment=demo
	$(PY) -m mmm.sample ckpt=runs/demo/model input=$(DEMO_PIECE) task=infill track=1 bars=[4,8] out_dir=runs/demo/samples/infill
	$(PY) -m mmm.sample ckpt=runs/demo/model input=$(DEMO_PIECE) task=add_track program=33 out_dir=runs/demo/samples/add_track

# The full suite, as CI runs it: lint and format check first (seconds), then every test.
test: lint
	$(PY) -m pytest -q

# The inner loop: every test but the subprocess, multi-process, full-disk, browser, Slurm and
# long ones (markers in pyproject.toml); about a minute on 2 cores.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not (slow or subprocess or multiprocess or full_disk or browser or slurm)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-demo:
	rm -rf runs/demo data/embedded

docs: $(VENV)/.installed
	$(PY) -m sphinx -M html docs docs/public -W --keep-going
	@echo "open docs/public/html/index.html"

# FluidSynth and a General MIDI soundfont, for `render=true` and mmm.render.audio.
audio-deps:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y --no-install-recommends fluidsynth fluid-soundfont-gm vorbis-tools

gallery: $(VENV)/.installed
	$(PY) experiments/gallery/make_gallery.py
