PYTHON ?= .venv/bin/python

.PHONY: demo test dashboards rules

# A replay of real H200 captures with Prometheus and Alertmanager on loopback (no GPU needed).
demo:
	$(PYTHON) -m demo.replay

test:
	bash .ci/run

dashboards:
	$(PYTHON) dashboards/generate.py

# alerts/mpswatch.rules.yml and the agent's copy of the runbooks, then the Kubernetes PrometheusRule
rules:
	$(PYTHON) alerts/rules.py
	$(PYTHON) deploy/kubernetes/generate_prometheusrule.py
