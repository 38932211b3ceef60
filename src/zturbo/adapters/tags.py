"""A1111's extra-network tags (`<lora:NAME:WEIGHT>`): the one grammar and reading of them.

Every door that meets them reads them here: the A1111 routes' prompts (`serving.a1111`), and an
image's A1111 text (`imageio.parse_a1111`, for `generate --from`, `show` and png-info). What a door
does with what zturbo cannot apply is its own policy: the routes refuse it before any work, a
text read back from an image keeps its other settings and names it in a warning.

A1111 (modules/extra_networks.py) takes every `<NETWORK:ARGS>` out of the prompt, `ARGS` split at
`:`, an item with one `=` named and the others positional. Its LoRA network (extensions-builtin/
Lora/extra_networks_lora.py) reads `NAME[:TE[:UNET[:DYN]]]` and the named `te=`, `unet=`, `dyn=`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..request import FINITE_TEXT
from .library import SUFFIX

# A1111's `<(\w+):([^>]+)>`, with the one space or tab before a tag that A1111's writer and
# zturbo's put there, so that a prompt read back from an image runs as the prompt that made it.
# `[^>]+`, as A1111's: `<lora:>` is no tag (it stays text), and a tag ends at the first `>`.
TAG = re.compile(r"[ \t]?<(\w+):([^>]+)>")
LORA_NETWORKS = frozenset({"lora", "lyco"})  # A1111 reads `lyco` as another name of `lora`
# A1111's own networks that zturbo lacks; any other network A1111 skips as unknown.
UNAVAILABLE_NETWORKS = {"hypernet": "hypernetworks are not available in zturbo"}
UNKNOWN_NETWORK = "not an extra network A1111 or zturbo has (A1111 skips it)"
LORA_ARGS = "<lora:NAME>, <lora:NAME:WEIGHT>, <lora:NAME:TE:UNET> or te=/unet= weights"
TE_WEIGHT = "a text-encoder weight has no effect (zturbo's LoRAs change the transformer only)"
DYN = "dyn (A1111's reduced LoRA rank) is not available in zturbo"
_NAMED = ("te", "unet", "dyn")
_NOT_IN_NAMES = re.compile("[:<>]")  # what ends a tag's name (`:`) or the tag itself


class TagError(ValueError):
    """A LoRA tag that cannot be read; the message names the tag and what to write instead."""


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag: the LoRA it names and the weight the transformer takes."""

    text: str  # as written, for the reports and the errors
    name: str
    weight: float  # A1111's UNet weight: the transformer's here
    te: float | None = None  # a text-encoder weight other than the UNet's (it has no effect here)
    # Arguments that change the image in A1111 but that zturbo cannot apply (dyn, extensions' keys).
    unapplied: tuple[str, ...] = ()
    sha256: str | None = None  # the hash an image's `Lora hashes` records for it


@dataclass(frozen=True)
class Tags:
    """A prompt's extra-network tags, read as A1111 reads them."""

    prompt: str  # the text the encoder sees: every tag taken out, as A1111 takes them out
    loras: tuple[LoraTag, ...] = ()
    others: tuple[tuple[str, str], ...] = ()  # (network in lower case, tag as written) of the other tags


def read_tags(prompt: str) -> Tags:
    """Every tag of `prompt`; raises TagError for a LoRA tag without a name or with a weight that is
    not a number (A1111 fails on those too). Networks are matched in any case (`<LoRA:x>`)."""
    loras, others = [], []
    for match in TAG.finditer(prompt):
        text, network = match.group(0).lstrip(" \t"), match.group(1).lower()
        if network in LORA_NETWORKS:
            loras.append(lora_tag(text, match.group(2)))
        else:
            others.append((network, text))
    if not loras and not others:
        return Tags(prompt)
    return Tags(TAG.sub("", prompt), tuple(loras), tuple(others))


def lora_tag(text: str, args: str) -> LoraTag:
    """One LoRA tag's arguments: `NAME[:TE[:UNET[:DYN]]]` or named `te=`, `unet=`, `dyn=`; the UNet
    weight is the text encoder's unless given, and 1 when neither is. A1111 reads no positional
    argument after DYN (they change nothing); a key it does not know is an extension's."""
    name, *items = (item.strip() for item in args.split(":"))
    if not name:
        raise TagError(f"tag {text} has no LoRA name; write {LORA_ARGS}")
    named = {key.strip(): value.strip() for key, eq, value in (i.partition("=") for i in items) if eq}
    positional = [item for item in items if "=" not in item]
    given = dict(zip(_NAMED, positional, strict=False)) | named
    te = _weight(text, given.get("te", "1"))
    unet = te if given.get("unet") is None else _weight(text, given["unet"])
    unapplied = [DYN] if "dyn" in given else []
    unapplied += [f"{key}= is not an argument of A1111's LoRA tags" for key in named if key not in _NAMED]
    return LoraTag(text, name, unet, te if te != unet else None, tuple(unapplied))


def _weight(text: str, value: str) -> float:
    if not FINITE_TEXT.fullmatch(value) or not math.isfinite(float(value)):
        raise TagError(f"tag {text}: the weight {value!r} is not a number; write {LORA_ARGS}")
    return float(value)


def lora_tag_name(name: str) -> str:
    """A LoRA's name in A1111 text (`<lora:NAME:W>`, `Lora hashes`): its file name without the
    directory and `.safetensors`, as A1111 and Civitai name them, less the characters a tag cannot
    hold (`:` ends the name, `<` and `>` the tag), so the name reads back as written."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = base[: -len(SUFFIX)] if base.lower().endswith(SUFFIX) else base
    return _NOT_IN_NAMES.sub("", base)
