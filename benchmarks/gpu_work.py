"""GPU work whose progress can be read at any moment: bf16 matrix products, one line
"MONOTONIC_SECONDS STEPS" after every step (20 products), until stdin closes.

    python benchmarks/gpu_work.py SIZE

CLOCK_MONOTONIC is the same for every process on the host, so the reader can cut the stream at
its own times; run under MPS by setting CUDA_MPS_PIPE_DIRECTORY.
"""

import os
import sys
import threading
import time

import torch

size = int(sys.argv[1])
a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print(f"ready pid={os.getpid()}", flush=True)
steps = 0
while not stop.is_set():
    for _ in range(20):
        a = (a @ b).tanh()
    torch.cuda.synchronize()
    steps += 1
    print(f"{time.monotonic():.6f} {steps}", flush=True)
