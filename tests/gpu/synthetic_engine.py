"""A stand-in for a vLLM engine on the GPU machines, where vLLM cannot be installed.

It is NOT vLLM: it does real GPU work (bf16 matrix products, one per step of 100 "tokens") at a
paced token rate and serves /metrics with vLLM's names (vllm:num_requests_running,
vllm:prompt_tokens_total, vllm:kv_cache_usage_perc, vllm:cache_config_info, ...), and its command
line looks like vLLM's, so that the agent discovers and scrapes it as it would a vLLM engine:

    python synthetic_engine.py vllm serve MODEL --port PORT --served-model-name NAME --rate TOKENS_PER_S
"""

import argparse
import os
import sys
import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

parser = argparse.ArgumentParser()
parser.add_argument("vllm")
parser.add_argument("serve")
parser.add_argument("model")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--served-model-name", required=True)
parser.add_argument("--rate", type=float, required=True)
parser.add_argument("--gpu-memory-utilization", default="0.4")
args = parser.parse_args(sys.argv[1:])

registry = CollectorRegistry()
labels = {"engine": "0", "model_name": args.model}
running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", list(labels), registry=registry)
waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", list(labels), registry=registry)
kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", list(labels), registry=registry)
prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", list(labels), registry=registry)
generation = Counter("vllm:generation_tokens", "Number of generation tokens processed.", list(labels), registry=registry)
info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", ["engine", "gpu_memory_utilization"],
             registry=registry)
info.labels(engine="0", gpu_memory_utilization=args.gpu_memory_utilization).set(1)
running.labels(**labels).set(4)
waiting.labels(**labels).set(0)
kv.labels(**labels).set(0.3)

a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
start_http_server(args.port, addr="127.0.0.1", registry=registry)
print(f"ready pid={os.getpid()}", flush=True)

step_tokens = 100
started, steps = time.monotonic(), 0
while True:
    a = (a @ b).tanh()
    torch.cuda.synchronize()
    steps += 1
    prompt.labels(**labels).inc(step_tokens * 0.75)
    generation.labels(**labels).inc(step_tokens * 0.25)
    ahead = started + steps * step_tokens / args.rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
