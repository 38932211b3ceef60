"""Host-to-device copy bandwidth: pageable vs pinned, one large copy vs per-tensor copies.

The block-offload plans stream ~12 GB of transformer weights per step, so this number bounds them.
Usage (GPU): python3 scripts/bench_pcie.py [--mib 512]  (prints JSON)
"""

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The default, 512 MiB, is about one and a half transformer blocks.
    parser.add_argument("--mib", type=int, default=512, help="bytes per copy in MiB, a multiple of 8 (default 512)")
    args = parser.parse_args(argv)
    if args.mib < 8 or args.mib % 8:
        parser.error(f"--mib {args.mib}: must be a positive multiple of 8")
    if not torch.cuda.is_available():
        parser.error("host-to-device bandwidth needs a CUDA GPU and none is available")
    n = args.mib * 2**19  # bf16 elements
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
