"""Host-to-device copy bandwidth: pageable vs pinned, one large copy vs per-tensor copies.

The block-offload plans stream ~12 GB of transformer weights per step, so this number bounds them.
Usage: python3 scripts/bench_pcie.py  (prints JSON)
"""

import json
import time

import torch


def bandwidth(src: torch.Tensor, dst: torch.Tensor, repeats: int = 5) -> float:
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return src.numel() * src.element_size() * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    n = 256 * 2**20  # 512 MiB of bf16, about one and a half transformer blocks
    dst = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    pageable = torch.randn(n).to(torch.bfloat16)
    pinned = pageable.pin_memory()
    chunks = [pinned[i : i + 2**22] for i in range(0, n, 2**22)]  # 8 MiB tensors, like a block's linears
    dchunks = [dst[i : i + 2**22] for i in range(0, n, 2**22)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for s, d in zip(chunks, dchunks, strict=True):
        d.copy_(s, non_blocking=True)
    torch.cuda.synchronize()
    per_tensor = n * 2 / (time.perf_counter() - start) / 1e9
    out = {
        "pageable_GBps": bandwidth(pageable, dst),
        "pinned_GBps": bandwidth(pinned, dst),
        "pinned_8MiB_tensors_GBps": per_tensor,
        "device": torch.cuda.get_device_name(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
