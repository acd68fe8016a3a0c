# Every target creates (or reuses) the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2kd-installed

.PHONY: venv demo demo-one-stage test bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt setup.py tools/install_detectron2.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -r requirements.txt
	bash tools/install_detectron2.sh $(PY)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job on built-in data: teacher, student alone, distilled student, one table.
demo: venv
	$(PY) tools/demo.py

# The one-stage pair on built-in data: RetinaNet teacher, student alone, GK (output/demo_retinanet).
demo-one-stage: venv
	$(PY) tools/demo.py --pair retinanet

test: venv
	$(PY) -m pytest -q --durations=25 tests

clean-demo:
	rm -rf output/demo output/demo_retinanet
