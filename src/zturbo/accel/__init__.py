"""Speed: torch.compile, fused projections, quantization, attention kernels, CUDA graphs."""
