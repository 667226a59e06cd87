"""A real CUDA client for the GPU tests: keeps the GPU busy until its stop file appears.

    cuda_client.py SIZE STOP_FILE [matmul|copy] [float32|bfloat16]
matmul loads the SMs (tensor cores in bfloat16); copy moves SIZE x SIZE tensors through DRAM.
"""

import os
import sys
import time

import torch

size, stop_file = int(sys.argv[1]), sys.argv[2]
kind = sys.argv[3] if len(sys.argv) > 3 else "matmul"
dtype = getattr(torch, sys.argv[4] if len(sys.argv) > 4 else "float32")
a = torch.randn(size, size, device="cuda", dtype=dtype)
b = torch.randn(size, size, device="cuda", dtype=dtype)
torch.cuda.synchronize()
print(f"ready pid={os.getpid()}", flush=True)
while not os.path.exists(stop_file):
    for _ in range(20):
        if kind == "copy":
            b.copy_(a)
        else:
            a = (a @ b).tanh()
    torch.cuda.synchronize()
    time.sleep(0.001)
