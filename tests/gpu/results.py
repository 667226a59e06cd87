"""What a GPU run records: the fault matrix every GPU test adds its rows to (written to
$MPSWATCH_GPU_MATRIX_RESULTS by conftest.py after each test), and each module's results file."""

from __future__ import annotations

import json
import os

import pytest

from tests.kit.matrix import Matrix

MATRIX = Matrix()


def results_saver(variable: str, results: dict):
    """A module fixture writing `results` as JSON to $variable at the end, even after a failed
    assertion, to see how far the run got (docs/validation.md quotes these files)."""

    @pytest.fixture(autouse=True, scope="module")
    def _save_results():
        yield
        path = os.environ.get(variable)
        if path:
            with open(path, "w") as handle:
                json.dump(results, handle, indent=2, sort_keys=True, default=str)

    return _save_results
