from __future__ import annotations

import pytest
import structlog

from tests.kit.fakedaemon import FakeDaemon
from tests.kit.fakevllm import FakeVllm


@pytest.fixture(autouse=True)
def _logging_as_found():
    """A test that runs mpswatch.cli.main in this process points structlog at the stderr pytest
    captured for that test, closed after it: the next tests log where logging went before."""
    before = structlog.get_config()
    yield
    structlog.configure(**before)


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


@pytest.fixture
def servers():
    """Fake vLLM servers on loopback, made by the test (`servers(body=...)`), closed after it."""
    made = []

    def make(**kw) -> FakeVllm:
        server = FakeVllm(**kw)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()
