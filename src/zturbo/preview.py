"""Live previews: the denoising latents as a small RGB picture, without running the VAE decoder.

A linear map from the latent channels to RGB, plus a bias, approximates what the decoder makes of
each latent pixel. No factor table ships with zturbo: `fit_projection` derives the map from the
loaded VAE itself, once per engine, by encoding a few smooth synthetic pictures, decoding their
latents, average-pooling the decoded RGB down to latent resolution and solving the least-squares
problem. Fitted on the decoder's own output for latents the encoder makes, the map follows that
VAE (a fine-tuned one too) rather than a published average.

On a GPU a preview is one small einsum, a conversion to bytes and one copy of h*w*3 bytes per row
to pinned host memory; `PreviewStream` hands each step's images over one step late, so the host
never waits for the GPU while the next step's kernels are still to be queued.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

PREVIEW_MAX_SIDE = 256  # longest side of a preview image, in pixels
PREVIEW_UPSCALE = 2  # latent pixels are shown this many image pixels wide, up to PREVIEW_MAX_SIDE
JPEG_QUALITY = 70
FIT_SIZE = 64  # side of the synthetic pictures the map is fitted on, in pixels
FIT_PICTURES = 8
# (step, steps, one preview per batch row): what `Engine.generate(on_preview=...)` calls.
PreviewCallback = Callable[[int, int, list["PILImage"]], None]

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


@dataclass(frozen=True)
class LatentProjection:
    """RGB in [-1, 1] (roughly) of scaled latents: rgb = weight @ latent + bias, per latent pixel."""

    weight: torch.Tensor  # (3, C) float32
    bias: torch.Tensor  # (3,) float32

    def to(self, device: torch.device) -> LatentProjection:
        if self.weight.device == device:
            return self
        return LatentProjection(self.weight.to(device), self.bias.to(device))

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, h, w) float32, on the latents' device."""
        return torch.einsum("bchw,rc->brhw", latents.float(), self.weight) + self.bias.view(1, 3, 1, 1)

    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> uint8 (B, h, w, 3) on the latents' device.

        The product is taken channels-last, so the bytes come out in image order with no transpose.
        """
        rgb = torch.addmm(
            self.bias * 127.5 + 127.5, latents.float().permute(0, 2, 3, 1).flatten(0, 2), self.weight.T * 127.5
        )
        return rgb.clamp_(0, 255).round_().to(torch.uint8).view(latents.shape[0], *latents.shape[2:], 3)


def fit_projection(vae: torch.nn.Module, pictures: torch.Tensor | None = None) -> LatentProjection:
    """The least-squares map from `vae`'s scaled latents to its decoder's RGB at latent resolution.

    pictures: (N, 3, H, W) float32 in [-1, 1] to fit on (default `fit_pictures()`). Runs where the
    VAE's weights are, with its plain (uncompiled) encoder and decoder: a compiled decoder would
    compile one more graph for this size.
    """
    from .pipeline import decode, encode_image, mode_latents

    pictures = fit_pictures() if pictures is None else pictures
    device = next(vae.parameters()).device
    with torch.inference_mode(), _eager(vae.encoder), _eager(vae.decoder):
        latents = mode_latents(encode_image(vae, pictures.to(device)))
        decoded = decode(vae, latents)
    factor = decoded.shape[-1] // latents.shape[-1]
    target = F.avg_pool2d(decoded, factor).permute(0, 2, 3, 1).reshape(-1, 3).cpu().double()
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).cpu().double()
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], dim=1)
    solution = torch.linalg.lstsq(inputs, target).solution.float()  # (C + 1, 3)
    return LatentProjection(solution[:-1].T.contiguous(), solution[-1].contiguous())


def fit_pictures(count: int = FIT_PICTURES, size: int = FIT_SIZE, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) float32 in [-1, 1]: smooth random colour fields with a few hard edges.

    Smooth fields give the decoder the slowly varying colours a preview mostly shows; the edges
    keep the fit honest where colours change within a latent pixel.
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    coarse = torch.rand((count, 3, 4, 4), generator=gen) * 2 - 1
    fields = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    blocks = torch.rand((count, 3, 2, 2), generator=gen) * 2 - 1
    edges = F.interpolate(blocks, size=(size, size), mode="nearest")
    mix = torch.linspace(0, 1, count).view(count, 1, 1, 1)  # from all smooth to all blocks
    return ((1 - mix) * fields + mix * edges).clamp(-1, 1)


@contextlib.contextmanager
def _eager(module: torch.nn.Module) -> Iterator[None]:
    """While inside, `module` runs its class's forward (accel.compile sets a compiled one on the
    instance)."""
    compiled = vars(module).pop("forward", None)
    try:
        yield
    finally:
        if compiled is not None:
            module.forward = compiled


def preview_images(pixels: torch.Tensor, max_side: int = PREVIEW_MAX_SIDE) -> list[PILImage]:
    """uint8 (B, h, w, 3) on the CPU -> one RGB image per row, longest side at most `max_side`."""
    from PIL import Image

    height, width = pixels.shape[1:3]
    scale = min(PREVIEW_UPSCALE, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    images = []
    for row in pixels.numpy():
        image = Image.fromarray(row, "RGB")
        images.append(image if image.size == size else image.resize(size, Image.Resampling.BILINEAR))
    return images


def jpeg_bytes(image: PILImage, quality: int = JPEG_QUALITY) -> bytes:
    """A preview as JPEG file bytes (a 256-pixel preview is a few kB)."""
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


class PreviewStream:
    """`pipeline.denoise`'s latent callback: each step's denoised estimate -> `deliver`'s images.

    On CUDA the step's uint8 pixels are copied to pinned host memory without waiting, and handed
    over at the next step (or at `flush`), by when the copy has long landed: the host never stalls
    the queue of GPU work. Elsewhere each step's images are handed over at once.
    """

    def __init__(self, projection: LatentProjection, deliver: PreviewCallback) -> None:
        self.projection = projection
        self.deliver = deliver
        self._pending: tuple[int, int, torch.Tensor, torch.cuda.Event | None] | None = None

    def __call__(self, step: int, steps: int, latents: torch.Tensor) -> None:
        # Moved once: a copy from pageable host memory each step would wait for the GPU's queue.
        self.projection = self.projection.to(latents.device)
        pixels = self.projection.pixels(latents)
        event = None
        if pixels.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pixels = host
        else:
            pixels = pixels.cpu()
        self.flush()
        self._pending = (step, steps, pixels, event)
        if event is None:
            self.flush()

    def flush(self) -> None:
        """Hand over the images still held (the last step's, on CUDA)."""
        if self._pending is None:
            return
        step, steps, pixels, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        self.deliver(step, steps, preview_images(pixels))
