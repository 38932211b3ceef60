"""Executing a memory layout: where each component's weights live, and moving them there.

`Placement` keeps an engine's modules where its `Layout` wants them, streaming layers and blocks
through the device with `memory.stream`; `memory.plan` decides the layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from ..accel.fuse import BLOCK_LISTS, CONTROL_BLOCK_LISTS, controlnet_blocks, transformer_blocks, unfuse_projections
from ..control.model import own_modules
from .plan import SPLIT_CFG, STREAMED_TE, UNUSED_TEXT_LAYERS, VAE_TILE, Layout, streamed_positions

CPU = torch.device("cpu")
# Components whose weights live on the CPU between uses, per plan (streamed ones included).
OFFLOADED = {
    "resident": (),
    "te-offload": ("text_encoder",),
    "model-offload": ("text_encoder", "transformer"),
    "block-offload": ("text_encoder", "transformer"),
    "sequential": ("text_encoder", "transformer"),
}
# te-offload: the last transformer blocks whose memory text-encoder layers borrow while encoding.
# Their weights come back during the first step, overlapping the blocks before them: 8 blocks
# (2.7 GB, ~50 ms at 55 GB/s) behind 26 blocks' compute (~70 ms at 1024² on an H100).
SHARED_BLOCKS = 8


def homes(plan: str, device: torch.device) -> dict[str, torch.device]:
    """Where the loader puts each component's weights for `plan` (a ControlNet's: the transformer's)."""
    where = {c: CPU if c in OFFLOADED[plan] else device for c in ("transformer", "text_encoder", "vae")}
    return where | {"controlnet": where["transformer"]}


def set_vae_tiling(vae: torch.nn.Module, on: bool, tile: int = VAE_TILE) -> None:
    """diffusers' tiled decode with `tile`-pixel tiles (25 % overlap, blended).

    Above one tile the decoder then holds one tile's activations instead of the whole image's.
    (`pipeline.decode` decodes one image at a time, tiled or not.)
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // factor
    vae.use_tiling = on


class Placement:
    """Keeps the engine's modules where its plan wants them.

    resident: all on the device. te-offload: the text encoder's layers stream through the device
    (memory.stream) and its token embeddings are looked up on the CPU. model-offload: the text
    encoder and transformer take turns on the device (`stage()` moves them). block-offload: as
    te-offload, and the transformer's first blocks stream too, the last `resident_blocks` stay.
    sequential: diffusers' leaf-level group offloading with a prefetching CUDA stream. The VAE
    (0.2 GB) always stays on the device. A ControlNet goes where the transformer goes (its blocks
    stream through slots of their own under block-offload); only its own modules are ever moved,
    never the transformer's embedders and refiners it shares.
    """

    def __init__(self, components: Any, device: torch.device, layout: Layout | None = None) -> None:
        self.components = components
        self.device = device
        self.layout = Layout()
        self.streamers: dict[str, Any] = {}
        self._embed_hooks: list[Any] = []
        self.change(layout or Layout())

    @property
    def plan(self) -> str:
        return self.layout.plan

    @property
    def resident_blocks(self) -> int:
        return self.layout.resident_blocks

    @property
    def resident_layers(self) -> int:
        return self.layout.resident_layers

    @property
    def shared_layers(self) -> int:
        """te-offload: the text-encoder layers that take turns with transformer blocks."""
        arena = self.streamers.get("arena")
        return len(arena.modules["text_encoder"]) if arena else 0

    def describe(self, split_cfg: bool | None = None) -> str:
        """The plan, what it keeps resident, and whether CFG runs in two passes (`split_cfg`: a
        request's own choice, else the layout's)."""
        split = self.layout.split_cfg if split_cfg is None else split_cfg
        return self._placed() + (f" + {SPLIT_CFG}" if split else "")

    def _placed(self) -> str:
        if self.plan == "block-offload":
            total = sum(1 for _ in transformer_blocks(self.components.transformer))
            return f"block-offload ({self.resident_blocks}/{total} blocks resident)"
        if self.plan == "te-offload" and (self.resident_layers or self.shared_layers):
            total = len(self.components.text_encoder.layers) - UNUSED_TEXT_LAYERS
            arena = self.streamers.get("arena")
            lenders = len(arena.modules["transformer"]) if arena else 0
            shared = f", {self.shared_layers} sharing memory with {lenders} blocks" if arena else ""
            return f"te-offload ({self.resident_layers}/{total} text-encoder layers resident{shared})"
        return self.plan

    def change(self, layout: Layout) -> None:
        """Move to `layout`'s plan; plans only get leaner, never back (group offloading is not
        undone). Resident blocks count under block-offload only, resident layers where the text
        encoder streams.

        Outside inference mode, even when a request runs out of memory mid-generate: moving a
        quantized weight (a tensor subclass) swaps the Parameter whole, which an inference tensor
        refuses, and the streamers' buffers outlive the request."""
        with torch.inference_mode(False):
            self._change(layout)

    def _change(self, layout: Layout) -> None:
        plan, c = layout.plan, self.components
        self._stop_streaming()
        if "transformer" in OFFLOADED[plan]:
            unfuse_projections(c.transformer)  # fused tensors would stay behind on the device
            unfuse_projections(None, self._control_blocks())
            self._move_controlnet(CPU)
        for name in OFFLOADED[plan]:
            torch.nn.Module.to(getattr(c, name), CPU)
        layout = replace(
            layout,
            resident_blocks=layout.resident_blocks if plan == "block-offload" else 0,
            resident_layers=layout.resident_layers if plan in STREAMED_TE else 0,
        )
        if plan in STREAMED_TE:
            self._stream_text_encoder(layout.resident_layers, share=plan == "te-offload")
        if plan == "block-offload":
            self._stream_transformer(layout.resident_blocks)
            self._stream_controlnet()
        if plan == "sequential":
            self._offload_leaves()
        self.layout = layout

    def split_cfg(self) -> None:
        """CFG's halves in two passes from now on (`Layout.split_cfg`): only the denoise batch
        changes, so no weight moves and the streamers stay."""
        self.layout = replace(self.layout, split_cfg=True)

    @property
    def controlnet(self) -> torch.nn.Module | None:
        """The ControlNet's model (diffusers' ZImageControlNetModel), if the engine has one."""
        loaded = getattr(self.components, "controlnet", None)
        return None if loaded is None else loaded.model

    def _control_blocks(self) -> list[torch.nn.Module]:
        return [] if self.controlnet is None else list(controlnet_blocks(self.controlnet))

    def _move_controlnet(self, device: torch.device) -> None:
        if self.controlnet is not None:
            for _, module in own_modules(self.controlnet):
                torch.nn.Module.to(module, device)

    def _stream_controlnet(self) -> None:
        """block-offload: the ControlNet's blocks stream through two slots of their own; the rest
        of what it owns (its patch embedder) stays on the device."""
        from .stream import BlockStreamer

        if self.controlnet is None:
            return
        for name, module in own_modules(self.controlnet):
            torch.nn.Module.to(module, CPU if name in CONTROL_BLOCK_LISTS else self.device)
        self.streamers["controlnet"] = BlockStreamer(self._control_blocks(), self.device)

    def _offload_leaves(self) -> None:
        from diffusers.hooks import apply_group_offloading

        c = self.components
        # The ControlNet's own blocks and patch embedder each as a group root: offloading the model
        # whole would hook the transformer's modules it shares a second time.
        embedders = [] if self.controlnet is None else list(self.controlnet.control_all_x_embedder.values())
        for module in (c.transformer, c.text_encoder, *self._control_blocks(), *embedders):
            apply_group_offloading(
                module,
                onload_device=self.device,
                offload_device=CPU,
                offload_type="leaf_level",
                use_stream=self.device.type == "cuda",
            )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Streamed weights back in their modules (on the CPU) for the body, e.g. a dtype cast."""
        if not self.streamers:
            yield
            return
        with torch.inference_mode(False):  # as in `change`
            self._stop_streaming()
        yield
        self.change(self.layout)

    def weight_homes(self, module: torch.nn.Module, name: str) -> list[torch.Tensor]:
        """Every tensor holding the value of `module`'s parameter `name`, for an in-place edit:
        a streamed block's host copy (its device slot is refilled from it), else the parameter
        itself, plus group offloading's pinned copy under the sequential plan."""
        for streamer in self.streamers.values():
            view = streamer.host_view(module, name)
            if view is not None:
                return [view]
        param = getattr(module, name)
        homes = [param.data]
        offloaded = _group_offload_copy(module, param)
        if offloaded is not None and offloaded.data_ptr() != param.data_ptr():
            homes.append(offloaded)
        return homes

    def weights_changed(self) -> None:
        """After in-place edits through `weight_homes`: streamed copies are refreshed before use."""
        for streamer in self.streamers.values():
            streamer.invalidate()

    def stage(self, name: str) -> None:
        """Before `name` (encode, image, denoise, decode): under model-offload, only its module on
        the device (none but the VAE for image and decode); under te-offload, the shared memory
        starts filling for what comes next."""
        arena = self.streamers.get("arena")
        if arena is not None and name in ("decode", "denoise"):
            # After denoising, the shared blocks are done until the next image: the encoder's
            # layers come in during the decode, in case the next prompt is new.
            arena.prefetch("text_encoder" if name == "decode" else "transformer")
        if self.plan != "model-offload":
            return
        with torch.inference_mode(False):  # a quantized weight is swapped whole (see `change`)
            self._take_turns(name)

    def _take_turns(self, name: str) -> None:
        """model-offload: only the module stage `name` runs on the device."""
        c = self.components
        wanted = {"encode": c.text_encoder, "denoise": c.transformer}.get(name)
        for module in (c.text_encoder, c.transformer):
            if module is not wanted:
                torch.nn.Module.to(module, CPU)
        if wanted is not c.transformer:
            self._move_controlnet(CPU)
        if wanted is not None:
            torch.nn.Module.to(wanted, self.device)
        if wanted is c.transformer:
            self._move_controlnet(self.device)

    def _stream_text_encoder(self, resident_layers: int, share: bool = False) -> None:
        from .stream import BlockStreamer

        te = self.components.text_encoder
        _move_all_but(te, ("embed_tokens", "layers"), self.device)  # the small rest: final norm, rotary tables
        embed = te.embed_tokens
        torch.nn.Module.to(embed, CPU)  # 0.8 GB for a lookup of a few hundred rows: done on the CPU
        self._embed_hooks = [
            embed.register_forward_pre_hook(lambda _m, args: tuple(a.to(CPU) for a in args)),
            embed.register_forward_hook(lambda _m, _a, out: out.to(self.device, non_blocking=True)),
        ]
        layers = list(te.layers)
        for layer in layers[-UNUSED_TEXT_LAYERS:]:
            torch.nn.Module.to(layer, CPU)  # never runs: stays where no copy reaches it
        layers = layers[:-UNUSED_TEXT_LAYERS]
        chosen = set(streamed_positions(len(layers), len(layers) - resident_layers))
        for i, layer in enumerate(layers):
            torch.nn.Module.to(layer, CPU if i in chosen else self.device)
        streamed = [x for i, x in enumerate(layers) if i in chosen]
        if share:
            streamed = self._share_transformer_memory(streamed)
        self.streamers["text_encoder"] = BlockStreamer(streamed, self.device)

    def _share_transformer_memory(self, streamed: list[torch.nn.Module]) -> list[torch.nn.Module]:
        """Give the last SHARED_BLOCKS transformer blocks' memory to as many of the `streamed`
        text-encoder layers (the last ones) as fit in it, and return the layers still streamed.

        A new prompt then copies fewer layers while it waits: the shared layers come in during the
        previous image's decode, the blocks return during the first step (memory.stream.SharedArena).
        """
        from .stream import SharedArena, packed_size, streamable

        blocks = list(self.components.transformer.layers)[-SHARED_BLOCKS:]
        if not streamed or not blocks or not all(streamable(b) for b in blocks):
            return streamed  # a tensor memory.stream cannot pack (a sparse one)
        room = sum(packed_size(b) for b in blocks)
        shared: list[torch.nn.Module] = []
        for layer in reversed(streamed):
            room -= packed_size(layer)
            if room < 0:
                break
            shared.insert(0, layer)
        if not shared:
            return streamed
        unfuse_projections(self.components.transformer, blocks)
        for block in blocks:
            torch.nn.Module.to(block, CPU)  # free their device memory before the arena takes it
        self.streamers["arena"] = SharedArena({"transformer": blocks, "text_encoder": shared}, self.device)
        return [layer for layer in streamed if all(layer is not x for x in shared)]

    def _stream_transformer(self, resident_blocks: int) -> None:
        from .stream import BlockStreamer

        transformer = self.components.transformer
        blocks = list(transformer_blocks(transformer))
        if not 0 <= resident_blocks < len(blocks):
            raise ValueError(f"resident_blocks {resident_blocks} is not in 0..{len(blocks) - 1}")
        _move_all_but(transformer, BLOCK_LISTS, self.device)  # embedders, final layer, pad tokens
        chosen = set(streamed_positions(len(blocks), len(blocks) - resident_blocks))
        # Already unfused: change() unfuses the whole transformer for every plan that offloads it.
        streamed = [b for i, b in enumerate(blocks) if i in chosen]
        for i, block in enumerate(blocks):
            torch.nn.Module.to(block, CPU if i in chosen else self.device)
        self.streamers["transformer"] = BlockStreamer(streamed, self.device)

    def _stop_streaming(self) -> None:
        for streamer in self.streamers.values():
            streamer.remove()
        self.streamers.clear()
        for hook in self._embed_hooks:
            hook.remove()
        self._embed_hooks = []


def _group_offload_copy(module: torch.nn.Module, param: torch.Tensor) -> torch.Tensor | None:
    """The pinned CPU copy diffusers' group offloading (with streams) restores `param` from after
    each use, if `module` is offloaded that way: edits must reach it too."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook("group_offloading") if registry is not None else None
    group = getattr(hook, "group", None)
    copies = getattr(group, "cpu_param_dict", None) or {}
    return copies.get(param)


def _move_all_but(module: torch.nn.Module, skip: tuple[str, ...], device: torch.device) -> None:
    """Move `module`'s own tensors and its children but those named in `skip` (left where they are)."""
    for name, child in module.named_children():
        if name not in skip:
            torch.nn.Module.to(child, device)
    for param in module._parameters.values():
        if param is not None:
            param.data = param.data.to(device)
    for name, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[name] = buffer.to(device)
