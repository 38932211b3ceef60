"""CUDA graphs: the text encoder's (one replay instead of some 500 kernel launches per prompt) and
the transformer's per denoising step (`StepGraphs`, at the end of this module).

At prompt lengths the compiled Qwen3 encoder is launch-bound: its GPU work is a few milliseconds
(reading 8 GB of weights once), while launching 35 compiled layers costs the host about 40 ms
(H100 profile: 42 ms of GPU idle time in the encode stage). A CUDA graph per (batch,
padded length) replays all of it in one launch.

Prompts are padded on the right to a multiple of `BUCKET` tokens, so a handful of graphs serves
every prompt. With the padding on the right, causal attention alone keeps each real token from
seeing any padding (padding only ever follows it), so the graph runs with no attention mask: the
same causal kernel the encoder uses for a single unpadded prompt, and no mask construction in
transformers (which inspects the mask on the host, which a graph capture does not allow).

A graph replays the weights it was captured with at their addresses, so it is only used while
the encoder stays where it is: the engine hands it out under the resident memory plan only, and
the graphs are dropped whenever any weight's address or dtype differs from the capture's.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..pipeline import Step, StepControl, transformer_step

log = logging.getLogger("zturbo")

BUCKET = 64  # prompts are padded to a multiple of this many tokens: 8 lengths up to 512
REPLAY_TOLERANCE = 1e-2  # relative; the same kernels replayed agree exactly (measured: 0.0)
MAX_GRAPH_TOKENS = 2048  # batch × padded length above which the encoder runs without a graph:
# a long batch is not launch-bound, and a graph's private memory grows with its shapes


def bucket_length(tokens: int, max_tokens: int) -> int:
    """The padded length for `tokens`: the next multiple of BUCKET, at most `max_tokens`."""
    return max(tokens, min(math.ceil(tokens / BUCKET) * BUCKET, max_tokens))


def right_padded(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and bool mask -> (B, length): each row's real tokens first, then `pad_id`."""
    batch = ids.shape[0]
    out_ids = torch.full((batch, length), pad_id, dtype=ids.dtype)
    out_mask = torch.zeros((batch, length), dtype=torch.bool)
    for row in range(batch):
        real = ids[row][mask[row]]
        out_ids[row, : len(real)] = real
        out_mask[row, : len(real)] = True
    return out_ids, out_mask


def encoder_forward(text_encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The encoder's last_hidden_state for right-padded `ids`: what a graph captures. The ready
    mask mapping (None for every layer type) makes each layer attend causally, with no mask."""
    layer_types = getattr(text_encoder.config, "layer_types", None) or ["full_attention"]
    mapping = dict.fromkeys(layer_types)
    return text_encoder(input_ids=ids, attention_mask=mapping, use_cache=False).last_hidden_state


@dataclass
class Captured:
    """One graph and its static tensors: the ids copied in before each replay, the output read after."""

    replay: Callable[[], None]
    ids: torch.Tensor
    out: torch.Tensor
    pool: Any = None  # the graph's memory pool, shared with the next capture


def capture(text_encoder: torch.nn.Module, shape: tuple[int, int], pool: Any) -> Captured:
    """Warm up `encoder_forward` at `shape` on a side stream (compiling and tuning happen outside
    the capture), then capture it into a CUDA graph that shares `pool`."""
    device = next(text_encoder.parameters()).device
    ids = torch.zeros(shape, dtype=torch.long, device=device)
    graph, (out,) = capture_checked(device, lambda: [encoder_forward(text_encoder, ids)], pool, "the encoder")
    return Captured(replayer(graph, device), ids, out, graph.pool())


def capture_checked(
    device: torch.device, run: Callable[[], list[torch.Tensor]], pool: Any, what: str
) -> tuple[Any, list[torch.Tensor]]:
    """`run` once on a side stream (compiling and tuning happen outside the capture), then
    captured into a CUDA graph sharing `pool`; returns the graph and its static outputs.

    A capture that missed work (kernels launched on another device's stream, say) would replay an
    incomplete graph without any error: one replay, into cleared outputs, is checked against the
    side-stream run, and a difference over REPLAY_TOLERANCE raises.
    """
    with torch.cuda.device(device):  # capture and replay run on the current device's streams
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            expected = run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = run()
        for o in out:
            o.zero_()
        graph.replay()
        for got, want in zip(out, expected, strict=True):
            difference = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
            if not difference <= REPLAY_TOLERANCE:
                raise RuntimeError(f"the captured graph differs from {what} by {difference:.1e} (relative)")
    return graph, out


def replayer(graph: Any, device: torch.device) -> Callable[[], None]:
    def replay() -> None:
        with torch.cuda.device(device):
            graph.replay()

    return replay


class EncoderGraphs:
    """The text encoder's graphs, captured on first use of each (batch, padded length)."""

    def __init__(self, capture: Callable[[torch.nn.Module, tuple[int, int], Any], Captured] = capture) -> None:
        self._capture = capture
        self._graphs: dict[tuple[int, int], Captured] = {}
        self._pool: Any = None
        self._weights: tuple[tuple[int, torch.dtype], ...] | None = None
        self.failed: str | None = None  # why capturing failed; graphs are off from then on

    def __len__(self) -> int:
        return len(self._graphs)

    def capture_all(self, text_encoder: torch.nn.Module, max_tokens: int, batch: int = 1) -> None:
        """Capture every padded length for `batch` now (at warm-up), so no user prompt waits for one.
        Call it where `encode` is called (the encoder's layer count as it runs for embeddings)."""
        for length in range(BUCKET, max_tokens + 1, BUCKET):
            ids = torch.zeros((batch, length), dtype=torch.long)
            self.encode(text_encoder, ids, torch.ones_like(ids, dtype=torch.bool), 0, max_tokens)

    def encode(
        self, text_encoder: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, pad_id: int, max_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden states (B, L', D) on the device, the padded (B, L') mask) through a graph, or
        None where none applies: capturing failed before, the batch is too long, or the encoder is
        not one whose attention is causal without a mask (see `maskless_causal`)."""
        length = bucket_length(ids.shape[1], max_tokens)
        if self.failed or ids.shape[0] * length > MAX_GRAPH_TOKENS or not maskless_causal(text_encoder):
            return None
        weights = tuple((p.data_ptr(), p.dtype) for p in text_encoder.parameters())
        if weights != self._weights:  # moved or cast since the capture: its addresses are stale
            self._graphs.clear()
            self._pool, self._weights = None, weights
        ids, mask = right_padded(ids, mask, length, pad_id)
        key = (ids.shape[0], length)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(text_encoder, key, self._pool)
            except Exception as e:  # a capture this stack cannot make: the encoder runs as before
                self.failed = f"{type(e).__name__}: {e}"[:300]
                log.warning("text encoder: CUDA graph capture failed (%s); running it without graphs", self.failed)
                self._graphs.clear()
                return None
            self._graphs[key], self._pool = graph, graph.pool
        graph.ids.copy_(ids)
        graph.replay()
        # A copy: the next replay overwrites the graph's output.
        return graph.out.clone(), mask


def maskless_causal(text_encoder: torch.nn.Module) -> bool:
    """Whether the encoder attends causally when given no mask: SDPA attention (transformers'
    eager attention would attend to every token) and no sliding-window layers (their window is
    a mask)."""
    sdpa = getattr(text_encoder.config, "_attn_implementation", None) == "sdpa"
    return sdpa and not getattr(text_encoder, "has_sliding_layers", False)


# ---------------------------------------------------------------------------------------------
# The transformer's denoising step
#
# The compiled transformer runs 34 blocks per step, each a compiled call whose guards and ~20
# kernel launches cost the host time. Where the GPU's share of a step is small the host sets the
# pace: at 512² an fp8 image took 0.31–0.32 s step by step and 0.17 s replayed from one graph per
# step, bf16 0.24–0.28 s against 0.21 s; at 1024² the GPU sets the pace and a graph saves a few
# milliseconds (H100, docs/performance.md). A replay runs the kernels the capture
# recorded, so the latents are identical (0.0 relative difference in every case measured).
#
# A graph is keyed by its inputs' shapes: the latent size and each caption's length. A shape is
# captured the second time a request brings it, so a prompt length seen once never pays for a
# capture (one extra transformer pass). The graphs share one private memory pool, about one
# pass's activations (0.18 GiB at 512², 0.50 GiB at 1024²), which stays reserved while they
# live; the engine uses them only where the device has room for it (`Engine._step_graphs`).

STEP_SIGHTINGS = 2  # requests that bring a shape before it is captured
MAX_STEP_GRAPHS = 8  # the least recently used graph is dropped beyond this

StepKey = tuple[Any, ...]


@dataclass
class StepCaptured:
    """One step's graph: static inputs copied in before each replay, static outputs read after."""

    replay: Callable[[], None]
    x: list[torch.Tensor]
    t: torch.Tensor
    embeds: list[torch.Tensor]
    control: StepControl | None  # the control context per row and the scale, or None
    out: list[torch.Tensor]
    pool: Any = None

    def inputs(self) -> list[torch.Tensor]:
        """Every static input, in the order `step_inputs` lists a call's."""
        return step_inputs(self.x, self.t, self.embeds, self.control)


def step_inputs(
    x: Sequence[torch.Tensor], t: torch.Tensor, embeds: Sequence[torch.Tensor], control: StepControl | None
) -> list[torch.Tensor]:
    context, scale = control if control is not None else ([], None)
    return [*x, t, *embeds, *context, *([scale] if scale is not None else [])]


def step_key(
    x: Sequence[torch.Tensor], t: torch.Tensor, embeds: Sequence[torch.Tensor], control: StepControl | None = None
) -> StepKey:
    """What a step graph is captured for: the shapes (a control input's context shapes, or None);
    never a value, so a new scale or control image replays the same graph."""
    return (
        tuple((tuple(i.shape), i.dtype, i.device) for i in x),
        tuple(t.shape),
        tuple((tuple(e.shape), e.dtype) for e in embeds),
        None if control is None else tuple((tuple(c.shape), c.dtype) for c in control[0]),
    )


def capture_step(
    transformer: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    x: list[torch.Tensor],
    t: torch.Tensor,
    embeds: list[torch.Tensor],
    control: StepControl | None,
    pool: Any,
) -> StepCaptured:
    """`pipeline.transformer_step` captured into a graph sharing `pool`, checked as the encoder's
    are (`capture_checked`)."""
    device = x[0].device
    sx, st, se = [i.clone() for i in x], t.clone(), [e.clone() for e in embeds]
    sc = None if control is None else ([c.clone() for c in control[0]], control[1].clone())

    def run() -> list[torch.Tensor]:
        return transformer_step(transformer, controlnet, sx, st, se, sc)

    graph, out = capture_checked(device, run, pool, "the transformer")
    return StepCaptured(replayer(graph, device), sx, st, se, sc, out, graph.pool())


def _weights(module: torch.nn.Module | None) -> tuple[tuple[int, torch.dtype], ...] | None:
    return None if module is None else tuple((p.data_ptr(), p.dtype) for p in module.parameters())


class StepGraphs:
    """The transformer's step graphs (a ControlNet's too, where a step runs one). Per request,
    `bind` gives the `pipeline.Step` that `denoise` calls each step."""

    def __init__(self, capture: Callable[..., StepCaptured] = capture_step) -> None:
        self._capture = capture
        self._graphs: OrderedDict[StepKey, StepCaptured] = OrderedDict()
        self._sightings: Counter[StepKey] = Counter()
        self._pool: Any = None
        self._weights: dict[str, tuple[tuple[int, torch.dtype], ...] | None] = {}
        self.failed: str | None = None  # why capturing failed or graphs were switched off
        # Why capturing a step with a control input failed: those steps run plain from then on,
        # the others keep their graphs (the ControlNet's forward is diffusers', not ours to change).
        self.control_failed: str | None = None
        self.captures = 0  # graphs captured so far (the LoRA bench checks a set change adds none)

    def __len__(self) -> int:
        return len(self._graphs)

    def disable(self, why: str) -> None:
        """No graphs from now on (the compiled kernels they replay were reverted, say); frees them."""
        self.failed = why
        self.clear()

    def clear(self) -> None:
        self._graphs.clear()
        self._pool = None

    def bind(
        self, transformer: torch.nn.Module, room: Callable[[int], bool], controlnet: torch.nn.Module | None = None
    ) -> Step:
        """The step call for one request. `room(caption_tokens)` says whether the device can hold
        one more pass's activations for a new capture now; `controlnet` runs on steps given a
        control input. Graphs whose weights moved or were cast since their capture are dropped."""
        for name, module in (("transformer", transformer), ("controlnet", controlnet)):
            weights = _weights(module)
            if weights is not None and weights != self._weights.get(name):
                self.clear()  # their addresses are stale
                self._weights[name] = weights
        seen: set[StepKey] = set()

        def step(
            x: list[torch.Tensor], t: torch.Tensor, embeds: list[torch.Tensor], control: StepControl | None
        ) -> list[torch.Tensor]:
            key = step_key(x, t, embeds, control)
            if key not in seen:
                seen.add(key)
                self._sightings[key] += 1
            return self._run((transformer, controlnet), key, (x, t, embeds, control), room)

        return step

    def _run(
        self,
        models: tuple[torch.nn.Module, torch.nn.Module | None],
        key: StepKey,
        inputs: tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], StepControl | None],
        room: Callable[[int], bool],
    ) -> list[torch.Tensor]:
        graph = self._graphs.get(key)
        if graph is None:
            embeds, controlled = inputs[2], inputs[3] is not None
            off = self.failed or (controlled and self.control_failed)
            if off or self._sightings[key] < STEP_SIGHTINGS or not room(max(e.shape[0] for e in embeds)):
                return transformer_step(*models, *inputs)
            try:
                graph = self._capture(*models, *inputs, self._pool)
            except Exception as e:  # a capture this stack cannot make: steps run as before
                self._capture_failed(f"{type(e).__name__}: {e}"[:300], controlled)
                return transformer_step(*models, *inputs)
            self._graphs[key], self._pool = graph, graph.pool
            self.captures += 1
            while len(self._graphs) > MAX_STEP_GRAPHS:
                self._graphs.popitem(last=False)
            return graph.out  # the capture's checked replay ran on exactly these inputs
        self._graphs.move_to_end(key)
        for static, value in zip(graph.inputs(), step_inputs(*inputs), strict=True):
            static.copy_(value)
        graph.replay()
        return graph.out

    def _capture_failed(self, why: str, controlled: bool) -> None:
        if controlled:
            self.control_failed = why
            log.warning("transformer: CUDA graph capture with the ControlNet failed (%s); its steps run without", why)
            return
        self.disable(why)
        log.warning("transformer: CUDA graph capture failed (%s); running steps without graphs", why)
