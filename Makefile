PYTHON ?= .venv/bin/python

.PHONY: demo test dashboards

# A replay of real H200 captures with Prometheus and Alertmanager on loopback (no GPU needed).
demo:
	$(PYTHON) -m demo.replay

test:
	bash .ci/run

dashboards:
	$(PYTHON) dashboards/generate.py
