"""The MPS fit advisor: verdicts, reasons and recommendations from what the agent sees, its
metrics, and `mpswatch advise` against a fake GPU and a loopback vLLM engine."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest
from mpswatch.advisor import LIKELY_SLOWER, MARGINAL, MODEL, PAYS_OFF, GainModel, advise, busy_alone, verdict_of
from mpswatch.snapshot import EngineState, GpuState

from tests.kit import fakevllm
from tests.kit.agentproc import Agent, agent_env, free_port, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL
from tests.kit.fakevllm import wait_ready

GPU = GpuState(index=0, uuid="GPU-a", name="NVIDIA H200", up=True, sm_active_ratio=0.4, dram_bandwidth_ratio=0.2,
               utilization_ratio=1.0)
# GPU overlap 1.0 - 0.2·log2(params) - 0.1·log2(prompt/128) - 0.3·prefill share; idle-time overlap 0.9 at most
TOY = GainModel(intercept=1.0, per_log2_params=-0.2, per_log2_context=-0.1, prefill=-0.3, idle_overlap=0.9)


def engine(name="a", params=1.5e9, prompt=512.0, prompt_total=1000.0, generation_total=3000.0, **kw) -> EngineState:
    return EngineState(name=name, url=f"http://127.0.0.1/{name}", found_by="discovered", up=True, gpu_uuid="GPU-a",
                       model_parameters=params, prompt_tokens_per_request=prompt, prompt_tokens_total=prompt_total,
                       generation_tokens_total=generation_total, mps_attached=True, cpu_bound=False,
                       busiest_thread_cpu_ratio=0.1, **kw)


@pytest.mark.parametrize("gain, verdict", [(0.2, PAYS_OFF), (0.9, PAYS_OFF), (0.19, MARGINAL), (0.0, MARGINAL),
                                           (-0.01, LIKELY_SLOWER)])
def test_verdict_thresholds(gain, verdict):
    assert verdict_of(gain) == verdict


def test_the_estimate_follows_the_model_and_the_reasons_say_what_it_used():
    advice = advise(GPU, [engine()], model=TOY)
    expected = 1.0 - 0.2 * 0.5849625 - 0.1 * 2 - 0.3 * 0.25
    assert advice.gain_estimate == pytest.approx(expected, abs=1e-6) and advice.verdict == PAYS_OFF
    assert "1.5B parameters, 512-token prompts, 25% of tokens in prefill, one engine alone keeps the GPU busy 100%" \
        in advice.reasons[0]
    assert "SM active 40%" in advice.reasons[1]
    assert advice.recommendations == ("add a second engine on this GPU under MPS",)


def test_a_large_model_with_long_prompts_on_two_engines_is_told_to_drop_one():
    engines = [engine("a", params=7e9, prompt=8192), engine("b", params=7e9, prompt=8192)]
    advice = advise(GPU, engines, model=TOY)
    assert advice.verdict == LIKELY_SLOWER and advice.gain_estimate < 0
    assert any(r.startswith("drop to one engine") for r in advice.recommendations)


def test_idle_time_overlap_takes_over_when_one_engine_leaves_the_gpu_idle():
    large = dict(params=7e9, prompt=8192)  # GPU overlap: 1.0 - 0.2·2.807 - 0.1·6 - 0.3·0.25 = -0.2365
    assert advise(GPU, [engine(**large)], model=TOY).gain_estimate == pytest.approx(-0.2365, abs=1e-3)
    spinning = replace(engine(**large), busiest_thread_cpu_ratio=1.0, cpu_bound=True)  # busy-waits on a full GPU
    assert advise(GPU, [spinning], model=TOY).gain_estimate == pytest.approx(-0.2365, abs=1e-3)
    idle_half = replace(GPU, utilization_ratio=0.5)  # 0.9 · min(1, 0.5 / 0.5)
    assert advise(idle_half, [engine(**large)], model=TOY).gain_estimate == pytest.approx(0.9)
    idle_tenth = replace(GPU, utilization_ratio=0.9)  # 0.9 · 0.1 / 0.9
    assert advise(idle_tenth, [engine(**large)], model=TOY).gain_estimate == pytest.approx(0.1)
    held_back = advise(replace(GPU, utilization_ratio=0.3), [spinning], model=TOY)
    assert held_back.verdict == PAYS_OFF and any("async scheduling" in r for r in held_back.recommendations)


def test_two_engines_idle_time_is_read_back_to_one_engine_s():
    # with two engines the GPU idles 0.49 of the time: one alone would idle 0.7, busy 0.3 of the time
    assert busy_alone(0.51, 2) == pytest.approx(0.3)
    assert busy_alone(1.0, 2) == 1.0 and busy_alone(None, 2) is None and busy_alone(float("nan"), 1) is None


def test_non_finite_inputs_are_unknown_not_a_verdict():
    for broken in (dict(prompt=float("nan")), dict(prompt=float("inf")), dict(params=float("nan"))):
        advice = advise(GPU, [engine(**broken)], model=TOY)
        assert advice.verdict is None and advice.gain_estimate is None, broken


def test_estimates_are_clamped_both_ways():
    assert advise(GPU, [engine(params=0.01e9, prompt=1)], model=TOY).gain_estimate == TOY.ceiling
    assert advise(GPU, [engine(params=400e9, prompt=1e6)], model=TOY).gain_estimate == TOY.floor


def test_a_second_engine_is_advised_with_the_memory_it_needs():
    crowded = replace(engine(), gpu_memory_utilization=0.9)
    [add] = [r for r in advise(replace(GPU, utilization_ratio=0.5), [crowded], model=TOY).recommendations
             if r.startswith("add a second engine")]
    assert "gpu_memory_utilization is 0.9" in add


def test_engines_running_without_mps_are_told_to_attach_and_imbalance_to_set_thread_percentages():
    detached = replace(engine("b"), mps_attached=False)
    advice = advise(GPU, [engine("a"), detached], model=TOY)
    assert any("run without MPS" in r for r in advice.recommendations)
    balanced = advise(GPU, [engine("a"), engine("b")], imbalance=1.6, model=TOY)
    assert any("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in r for r in balanced.recommendations)


@pytest.mark.parametrize("missing, says", [({"params": None}, "model size"), ({"prompt": None}, "prompt length"),
                                           ({"prompt_total": None}, "prefill share")])
def test_no_verdict_and_no_estimate_when_an_input_is_unknown(missing, says):
    advice = advise(GPU, [engine(**missing)], model=TOY)
    assert advice.verdict is None and advice.gain_estimate is None
    assert any(says in r for r in advice.reasons)


def test_the_shipped_model_is_the_fit_of_the_committed_h200_results_and_meets_its_goal_on_held_out_ones():
    from benchmarks.mps_gain.fit import RESULTS, configurations, fit, held_out, load_results, proof

    configs = configurations(load_results(RESULTS))
    assert fit(configs) == MODEL
    held = [r for r in proof(configs, MODEL) if r["set"] == "held out"]
    assert len(held) == sum(held_out(c) for c in configs) == 15
    errors = [abs(r["estimate_alone"] - r["measured"]) for r in held]
    assert sorted(errors)[len(errors) // 2] < 0.05  # as docs/mps-gain.md reports, which also says where
    assert sum(e > 0.10 for e in errors) == 1       # the 10-point goal is missed: one row, by 0.03 points


def test_an_engine_that_is_down_gives_no_advice():
    down = replace(engine(), up=False)
    assert advise(GPU, [down], model=TOY).verdict is None


def test_mpswatch_advise_reports_the_engine_s_gpu_and_exports_the_same_estimate(tmp_path):
    fake = wait_ready(subprocess.Popen(fakevllm.command(free_port(), "qwen-a"), stdout=subprocess.PIPE, text=True))
    try:
        on_the_gpu = agent_env({"FAKENVML_MPS_CLIENT_PIDS": str(fake.pid)})  # the engine is an MPS client of the fake GPU
        advise = mpswatch_cmd("advise", "--window", "1", "--mps-control-bin", FAKE_CONTROL, "--pipe-dir",
                              str(tmp_path / "none"), nvml="h200")
        run = subprocess.run([*advise, "--json"], env=on_the_gpu, capture_output=True, text=True, timeout=60)
        assert run.returncode in (0, 1), run.stderr
        report = json.loads(run.stdout)
        [gpu] = report["gpus"]
        assert gpu["gpu_uuid"].startswith("GPU-") and gpu["verdict"] in (PAYS_OFF, MARGINAL, LIKELY_SLOWER)
        assert "1.5B parameters, 180-token prompts" in gpu["reasons"][0]
        assert run.returncode == (1 if gpu["verdict"] == LIKELY_SLOWER else 0)
        text = subprocess.run(advise, env=on_the_gpu, capture_output=True, text=True, timeout=60).stdout
        assert gpu["gpu_uuid"] in text and "because 1.5B parameters" in text
        with Agent(["--mps-control-bin", FAKE_CONTROL, "--pipe-dir", str(tmp_path / "none")],
                   env={"FAKENVML_MPS_CLIENT_PIDS": str(fake.pid)}, nvml="h200") as agent:
            uuid = gpu["gpu_uuid"]
            s = agent.wait_for(lambda s: s if ("mps_gpu_mps_gain_estimate_ratio", frozenset({("gpu_uuid", uuid)})) in s
                               else None, timeout=20)
            exported = s[("mps_gpu_mps_gain_estimate_ratio", frozenset({("gpu_uuid", uuid)}))]
            assert exported == pytest.approx(gpu["gain_estimate"], abs=0.06)  # GPU busy time moves between runs
            states = {dict(l)["verdict"]: v for (n, l), v in s.items() if n == "mps_gpu_mps_verdict"}
            assert sorted(states) == sorted([PAYS_OFF, MARGINAL, LIKELY_SLOWER]) and sum(states.values()) == 1
    finally:
        fake.kill()
        fake.wait()
