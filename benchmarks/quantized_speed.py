"""Forward time of SmolLM2-135M with 4-bit (and 3-bit) round-to-nearest weights against the float
model, in the same run: a batch of 8 x 64 random tokens, median of 5 timed calls after 2 warm-ups.

    uv run python benchmarks/quantized_speed.py

A QuantizedLinear unpacks and dequantises its whole weight on every call and then runs the same
float matrix product: it saves memory, and it cannot be faster than float by its matrix products
(the dequantisation adds work); how much it adds depends on the batch (a weight is dequantised once
per call, whatever the number of tokens).
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

import paretune.models
from paretune.compress import quantize


def timed(model, ids, repeats: int = 5) -> float:
    with torch.no_grad():
        for _ in range(2):
            model(ids)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ids = torch.randint(0, 49152, (8, 64), generator=torch.Generator().manual_seed(0))
    rows = []
    model, _ = paretune.models.load("smollm2-135m")
    base = timed(model, ids)
    rows.append(("float32", base))
    for bits in (4, 3):
        model, _ = paretune.models.load("smollm2-135m")
        quantize(model, bits=bits, group_size=64, progress=False)
        rows.append((f"RTN {bits}-bit, group 64", timed(model, ids)))
    print(f"SmolLM2-135M forward, batch 8 x 64 tokens, median of 5; {platform.machine()} CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| weights | seconds | x float |")
    print("|---|---:|---:|")
    for label, t in rows:
        print(f"| {label} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
