#!/usr/bin/env python3
"""torch.mm at the two reference GEMM sizes, 1 and 2 threads, median of 30 (fp32, CPU).

Run beside `cargo bench --bench kernels -- "gemm/(square_1024|512x512x2048)"` to set the
crate's GEMM against PyTorch's in the same session:

    .venv-torch/bin/python scripts/torch_gemm.py
"""
import statistics
import time

import torch

print(f"# torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
for threads in (1, 2):
    torch.set_num_threads(threads)
    for m, k, n in ((1024, 1024, 1024), (512, 512, 2048)):
        a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        for _ in range(5):
            torch.mm(a, b, out=c)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"torch.mm {m}x{k}x{n} threads={threads}: {med * 1e3:.3f} ms, {2 * m * k * n / med / 1e9:.1f} GFLOP/s")
