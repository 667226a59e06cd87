"""The noisy-neighbour rule (issue 18, point 3): an engine slowed against its own quiet baseline while
a neighbour on its GPU bursts is named with that neighbour; nothing is named while the neighbours
are quiet, when the slowed engine's own load burst, when the "burst" is a neighbour's usual load,
or across GPUs. Then a running agent with two paced fake vLLMs on one GPU: the exported series,
the status line and when they come and go."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest
from mpswatch.interference import BASELINE_SECONDS, RECENT_SECONDS, SLOWED_RATIO, InterferenceMemory
from mpswatch.snapshot import EngineState, frozen_map

from tests.kit.agentproc import Agent, key
from tests.kit.fakevllm import PacedVllm

GPU, OTHER_GPU = "GPU-aaaaaaaa", "GPU-bbbbbbbb"


@dataclass
class Paced:
    """An engine's cumulative figures, advanced one scrape interval at a time."""

    name: str
    gpu: str = GPU
    itl: float = 0.010  # seconds a generated token takes
    tokens_per_second: float = 200.0
    prompt_rate: float = 0.0
    running: float = 4.0
    prompt: float = 0.0
    itl_sum: float = 0.0
    itl_count: float = 0.0
    histograms: bool = True
    extra: dict = field(default_factory=dict)

    def advance(self, seconds: float) -> None:
        tokens = self.tokens_per_second * seconds
        self.prompt += self.prompt_rate * seconds
        self.itl_count += tokens
        self.itl_sum += tokens * self.itl

    def state(self, at: float) -> EngineState:
        totals = {"inter_token": (self.itl_sum, self.itl_count)} if self.histograms else {}
        return EngineState(name=self.name, url=None, found_by="configured", up=True, gpu_uuid=self.gpu,
                           prompt_tokens_total=self.prompt, requests_running=self.running,
                           latency_totals=frozen_map(totals), scraped_at=at, **self.extra)


class Node:
    """Engines scraped together every `interval` seconds, and the rule's answers after each scrape."""

    def __init__(self, *engines: Paced, interval: float = 1.0) -> None:
        self.engines = list(engines)
        self.memory = InterferenceMemory()
        self.at = 1000.0
        self.interval = interval

    def run(self, seconds: float) -> list[dict]:
        answers = []
        for _ in range(round(seconds / self.interval)):
            self.at += self.interval
            for engine in self.engines:
                engine.advance(self.interval)
            answers.append(dict(self.memory.update([e.state(self.at) for e in self.engines])))
        return answers


def named(answers: list[dict], engine: str) -> list[str | None]:
    return [a[engine].neighbour if engine in a else None for a in answers]


def quiet_node(**victim) -> tuple[Node, Paced, Paced]:
    a, b = Paced("a", **victim), Paced("b", running=0.0, tokens_per_second=0.0)
    node = Node(a, b)
    node.run(60)  # a quiet minute: the baseline
    return node, a, b


def burst(b: Paced, a: Paced | None = None, slowed_itl: float = 0.025) -> None:
    b.prompt_rate, b.running = 40_000.0, 2.0
    if a is not None:
        a.itl = slowed_itl


def test_a_neighbours_burst_that_slows_an_engine_names_the_neighbour_and_the_slowdown():
    node, a, b = quiet_node()
    assert node.memory.update([a.state(node.at), b.state(node.at)])["a"].baseline_seconds == pytest.approx(0.010)
    burst(b, a)
    answers = node.run(20)
    first = named(answers, "a").index("b")  # seconds into the burst (1 s scrapes)
    assert first <= 5
    found = answers[-1]["a"]
    assert found.neighbour == "b" and found.slowdown_ratio == pytest.approx(2.5)
    assert found.neighbour_prompt_tokens_per_second == pytest.approx(40_000.0)
    assert answers[-1]["b"].bursting and not found.bursting
    assert "2.5x its baseline of 10.0 ms while neighbour b bursts (40000 prompt tokens/s)" in found.detail


def test_nothing_is_named_while_the_neighbours_idle_and_the_naming_ends_after_the_burst():
    node, a, b = quiet_node()
    before = node.run(30)
    assert named(before, "a") == [None] * 30
    burst(b, a)
    node.run(20)
    b.prompt_rate, b.running, a.itl = 0.0, 0.0, 0.010
    after = named(node.run(30), "a")
    assert after[int(RECENT_SECONDS) + 1:] == [None] * (30 - int(RECENT_SECONDS) - 1)
    assert node.memory.update([a.state(node.at), b.state(node.at)])["a"].baseline_seconds == pytest.approx(0.010)


def test_an_engine_slowed_with_no_neighbour_bursting_shows_its_slowdown_and_names_no_one():
    node, a, _ = quiet_node()
    a.itl = 0.030
    found = node.run(15)[-1]["a"]
    assert found.slowdown_ratio == pytest.approx(3.0) and found.neighbour is None


def test_a_neighbours_burst_that_does_not_slow_the_engine_names_no_one():
    node, a, b = quiet_node()
    burst(b, a, slowed_itl=0.010 * (SLOWED_RATIO - 0.1))
    assert named(node.run(20), "a") == [None] * 20


def test_an_engine_whose_own_load_bursts_is_not_said_to_be_slowed_by_its_neighbour():
    """Its own load rising is what the rule cannot tell from a neighbour's: it names no one then."""
    node, a, b = quiet_node()
    burst(b, a)
    a.running, a.prompt_rate = 16.0, 20_000.0
    answers = node.run(20)
    assert answers[-1]["a"].bursting and named(answers, "a") == [None] * 20


def test_a_neighbour_busy_all_the_time_is_not_bursting():
    a, b = Paced("a"), Paced("b", prompt_rate=40_000.0, running=2.0)
    node = Node(a, b)
    node.run(120)
    a.itl = 0.02
    answers = node.run(20)
    assert answers[-1]["b"].bursting is False and named(answers, "a") == [None] * 20


def test_engines_on_other_gpus_are_no_neighbours():
    a, b = Paced("a"), Paced("b", gpu=OTHER_GPU, running=0.0, tokens_per_second=0.0)
    node = Node(a, b)
    node.run(60)
    burst(b, a)
    answers = node.run(20)
    assert answers[-1]["b"].bursting and named(answers, "a") == [None] * 20


def test_the_neighbour_named_is_the_one_furthest_above_its_usual():
    a = Paced("a")
    b, c = (Paced(name, running=0.0, tokens_per_second=0.0, prompt_rate=100.0) for name in ("b", "c"))
    node = Node(a, b, c)
    node.run(60)
    b.prompt_rate, c.prompt_rate, a.itl = 5_000.0, 20_000.0, 0.03
    assert node.run(15)[-1]["a"].neighbour == "c"


def test_without_a_quiet_baseline_or_a_histogram_it_is_unknown_not_zero():
    node = Node(Paced("a"), Paced("b"))
    answers = node.run(3)  # too few figures to know anyone's usual: no quiet sample yet
    assert answers[-1]["a"].baseline_seconds is None and answers[-1]["a"].slowdown_ratio is None
    assert "no quiet baseline yet" in answers[-1]["a"].detail
    bare = Node(Paced("old", histograms=False), Paced("b"))
    found = bare.run(30)[-1]["old"]
    assert found.inter_token_seconds is None and found.slowdown_ratio is None
    assert "no inter-token latency" in found.detail


def test_a_restarted_engine_gives_no_negative_rate_and_a_gone_engine_is_forgotten():
    node, a, b = quiet_node()
    b.prompt, b.prompt_rate = 0.0, 0.0
    a.itl_sum, a.itl_count = 0.0, 0.0  # a restarted: its counters start again
    answers = node.run(3)
    assert all(x["a"].inter_token_seconds is None or x["a"].inter_token_seconds > 0 for x in answers)
    assert all(x["b"].prompt_tokens_per_second is None or x["b"].prompt_tokens_per_second >= 0 for x in answers)
    node.engines = [a]
    assert set(node.run(1)[-1]) == {"a"}
    node.engines = [a, b]
    assert node.run(1)[-1]["b"].bursting is None  # back as new: no usual figures yet


def test_a_burst_long_past_leaves_the_baseline():
    """The baseline is the last BASELINE_SECONDS: an engine that became slower for good (a new
    model, a longer context) gets a new baseline, not a slowdown for ever."""
    node, a, _ = quiet_node()
    a.itl = 0.020
    node.run(BASELINE_SECONDS + 60)
    found = node.run(1)[-1]["a"]
    assert found.baseline_seconds == pytest.approx(0.020) and found.slowdown_ratio == pytest.approx(1.0)


# ---------------------------------------------------------------- a running agent


def test_a_running_agent_names_the_bursting_neighbour_exports_it_and_says_so_in_status(tmp_path):
    """Two paced fake vLLMs configured on one GPU: a steady decoder and a neighbour that bursts."""
    a, b = PacedVllm(model_label="a"), PacedVllm(model_label="b")
    b.pace(tokens_per_second=0.0, running=0)
    config = tmp_path / "mpswatch.toml"
    config.write_text("[engine_scrape]\ndiscover = false\ninterval_seconds = 0.5\n"
                      f'[[engines]]\nname = "a"\nurl = "{a.url}"\ngpu_uuid = "{GPU}"\n'
                      f'[[engines]]\nname = "b"\nurl = "{b.url}"\ngpu_uuid = "{GPU}"\n')
    try:
        with Agent(["--config", str(config), "--pipe-dir", str(tmp_path / "none")], log_path=tmp_path / "agent.log") as agent:
            baseline = key("mps_engine_inter_token_latency_baseline_seconds", engine="a")
            agent.wait_for(lambda s: s if s.get(baseline) else None, timeout=60)
            interfered = key("mps_engine_interference_slowdown_ratio", engine="a", neighbour="b")
            quiet = agent.wait_for(lambda s: s, timeout=10)
            assert interfered not in quiet and quiet[key("mps_engine_burst", engine="b")] == 0
            b.pace(prompt_tokens_per_second=30_000.0, running=2)
            a.pace(inter_token_seconds=0.03)
            first = agent.wait_for(lambda s: s.get(interfered), timeout=30)
            # the slowdown grows as the burst fills the recent window: a's 30 ms over its 10 ms baseline
            during = agent.wait_for(lambda s: s if s.get(interfered, 0) > 2.9 else None, timeout=30)
            report = json.loads(agent.get("/status")[1])
            exposition = agent.get("/metrics")[1]
            b.pace(prompt_tokens_per_second=0.0, running=0)
            a.pace(inter_token_seconds=0.01)
            agent.wait_for(lambda s: s if interfered not in s else None, timeout=RECENT_SECONDS + 20)
    finally:
        a.close()
        b.close()
    assert first >= SLOWED_RATIO and during[interfered] == pytest.approx(3.0, rel=0.05)
    assert during[key("mps_engine_burst", engine="b")] == 1 and during[key("mps_engine_burst", engine="a")] == 0
    assert during[baseline] == pytest.approx(0.01, rel=0.05)
    [entry] = [e for e in report["engines"] if e["name"] == "a"]
    assert entry["verdict"] == "DEGRADED" and "slowed by a noisy neighbour" in entry["reason"]
    assert entry["interference"]["neighbour"] == "b"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); the README's test command installs it")
    lint = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
