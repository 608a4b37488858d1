#!/usr/bin/env python3
"""PyTorch's attention core at the shapes of the crate's attention benches, 1 and 2 threads.

`F.scaled_dot_product_attention` (fp32, CPU: PyTorch's fused kernel, which keeps no weights
between the two products) on random `[B, H, T, d_k]` queries, keys and values, median of 15
timings of 20 calls each:

- `attention_core`: the forward pass without a mask, credited with `4·B·H·T²·d_k` FLOPs
  (the two products, as `WORKLOADS.md` counts attention);
- `attention_causal`: the forward pass under a causal mask and its backward pass (`Q`, `K`
  and `V` gradients), credited with three times that, the unmasked work.

Run beside the crate's side in the same session:

    cargo bench --bench layers -- "attention_(core|causal)"
    .venv-torch/bin/python scripts/torch_attention.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

# (name, batch, heads, length, d_k), as in benches/layers.rs.
CORE = (("small", 32, 8, 32, 32), ("base", 8, 8, 64, 64), ("window", 16, 4, 128, 16), ("long", 4, 8, 256, 32))
CAUSAL = (("small", 32, 8, 32, 32), ("base", 8, 8, 64, 64), ("long", 4, 8, 256, 32))


def median_seconds(call, reps=20, rounds=15):
    for _ in range(5):
        call()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def report(group, name, threads, seconds, flops):
    print(f"{group}/{name}/{threads}t: {seconds * 1e6:.1f} us, {flops / seconds / 1e9:.1f} GFLOP/s")


print(f"# torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
for threads in (1, 2):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    for name, b, h, t, dk in CORE:
        q, k, v = (torch.randn(b, h, t, dk, generator=gen) for _ in range(3))
        with torch.no_grad():
            seconds = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v))
        report("attention_core", name, threads, seconds, 4 * b * h * t * t * dk)
    for name, b, h, t, dk in CAUSAL:
        q, k, v = (torch.randn(b, h, t, dk, generator=gen).requires_grad_() for _ in range(3))
        grad = torch.randn(b, h, t, dk, generator=gen)

        def step():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(out, (q, k, v), grad)

        report("attention_causal", name, threads, median_seconds(step), 3 * 4 * b * h * t * t * dk)
