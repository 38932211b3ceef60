"""What a generation returns: the images with their metadata, the request, timings and warnings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .request import GenerateRequest


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image with its metadata in .info
    seed: int
    prompt: str
    negative_prompt: str
    metadata: dict[str, Any]
    variation_seed: int | None = None
    warnings: list[str] = field(default_factory=list)  # what the request lost for this image (a truncated prompt)


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    request: GenerateRequest
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fallbacks: list[dict[str, str]] = field(default_factory=list)  # precision and memory fallbacks, in order

    def save(self, path: str | None = None, *, overwrite: bool = False) -> list[Any]:
        """Write the images with their metadata, in the request's output format and compression;
        `path` is an image file (a single image; its suffix must be the format's) or a directory."""
        from .imageio import save_images

        req = self.request
        return save_images(
            self.images, path, overwrite=overwrite, output_format=req.output_format, compression=req.output_compression
        )


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the loaded model, for metadata."""

    name: str
    revision: str | None
    fingerprint: str
    origin: str | None = None  # hf, modelscope, local, tiny-random or single-files (loader.ModelSource.origin)
