"""A real CUDA client for the GPU tests: keeps the GPU busy until its stop file appears."""

import os
import sys
import time

import torch

size, stop_file = int(sys.argv[1]), sys.argv[2]
a = torch.randn(size, size, device="cuda")
b = torch.randn(size, size, device="cuda")
torch.cuda.synchronize()
print(f"ready pid={os.getpid()}", flush=True)
while not os.path.exists(stop_file):
    for _ in range(20):
        a = (a @ b).tanh()
    torch.cuda.synchronize()
    time.sleep(0.001)
print("done", flush=True)
