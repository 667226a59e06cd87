"""A synthetic LLM engine that stands in for vLLM, which cannot be installed on the GPU machine.

It keeps what decides whether two engines gain from sharing a GPU: the GPU work of a Qwen2.5 model
(0.5B, 1.5B, 3B or 7B shapes, random bf16 weights made on the GPU), a static KV cache, a decode
step captured once in a CUDA graph (a step costs GPU time, not Python launch overhead), a batched
prefill, and a wait for every step's tokens, as vLLM waits for its sampled tokens. The wait is on a
blocking CUDA event, so the waiting thread sleeps: only the optional CPU work between steps
(`--cpu-work-ms`, vLLM's scheduler, not overlapped with the GPU) can make the engine CPU-bound in
the agent's eyes. It serves vLLM's metric names on 127.0.0.1:--port and its command line looks
like vLLM's, so the mpswatch agent discovers and scrapes it as it would vLLM:

    python3 -m benchmarks.mps_gain.engine vllm serve Qwen/Qwen2.5-0.5B-Instruct --port P \\
        --served-model-name NAME --run-dir DIR --engines 2 --engine-index 0 \\
        --cases 512:decode,512:prefill --seconds 3 --warmup 1 --results OUT.jsonl

Left out: RoPE (elementwise on q and k, which vLLM fuses into one small kernel; it changes neither
the matrix products nor the attention), sampling beyond a greedy argmax, paged KV blocks,
tokenisation, request serving. A plain eager Hugging Face loop is no stand-in: it is CPU-bound at
about 375 tokens/s for every size on an H200, which hides the GPU overlap MPS is about.

The workloads (benchmarks/mps_gain/cases.py): decode-heavy, 32 sequences each attending over a
cache full of `context` tokens at every step; prefill-heavy, prompts of `context` tokens, 8192
prompt tokens a prefill step (eager), then 16 tokens each (the prefill's, then 15 graph-replayed
decode steps). A decode step attends over its whole static cache (in the prefill workload that
includes the at most 15 slots still to be written: no mask, so the attention kernel is the plain
one), and writes the new K/V at a position kept on the GPU that wraps around inside the cache.

Per case, with the other engines: build the cache and graph, write `ready`, wait for every engine's
`ready`, warm up, write `measuring`, run flat out for --seconds, write `measured` and keep running
until every engine has measured (so no engine's window ends with the GPU to itself), free the cache
and graph, append one JSON line. Memory, 7B at 8k context: 15.2 GB of weights and a decode cache of
32 x 8192 tokens x 57,344 B = 15.0 GB, 30 GB an engine; prefill activations stay under about 1.5 GB
since a prefill step takes at most 8192 tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from benchmarks.mps_gain.cases import (
    DECODE_REQUEST_TOKENS,
    SHAPES_BY_MODEL,
    TOKENS_AFTER_PREFILL,
    Case,
    ModelShape,
    all_marked,
    marker,
    parse_cases,
)
from benchmarks.mps_gain.histograms import LatencyHistograms
from benchmarks.mps_gain.timing import Phase, figures, parse_timetable, phase_at

DTYPE = torch.bfloat16
RMS_EPS = 1e-6
WAIT_TIMEOUT_S = 240.0  # the first case waits for every engine's torch import, weights and graph
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)  # vLLM's 1-2-5 steps


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class KVCache:
    """One static K and one static V tensor: (layers, batch, kv_heads, length, head_dim)."""

    def __init__(self, shape: ModelShape, batch: int, length: int, device: torch.device) -> None:
        dims = (shape.layers, batch, shape.kv_heads, length, shape.head_dim)
        self.k = torch.empty(dims, device=device, dtype=DTYPE).normal_()
        self.v = torch.empty(dims, device=device, dtype=DTYPE).normal_()
        self.length = length


class Model:
    """Random weights of one Qwen2.5 shape, made on the device: no CPU copy of 15 GB to upload."""

    def __init__(self, shape: ModelShape, device: torch.device) -> None:
        def weight(*dims: int) -> torch.Tensor:
            return torch.empty(dims, device=device, dtype=DTYPE).normal_(0.0, 0.02)

        def ones(width: int) -> torch.Tensor:
            return torch.ones(width, device=device, dtype=DTYPE)

        qkv = shape.q_width + 2 * shape.kv_width
        self.shape = shape
        self.embed = weight(shape.vocab, shape.hidden)
        self.lm_head = self.embed if shape.tied_embeddings else weight(shape.vocab, shape.hidden)
        self.final_norm = ones(shape.hidden)
        self.layers = [
            Layer(
                input_norm=ones(shape.hidden),
                qkv=weight(qkv, shape.hidden),
                qkv_bias=weight(qkv),
                o_proj=weight(shape.hidden, shape.q_width),
                post_norm=ones(shape.hidden),
                gate_up=weight(2 * shape.intermediate, shape.hidden),
                down=weight(shape.hidden, shape.intermediate),
            )
            for _ in range(shape.layers)
        ]

    def _hidden_states(self, x: torch.Tensor, attend: Callable) -> torch.Tensor:
        """x: (tokens, hidden). `attend(layer_index, q, k, v)` returns (tokens, q_width)."""
        shape = self.shape
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (shape.hidden,), layer.input_norm, RMS_EPS)
            q, k, v = F.linear(h, layer.qkv, layer.qkv_bias).split([shape.q_width, shape.kv_width, shape.kv_width], -1)
            x = x + F.linear(attend(index, q, k, v), layer.o_proj)
            h = F.rms_norm(x, (shape.hidden,), layer.post_norm, RMS_EPS)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        return x

    def _next_tokens(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Greedy tokens from the logits of each sequence's last position only."""
        normed = F.rms_norm(last_hidden, (self.shape.hidden,), self.final_norm, RMS_EPS)
        return F.linear(normed, self.lm_head).argmax(dim=-1)

    def decode(self, cache: KVCache, tokens: torch.Tensor, position: torch.Tensor) -> None:
        """One token for each sequence, in place: reads `tokens` (batch,) and writes the next ones
        there, writes K/V at `position` (a (1,) tensor on the device) and advances it, wrapping
        around inside the cache. Everything stays on the device, so it replays from a graph."""
        shape, batch = self.shape, tokens.shape[0]

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[index].index_copy_(2, position, k.view(batch, shape.kv_heads, 1, shape.head_dim))
            cache.v[index].index_copy_(2, position, v.view(batch, shape.kv_heads, 1, shape.head_dim))
            # grouped-query attention without copying K/V: a KV head's query heads take the place
            # of query positions (one token each, so no mask is needed)
            grouped = q.view(batch, shape.kv_heads, shape.group, shape.head_dim)
            out = F.scaled_dot_product_attention(grouped, cache.k[index], cache.v[index])
            return out.reshape(batch, shape.q_width)

        hidden = self._hidden_states(F.embedding(tokens, self.embed), attend)
        tokens.copy_(self._next_tokens(hidden))
        position.add_(1).remainder_(cache.length)

    def prefill(self, cache: KVCache, prompts: torch.Tensor) -> torch.Tensor:
        """Causal attention over (batch, length) prompts; their K/V fill the cache's first `length`
        slots. Returns each prompt's next token."""
        shape = self.shape
        batch, length = prompts.shape

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q = q.view(batch, length, shape.q_heads, shape.head_dim).transpose(1, 2)
            k = k.view(batch, length, shape.kv_heads, shape.head_dim).transpose(1, 2)
            v = v.view(batch, length, shape.kv_heads, shape.head_dim).transpose(1, 2)
            cache.k[index, :, :, :length].copy_(k)
            cache.v[index, :, :, :length].copy_(v)
            # K/V repeated per query head: every backend, flash attention included, takes that
            out = F.scaled_dot_product_attention(
                q, k.repeat_interleave(shape.group, 1), v.repeat_interleave(shape.group, 1), is_causal=True
            )
            return out.transpose(1, 2).reshape(batch * length, shape.q_width)

        hidden = self._hidden_states(F.embedding(prompts.reshape(-1), self.embed), attend)
        return self._next_tokens(hidden.view(batch, length, shape.hidden)[:, -1])


def captured(step: Callable[[], None], device: torch.device) -> tuple[Callable[[], None], object | None]:
    """`step` replayed from a CUDA graph, warmed up on a side stream first as PyTorch's docs ask;
    on the CPU (to check the model code without a GPU) `step` itself."""
    if device.type != "cuda":
        return step, None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay, graph


def step_waiter(device: torch.device) -> Callable[[], None]:
    """Waits for the work queued so far on a blocking event: the thread sleeps instead of spinning
    a core, so an engine waiting on the GPU never looks CPU-bound."""
    if device.type != "cuda":
        return lambda: None
    event = torch.cuda.Event(blocking=True)

    def wait() -> None:
        event.record()
        event.synchronize()

    return wait


class VllmMetrics:
    """vLLM's metric names and labels, as the agent reads them."""

    def __init__(self, model_name: str, gpu_memory_utilization: str, port: int) -> None:
        registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        names = list(labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=registry).labels(**labels)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", names,
                              registry=registry).labels(**labels)
        self.generation = Counter("vllm:generation_tokens", "Number of generation tokens processed.", names,
                                  registry=registry).labels(**labels)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", names,
                                        buckets=TOKEN_BUCKETS, registry=registry).labels(**labels)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                            names, buckets=TOKEN_BUCKETS, registry=registry).labels(**labels)
        self.latency = LatencyHistograms(model_name)
        registry.register(self.latency)
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", ["engine", "gpu_memory_utilization"],
              registry=registry).labels(engine="0", gpu_memory_utilization=gpu_memory_utilization).set(1)
        self.waiting.set(0)
        self.idle()
        start_http_server(port, addr="127.0.0.1", registry=registry)

    def busy(self, batch: int) -> None:
        self.running.set(batch)
        self.kv_usage.set(1.0)  # the cache is sized for the batch and full

    def idle(self) -> None:
        self.running.set(0)
        self.kv_usage.set(0.0)

    def finished(self, requests: int, prompt_tokens: int, generated_tokens: int) -> None:
        for _ in range(requests):
            self.request_prompt.observe(prompt_tokens)
            self.request_generation.observe(generated_tokens)


class DecodeHeavy:
    """`batch` sequences (32 unless given) decoding over a cache full of `context` tokens. Requests
    "finish" every 256 tokens (histograms only: their next prompts are taken as already in the cache,
    never prefilled, so the prompt token counter stays put and no time to first token is observed)."""

    def __init__(self, model: Model, case: Case, device: torch.device, metrics: VllmMetrics,
                 batch: int | None = None) -> None:
        self.case, self.metrics = case, metrics
        self.batch = batch or case.batch
        self.cache = KVCache(model.shape, self.batch, case.cache_tokens, device)
        self.tokens = torch.randint(model.shape.vocab, (self.batch,), device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.decode, self.graph = captured(lambda: model.decode(self.cache, self.tokens, self.position), device)
        self.wait = step_waiter(device)
        self.generated = 0
        self.last, self.finished = "decode", False  # what the last step was, and whether it ended requests

    def step(self) -> int:
        """One synchronised step; the tokens it counts."""
        self.decode()
        self.wait()
        self.metrics.generation.inc(self.batch)
        self.generated += 1
        self.finished = self.generated == DECODE_REQUEST_TOKENS
        if self.finished:
            self.metrics.finished(self.batch, self.case.context, DECODE_REQUEST_TOKENS)
            self.generated = 0
        return self.batch


class PrefillHeavy:
    """Prompts of `context` tokens, prefilled 8192 tokens at a time (eager), then 16 tokens each:
    the prefill's own and 15 graph-replayed decode steps. Every step counts prompt + generated."""

    def __init__(self, model: Model, case: Case, device: torch.device, metrics: VllmMetrics) -> None:
        self.model, self.case, self.metrics = model, case, metrics
        self.batch = case.batch
        self.cache = KVCache(model.shape, case.batch, case.cache_tokens, device)
        self.prompts = torch.randint(model.shape.vocab, (case.batch, case.context), device=device)
        self.tokens = torch.zeros(case.batch, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.decode, self.graph = captured(lambda: model.decode(self.cache, self.tokens, self.position), device)
        self.wait = step_waiter(device)
        self.generated = 0  # per sequence, this round; 0: the next step prefills
        self.last, self.finished = "prefill", False

    def step(self) -> int:
        batch, context = self.case.batch, self.case.context
        if self.generated == 0:
            self.tokens.copy_(self.model.prefill(self.cache, self.prompts))
            self.position.fill_(context)
            self.wait()
            self.metrics.prompt.inc(batch * context)
            self.metrics.generation.inc(batch)
            self.generated = 1
            self.last, self.finished = "prefill", False
            return batch * context + batch
        self.decode()
        self.wait()
        self.metrics.generation.inc(batch)
        self.generated += 1
        self.last, self.finished = "decode", self.generated == TOKENS_AFTER_PREFILL
        if self.finished:
            self.metrics.finished(batch, context, TOKENS_AFTER_PREFILL)
            self.generated = 0
        return batch


class PrefillOnly:
    """The interference proof's bursting engine: every step prefills `batch` prompts of `context`
    tokens (eager, `batch * context` prompt tokens a step) and ends them with the prefill's token,
    so a step is one time to first token per prompt and no decode runs."""

    def __init__(self, model: Model, case: Case, device: torch.device, metrics: VllmMetrics, batch: int) -> None:
        self.model, self.case, self.metrics, self.batch = model, case, metrics, batch
        self.cache = KVCache(model.shape, batch, case.context, device)
        self.prompts = torch.randint(model.shape.vocab, (batch, case.context), device=device)
        self.wait = step_waiter(device)
        self.graph = None
        self.last, self.finished = "prefill", True

    def step(self) -> int:
        self.model.prefill(self.cache, self.prompts)
        self.wait()
        self.metrics.prompt.inc(self.batch * self.case.context)
        self.metrics.generation.inc(self.batch)
        self.metrics.finished(self.batch, self.case.context, 1)
        return self.batch * self.case.context + self.batch


Workload = DecodeHeavy | PrefillHeavy | PrefillOnly
WORKLOAD_CLASSES = {"decode": DecodeHeavy, "prefill": PrefillHeavy}


class StepAccount:
    """A step's latencies, from its interval (the end of the step before, or the end of a pacing
    sleep, to the end of this one: CPU work included, as vLLM's scheduler time is): a decode step is
    one inter-token latency per sequence, a prefill step one time to first token per prompt (its
    prompts arrived when the step's interval began: the closed loop takes a new round at once, so
    the queue time observed is 0), and a step that ends requests one end-to-end latency each, since
    their arrival. Always into the engine's histograms; into the raw lists while `recording`."""

    def __init__(self, histograms: LatencyHistograms) -> None:
        self.histograms = histograms
        self.recording = False
        self.itl: list[float] = []
        self.ttft: list[float] = []
        self.arrival: float | None = None  # of the requests running now, perf_counter seconds

    def step(self, workload: Workload, interval: float, end: float) -> None:
        batch = workload.batch
        if self.arrival is None:
            self.arrival = end - interval
        if workload.last == "prefill":
            self.histograms.observe("ttft", interval, batch)
            if self.recording:
                self.ttft.append(interval)
        else:
            self.histograms.observe("itl", interval, batch)
            if self.recording:
                self.itl.append(interval)
        if workload.finished:
            self.histograms.observe("e2e", end - self.arrival, batch)
            self.histograms.observe("queue", 0.0, batch)
            self.arrival = None

    def figures(self) -> dict:
        """Exact figures of the raw lists: every step of a case has the same batch, so the per-step
        distribution is the per-token (per-prompt) one."""
        return {**figures("itl", self.itl), **figures("ttft", self.ttft)}


class Stepper:
    """Steps a workload with its CPU work and accounts each step's latencies."""

    def __init__(self, workload: Workload, cpu_work_s: float, account: StepAccount) -> None:
        self.workload, self.cpu_work_s, self.account = workload, cpu_work_s, account
        self.previous = time.perf_counter()  # the end of the last step

    def step(self) -> int:
        busy_cpu(self.cpu_work_s)
        tokens = self.workload.step()
        end = time.perf_counter()
        self.account.step(self.workload, end - self.previous, end)
        self.previous = end
        return tokens


def busy_cpu(seconds: float) -> None:
    """Python work holding the GIL, as vLLM's scheduler does between two steps."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_for(stepper: Stepper, seconds: float) -> tuple[int, int, float]:
    """Steps until `seconds` have passed; (tokens, steps, seconds up to the end of the last step)."""
    tokens = steps = 0
    started = stepper.previous = time.perf_counter()
    while stepper.previous - started < seconds:
        tokens += stepper.step()
        steps += 1
    return tokens, steps, stepper.previous - started


class Meeting:
    """The engines of one launch waiting for each other through marker files in the run dir."""

    def __init__(self, run_dir: Path, engines: int, engine_index: int) -> None:
        self.run_dir, self.engines, self.engine_index = run_dir, engines, engine_index
        self.parent = os.getppid()

    def mark(self, case_index: int, stage: str) -> None:
        marker(self.run_dir, case_index, stage, self.engine_index).touch()

    def check(self, started: float, what: str) -> None:
        """Fails loudly on a wait past the timeout, or when the orchestrator is gone."""
        if os.getppid() != self.parent:
            raise SystemExit(f"engine {self.engine_index}: the orchestrator is gone")
        if time.monotonic() - started > WAIT_TIMEOUT_S:
            raise SystemExit(f"engine {self.engine_index}: {what}: other engines missing after {WAIT_TIMEOUT_S:g} s")

    def wait_all(self, case_index: int, stage: str) -> None:
        started = time.monotonic()
        while not all_marked(self.run_dir, case_index, stage, self.engines):
            self.check(started, f"case {case_index} {stage}")
            time.sleep(0.005)

    def run_until_all(self, case_index: int, stage: str, stepper: Stepper) -> None:
        """Keeps the GPU loaded as in the measurement until every engine has reached `stage`."""
        started = time.monotonic()
        while not all_marked(self.run_dir, case_index, stage, self.engines):
            self.check(started, f"case {case_index} {stage}")
            stepper.step()


# ---------------------------------------------------------------- the interference proof (issue 18)

READY_FILE, START_FILE = "ready.{index}", "start"  # in the run dir: engine built / the timetable's origin


class PhaseLog:
    """Per phase of the timetable: the steps taken and their raw latencies; one JSON line a phase,
    written as soon as it ends, then one summary line per phase kind (and `calm`: quiet and idle)."""

    def __init__(self, role: str, phases: list[Phase], origin: float, results: Path, key: str) -> None:
        self.role, self.phases, self.origin, self.results, self.key = role, phases, origin, results, key
        self.values: dict[str, list[float]] = {phase.name: [] for phase in phases}
        self.steps = dict.fromkeys(self.values, 0)
        self.tokens = dict.fromkeys(self.values, 0)
        self.written: set[str] = set()

    def add(self, wall: float, tokens: int, value: float) -> None:
        """A step in the phase `wall` (time.time()) falls in."""
        phase = phase_at(self.phases, wall - self.origin)
        if phase is not None:
            self.values[phase.name].append(value)
            self.steps[phase.name] += 1
            self.tokens[phase.name] += tokens
        self.flush(wall)

    def flush(self, wall: float) -> None:
        """Writes every phase over by `wall` not written yet."""
        for phase in self.phases:
            if phase.name not in self.written and self.origin + phase.end <= wall:
                self.written.add(phase.name)
                self._write({"role": self.role, "phase": phase.name, "kind": phase.kind,
                             "start": self.origin + phase.start, "end": self.origin + phase.end,
                             "steps": self.steps[phase.name], "tokens": self.tokens[phase.name],
                             **figures(self.key, self.values[phase.name])})

    def summarise(self) -> None:
        kinds = {kind: [name for name in self.values if name.rstrip("0123456789") == kind]
                 for kind in ("quiet", "burst", "idle")}
        kinds["calm"] = kinds["quiet"] + kinds["idle"]
        for kind, names in kinds.items():
            values = [value for name in names for value in self.values[name]]
            self._write({"role": self.role, "summary": kind, "steps": sum(self.steps[name] for name in names),
                         **figures(self.key, values)})

    def _write(self, line: dict) -> None:
        with self.results.open("a") as out:
            out.write(json.dumps(line) + "\n")


def wait_for_start(run_dir: Path, index: int, parent: int, idle_step: Callable[[], None]) -> float:
    """Marks this engine ready and returns the timetable's origin (time.time()) once the orchestrator
    has written it; `idle_step` runs meanwhile (a paced decode step, or a short sleep)."""
    (run_dir / READY_FILE.format(index=index)).touch()
    started = time.monotonic()
    start_file = run_dir / START_FILE
    while True:
        try:
            return float(start_file.read_text())
        except (OSError, ValueError):
            pass
        if os.getppid() != parent:
            raise SystemExit(f"engine {index}: the orchestrator is gone")
        if time.monotonic() - started > WAIT_TIMEOUT_S:
            raise SystemExit(f"engine {index}: no start after {WAIT_TIMEOUT_S:g} s")
        idle_step()


def run_steady(model: Model, args: argparse.Namespace, device: torch.device, metrics: VllmMetrics,
               phases: list[Phase]) -> None:
    """A light steady decoder: `--batch` sequences at `--context`, one step every 1/--steps-per-second
    seconds (a late step is followed at once, never by a catch-up burst), for the whole timetable.
    Its inter-token latency is a step's own wall time, from the end of the pacing sleep to its tokens:
    the pacing stands for a light load leaving the GPU idle between steps, not for time its sequences
    wait, so a neighbour's slowing of the GPU shows undiluted."""
    workload = DecodeHeavy(model, Case(args.context, "decode"), device, metrics, batch=args.batch)
    account = StepAccount(metrics.latency)
    period = 1.0 / args.steps_per_second
    state = {"next": time.perf_counter()}

    def paced_step() -> tuple[int, float]:
        pause = state["next"] - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        begin = time.perf_counter()
        tokens = workload.step()
        end = time.perf_counter()
        account.step(workload, end - begin, end)
        state["next"] = max(state["next"] + period, end)
        return tokens, end - begin

    workload.step()
    metrics.busy(args.batch)
    origin = wait_for_start(args.run_dir, args.engine_index, os.getppid(), paced_step)
    log = PhaseLog("steady", phases, origin, args.results, "itl")
    parent = os.getppid()
    while (now := time.time()) < origin + phases[-1].end:
        if os.getppid() != parent:
            raise SystemExit("steady engine: the orchestrator is gone")
        tokens, interval = paced_step()
        if now < origin:
            continue  # warm, not logged
        log.add(time.time(), tokens, interval)
    log.flush(time.time())
    log.summarise()
    metrics.idle()


def run_bursting(model: Model, args: argparse.Namespace, device: torch.device, metrics: VllmMetrics,
                 phases: list[Phase]) -> None:
    """Idle (nothing on the GPU, running 0, prompt counter flat) but in burst phases, where it runs
    back-to-back prefill steps of --prefill-tokens (prompts of --context), running = their prompts.
    A step that would end past its burst (by the last step's time) is not started."""
    batch = max(1, args.prefill_tokens // args.context)
    workload = PrefillOnly(model, Case(args.context, "prefill"), device, metrics, batch)
    account = StepAccount(metrics.latency)
    workload.step()
    metrics.idle()
    origin = wait_for_start(args.run_dir, args.engine_index, os.getppid(), lambda: time.sleep(0.01))
    log = PhaseLog("bursting", phases, origin, args.results, "ttft")
    parent = os.getppid()
    last_step_s = 0.0
    while (now := time.time()) < origin + phases[-1].end:
        if os.getppid() != parent:
            raise SystemExit("bursting engine: the orchestrator is gone")
        phase = phase_at(phases, now - origin)
        phase_end = origin + (phase.end if phase is not None else phases[0].start)
        if phase is None or phase.kind != "burst" or now + last_step_s > phase_end:
            metrics.idle()
            log.flush(now)
            time.sleep(max(0.0, min(0.05, phase_end - now)))
            continue
        metrics.busy(batch)
        started = time.time()  # a step counts in the phase that started it
        begin = time.perf_counter()
        tokens = workload.step()
        end = time.perf_counter()
        last_step_s = end - begin
        account.step(workload, last_step_s, end)
        log.add(started, tokens, last_step_s)
    metrics.idle()
    log.flush(time.time())
    log.summarise()


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Synthetic vLLM-like engine (benchmarks/mps_gain).")
    parser.add_argument("program", choices=["vllm"])
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model", choices=sorted(SHAPES_BY_MODEL))
    parser.add_argument("--port", type=int, required=True, help="vLLM metrics on 127.0.0.1:PORT/metrics")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--gpu-memory-utilization", default="0.9", help="only a label of vllm:cache_config_info")
    parser.add_argument("--run-dir", type=Path, required=True, help="where the engines' marker files meet")
    parser.add_argument("--engines", type=int, default=1, help="engines of this launch, this one included")
    parser.add_argument("--engine-index", type=int, default=0)
    parser.add_argument("--cases", help="CONTEXT:WORKLOAD[:CPU_WORK_MS],... (workload decode|prefill)")
    parser.add_argument("--cpu-work-ms", type=float, default=0.0, help="busy CPU work per step, for cases without their own")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement window per case")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds run before the window")
    parser.add_argument("--results", type=Path, required=True, help="JSON lines, one per case (or phase), appended")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: checks the engine's logic without a GPU (no graphs, no events; slow)")
    proof = parser.add_argument_group("the interference proof (benchmarks/interference.py), instead of --cases")
    proof.add_argument("--role", choices=["steady", "bursting"],
                       help="steady: a paced light decoder; bursting: idle, and prefill bursts on the timetable")
    proof.add_argument("--timetable", default="30,25,25,2", help="QUIET,BURST,IDLE,CYCLES seconds (cycles whole)")
    proof.add_argument("--context", type=int, default=512, help="steady: tokens in cache; bursting: prompt length")
    proof.add_argument("--batch", type=int, default=4, help="steady: sequences decoding")
    proof.add_argument("--steps-per-second", type=float, default=50.0, help="steady: the pacing")
    proof.add_argument("--prefill-tokens", type=int, default=8192, help="bursting: prompt tokens a prefill step")
    args = parser.parse_args(argv)
    if (args.cases is None) == (args.role is None):
        parser.error("give --cases or --role")
    return args


def run_cases(model: Model, args: argparse.Namespace, device: torch.device, metrics: VllmMetrics) -> None:
    on_gpu = device.type == "cuda"
    meeting = Meeting(args.run_dir, args.engines, args.engine_index)
    for index, case in enumerate(parse_cases(args.cases, args.cpu_work_ms)):
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        workload = WORKLOAD_CLASSES[case.workload](model, case, device, metrics)
        workload.step()  # the first prefill and replay happen before the warm-up
        meeting.mark(index, "ready")
        meeting.wait_all(index, "ready")
        metrics.busy(case.batch)
        account = StepAccount(metrics.latency)
        stepper = Stepper(workload, case.cpu_work_ms / 1000, account)
        run_for(stepper, args.warmup)
        meeting.mark(index, "measuring")
        account.recording = True
        tokens, steps, seconds = run_for(stepper, args.seconds)
        account.recording = False
        meeting.mark(index, "measured")
        meeting.run_until_all(index, "measured", stepper)
        metrics.idle()
        if workload.graph is not None:
            workload.graph.reset()
        del workload, stepper
        gc.collect()
        peak = 0
        if on_gpu:
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.empty_cache()
        latency = account.figures()
        line = {"case": index, "context": case.context, "workload": case.workload, "cpu_work_ms": case.cpu_work_ms,
                "batch": case.batch, "tokens": tokens, "steps": steps, "seconds": seconds,
                "peak_memory_bytes": peak, **latency}
        with args.results.open("a") as out:
            out.write(json.dumps(line) + "\n")
        itl = latency["itl_p50_s"]
        print(f"engine {args.engine_index}: {case.spec} {tokens / seconds:.0f} tok/s, {steps} steps, "
              f"ITL p50 {'-' if itl is None else f'{itl * 1000:.2f} ms'}, peak {peak / 2**30:.1f} GiB", flush=True)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("engine: no CUDA device")
        torch.backends.cuda.enable_cudnn_sdp(False)  # FlashAttention, as vLLM uses, not the cuDNN attention
        # newer PyTorch may prefer on Hopper
    shape = SHAPES_BY_MODEL[args.model]
    phases = parse_timetable(args.timetable) if args.role else []
    metrics = VllmMetrics(args.model, args.gpu_memory_utilization, args.port)
    settle = step_waiter(device)  # sleeps until the device is done, where torch.cuda.synchronize() may spin
    with torch.inference_mode():
        model = Model(shape, device)
        settle()
        print(f"engine {args.engine_index}: pid {os.getpid()}, {shape.model} built", flush=True)
        if args.role == "steady":
            run_steady(model, args, device, metrics, phases)
        elif args.role == "bursting":
            run_bursting(model, args, device, metrics, phases)
        else:
            run_cases(model, args, device, metrics)


if __name__ == "__main__":
    main(sys.argv[1:])
