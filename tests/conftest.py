from __future__ import annotations

import pytest

from tests.kit.fakedaemon import FakeDaemon


@pytest.fixture
def fake_daemon(tmp_path):
    made: list[FakeDaemon] = []

    def make(scenario: str, **kw) -> FakeDaemon:
        daemon = FakeDaemon(tmp_path / "mps", scenario, **kw)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()
