"""Runtime configuration: one frozen object built from CLI flags and ZTURBO_* environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequestError
from .profiles import AUTO, check_preset

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
TINY_MODEL = "tiny-random"
# Where a model's weights come from (loader.ModelSource.origin, GET /v1/status's `model_source`), as
# `zturbo info` and the web UI's status line name it.
ORIGIN_NAMES = {
    "hf": "Hugging Face hub",
    "modelscope": "ModelScope",
    "local": "local directory",
    TINY_MODEL: "built-in random checkpoint",
    "single-files": "ComfyUI single files",
}
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
SWITCH_CHOICES = ("auto", "on", "off")
# Memory plans, fastest first (zturbo.memory executes them).
MEMORY_CHOICES = ("auto", "resident", "te-offload", "model-offload", "block-offload", "sequential")
QUANTIZE_CHOICES = ("none", "fp8", "int8", "int4")
# The plans that run plain transformer weights only. Quantized ones (torchao's, GGUF's) stream
# under block-offload, through zturbo's own streamer (memory.stream), which packs what they store;
# sequential is diffusers' leaf-level group offloading, which zturbo runs with plain tensors only.
PLAIN_WEIGHT_PLANS = ("sequential",)
# Where a repo id (owner/name) downloads from: the Hugging Face hub or ModelScope.
MODEL_SOURCE_CHOICES = ("hf", "modelscope")
# Host memory for parsed LoRAs (the least recently used goes first).
DEFAULT_LORA_CACHE_BYTES = 2 * 1024**3
# A server batch holds at most this many images and this many pixels: four 1024² images, seven
# 768², eight 512². A batch's GPU time follows its pixels (its tokens), so small images gain from
# deeper batches; the image cap bounds the batch sizes, each with step graphs of its own.
SERVE_MAX_BATCH = 8
SERVE_MAX_BATCH_PIXELS = 4 * 1024 * 1024
# 2048 x 2048: the largest square the reference was measured at; raise it with --max-pixels.
DEFAULT_MAX_PIXELS = 2048 * 2048

# Every environment variable zturbo reads, with one line of doc each. Nothing reads a ZTURBO_*
# variable except through `env()`, so this table is the whole list (a test checks it).
ENV_VARS: dict[str, str] = {
    "ZTURBO_MODEL": "the model: a repo id (modelscope:owner/name: ModelScope), a diffusers or ComfyUI directory, "
    "or tiny-random (--model)",
    "ZTURBO_MODEL_SOURCE": "where a plain repo id downloads from: hf (the default) or modelscope",
    "ZTURBO_TRANSFORMER_FILE": "ComfyUI's transformer file, with the text encoder and VAE files (--transformer)",
    "ZTURBO_TEXT_ENCODER_FILE": "ComfyUI's text encoder file, e.g. qwen_3_4b.safetensors (--text-encoder)",
    "ZTURBO_VAE_FILE": "ComfyUI's VAE file, e.g. ae.safetensors (--vae)",
    "ZTURBO_PRESET": "model profile: auto (from the checkpoint), turbo or base (--preset)",
    "ZTURBO_DEVICE": "auto, cpu, cuda, cuda:N or mps (--device)",
    "ZTURBO_DTYPE": "dtype of every component: auto, bfloat16, float16 or float32 (--dtype)",
    "ZTURBO_COMPILE": "torch.compile: auto, on or off (--compile)",
    "ZTURBO_QUANTIZE": "transformer linears: none, fp8, int8 or int4 (--quantize)",
    "ZTURBO_VAE_TILING": "tiled VAE decode: auto, on or off (--vae-tiling)",
    "ZTURBO_MEMORY": "where the weights live: auto or a plan name (--memory)",
    "ZTURBO_VRAM_BUDGET": "GiB of GPU memory zturbo may use (--vram-budget)",
    "ZTURBO_MAX_PIXELS": "the largest width x height accepted (--max-pixels)",
    "ZTURBO_LORA_DIR": "the LoRA directory requests name their LoRAs in (--lora-dir)",
    "ZTURBO_CONTROLNET": "a ControlNet loaded with the model: a hub repo id, a directory or a .safetensors file",
    "ZTURBO_CACHE": "zturbo's cache: the tiny checkpoint, its tokenizer files, the CLI's Inductor cache",
    "ZTURBO_COMPILE_CACHE": "compiled artifacts kept across restarts: a directory, or off (--compile-cache)",
    "ZTURBO_API_KEY": "zturbo serve: the bearer key every API call must send (--api-key)",
    "ZTURBO_DATA_DIR": "zturbo serve: the job database and the images (--data-dir)",
    "ZTURBO_STORE": "zturbo serve: the job queue, sqlite or a postgresql:// URL shared by many machines (--store)",
    "ZTURBO_TEST_STEP_SLEEP": "test hook: seconds a server worker sleeps after each denoising step",
}


def cache_root() -> Path:
    """ZTURBO_CACHE, else $XDG_CACHE_HOME/zturbo, else ~/.cache/zturbo."""
    root = env("ZTURBO_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zturbo"


def model_source(environ: Mapping[str, str] | None = None) -> str:
    """ZTURBO_MODEL_SOURCE, else 'hf': the hub a repo id without a 'hf:' or 'modelscope:' prefix names."""
    text = env("ZTURBO_MODEL_SOURCE", environ)
    if text is None:
        return MODEL_SOURCE_CHOICES[0]
    value = text.strip().lower()
    if value not in MODEL_SOURCE_CHOICES:
        raise InvalidRequestError(f"ZTURBO_MODEL_SOURCE={text!r} is not one of {', '.join(MODEL_SOURCE_CHOICES)}")
    return value


def default_lora_dir() -> Path:
    """Where LoRA names resolve when neither --lora-dir nor ZTURBO_LORA_DIR says."""
    return cache_root() / "loras"


def default_compile_cache() -> Path:
    """Where compiled artifacts are kept when neither --compile-cache nor ZTURBO_COMPILE_CACHE says."""
    return cache_root() / "compile"


def parse_compile_cache(text: str) -> Path | None:
    """A --compile-cache / ZTURBO_COMPILE_CACHE value: 'off' (None) or a directory."""
    if text.strip().lower() == "off":
        return None
    if not text.strip():
        raise InvalidRequestError("compile cache is empty; pass a directory or 'off'")
    return Path(text).expanduser()


def env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of a registered zturbo variable, or None when it is unset or empty."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not a registered zturbo environment variable (config.ENV_VARS)")
    value = (os.environ if environ is None else environ).get(name)
    return value or None


@dataclass(frozen=True)
class RuntimeConfig:
    """Where the model comes from and where and how it runs."""

    model: str = DEFAULT_MODEL
    # The model's profile (defaults, scheduler shift): auto = what the checkpoint's files tell.
    preset: str = AUTO
    device: str = "auto"
    dtype: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Per-component overrides of `dtype` (None = follow `dtype`).
    transformer_dtype: str | None = None
    text_encoder_dtype: str | None = None
    vae_dtype: str | None = None
    # torch.compile of the transformer blocks and VAE decoder: auto = on for CUDA.
    compile: str = "auto"
    # Transformer block linears (torchao): none, fp8 (dynamic per-row, fp8-capable GPUs), int8 or int4
    # (weight-only; int4 on CUDA).
    quantize: str = "none"
    # VAE tiled decode: auto = when the decode would not fit in free GPU memory, or after it ran out.
    vae_tiling: str = "auto"
    # Placement of the weights: auto = the fastest plan whose estimate fits the budget.
    memory: str = "auto"
    # GiB of GPU memory zturbo may use (enforced on CUDA); None = what is free.
    vram_budget: float | None = None
    # Where LoRA names resolve (None = default_lora_dir()); whether a name may also be a file path
    # (the CLI and the library: yes; the server: no, clients name files in the directory only).
    lora_dir: str | None = None
    lora_paths: bool = True
    lora_cache_bytes: int = DEFAULT_LORA_CACHE_BYTES
    # A ControlNet loaded with the model (a hub repo id, a diffusers directory or a single
    # .safetensors file); None: requests cannot take a control image.
    controlnet: str | None = None
    # ComfyUI's single files, all three or none; they replace `model` (zturbo.singlefile).
    transformer_file: str | None = None
    text_encoder_file: str | None = None
    vae_file: str | None = None
    # Compiled artifacts kept across processes (accel.artifacts); None: compile afresh each start.
    compile_cache: Path | None = dataclasses.field(default_factory=default_compile_cache)
    # Processes (one GPU each) that share one image's tokens (accel.sequence, zturbo.distributed).
    parallel: int = 1

    def __post_init__(self) -> None:
        check_preset(self.preset)
        for name in ("dtype", "transformer_dtype", "text_encoder_dtype", "vae_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPE_CHOICES:
                raise InvalidRequestError(f"{name} {value!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.memory not in MEMORY_CHOICES:
            raise InvalidRequestError(f"memory {self.memory!r} is not one of {', '.join(MEMORY_CHOICES)}")
        if self.vram_budget is not None and not self.vram_budget > 0:
            raise InvalidRequestError(f"vram_budget {self.vram_budget} must be a positive number of GiB")
        if self.vae_tiling not in SWITCH_CHOICES:
            raise InvalidRequestError(f"vae_tiling {self.vae_tiling!r} is not one of {', '.join(SWITCH_CHOICES)}")
        if self.compile not in SWITCH_CHOICES:
            raise InvalidRequestError(f"compile {self.compile!r} is not one of {', '.join(SWITCH_CHOICES)}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise InvalidRequestError(f"quantize {self.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
        if self.parallel < 1:
            raise InvalidRequestError(f"parallel {self.parallel} must be 1 (one process) or more")
        if self.parallel > 1 and self.controlnet is not None:
            raise InvalidRequestError(
                f"parallel {self.parallel} cannot run a ControlNet (its block samples cover the whole sequence); "
                "use parallel 1 with --controlnet"
            )
        if self.max_pixels < 16 * 16:
            raise InvalidRequestError(f"max_pixels {self.max_pixels} is below the minimum of 256")
        given = [n for n, v in self.component_files_given().items() if v]
        if given and len(given) < 3 and not self.gguf_transformer():
            missing = [f"{n}_file" for n, v in self.component_files_given().items() if not v]
            raise InvalidRequestError(
                f"single files come as a set: {', '.join(f'{n}_file' for n in given)} given, but "
                f"{' and '.join(missing)} missing (pass --transformer, --text-encoder and --vae together)"
            )
        if str(self.transformer_file).lower().endswith(".gguf"):  # refused before any download, as loading would
            check_stored_settings(self, self.transformer_file)
        if not self.model.strip():
            raise InvalidRequestError("model is empty; pass a hub repo id, a local directory or 'tiny-random'")

    def component_files_given(self) -> dict[str, str | None]:
        return {"transformer": self.transformer_file, "text_encoder": self.text_encoder_file, "vae": self.vae_file}

    def component_files(self) -> dict[str, str] | None:
        """The single files that replace `model` (or, a GGUF transformer alone, its transformer
        weights), or None when `model` names the whole checkpoint."""
        files = self.component_files_given()
        if self.gguf_transformer():
            return {"transformer": str(self.transformer_file)}
        return {k: v for k, v in files.items() if v} if all(files.values()) else None

    def gguf_transformer(self) -> bool:
        """Whether the transformer file alone is given, and is a GGUF file (zturbo.gguf)."""
        given = self.component_files_given()
        alone = given["transformer"] and not (given["text_encoder"] or given["vae"])
        return bool(alone) and str(self.transformer_file).lower().endswith(".gguf")

    def component_dtypes(self) -> dict[str, str | None]:
        return {"transformer": self.transformer_dtype, "text_encoder": self.text_encoder_dtype, "vae": self.vae_dtype}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> RuntimeConfig:
        """Defaults, then ZTURBO_<FIELD> for each field (e.g. ZTURBO_MEMORY), then explicit overrides."""
        values: dict[str, object] = {}
        for field in (
            "model",
            "preset",
            "device",
            "dtype",
            "compile",
            "quantize",
            "vae_tiling",
            "memory",
            "lora_dir",
            "controlnet",
            "transformer_file",
            "text_encoder_file",
            "vae_file",
        ):
            text = env(f"ZTURBO_{field.upper()}", environ)
            if text:
                values[field] = text
        numbers: tuple[tuple[str, type, str], ...] = (
            ("vram_budget", float, "a number of GiB"),
            ("max_pixels", int, "a whole number"),
        )
        for field, kind, what in numbers:
            raw = env(f"ZTURBO_{field.upper()}", environ)
            if raw:
                try:
                    values[field] = kind(raw)
                except ValueError:
                    raise InvalidRequestError(f"ZTURBO_{field.upper()}={raw!r} is not {what}") from None
        cache = env("ZTURBO_COMPILE_CACHE", environ)
        if cache:
            values["compile_cache"] = parse_compile_cache(cache)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("compile_cache"), str):  # a flag's text: a directory or 'off'
            values["compile_cache"] = parse_compile_cache(values["compile_cache"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


def check_stored_settings(config: RuntimeConfig, path: object) -> None:
    """The settings a GGUF transformer refuses, checkable before anything loads or downloads."""
    if config.quantize != "none":
        raise InvalidRequestError(
            f"--quantize {config.quantize} cannot apply to the GGUF transformer {path}, which is quantized "
            "already; use --quantize none"
        )
    if config.memory in PLAIN_WEIGHT_PLANS:
        raise InvalidRequestError(
            f"--memory {config.memory} (diffusers' group offloading) runs plain weights only and cannot run the "
            f"GGUF transformer {path}; use --memory block-offload, which streams its quantized bytes, or auto, "
            "resident, te-offload or model-offload"
        )


def process_defaults() -> None:
    """The environment settings of an engine's process, unless the user set them; read when CUDA
    first allocates and when Inductor first compiles, so set before either. Worker processes
    inherit them; a process started elsewhere (a Ray replica) calls this itself.

    - Expandable segments for PyTorch's CUDA allocator: the memory planner moves and frees blocks
      of weights, and fixed-size segments fragment under a tight budget (measured: 2.2 GiB of an
      8 GiB cap reserved but unusable).
    - Inductor's caches with zturbo's (they default to /tmp), so that restarts reuse them."""
    if not os.environ.get("PYTORCH_CUDA_ALLOC_CONF") and not os.environ.get("PYTORCH_ALLOC_CONF"):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
