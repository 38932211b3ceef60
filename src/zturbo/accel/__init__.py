"""Speed: torch.compile, fused projections, quantization, attention kernels, CUDA graphs."""

# What the first compiled call imports (Dynamo's tracer, AOTAutograd, Inductor and its Triton
# code generator): about 550 modules and one to two seconds of a start. Named here, where nothing
# heavy is imported, so that `zturbo serve` can have its forkserver import them early.
COMPILER_MODULES = (
    "torch._dynamo.convert_frame",
    "torch._functorch.aot_autograd",
    "torch._inductor.compile_fx",
    "torch._inductor.codecache",
    "torch._inductor.codegen.triton",
)
