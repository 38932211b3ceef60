"""PNG output: metadata (a `zturbo` JSON chunk and an A1111 `parameters` chunk), atomic writes."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequestError, OutputExistsError

if TYPE_CHECKING:
    from .request import Field, GenerateRequest
    from .result import GeneratedImage, ModelInfo

METADATA_KEY = "zturbo"
A1111_KEY = "parameters"
DEFAULT_OUTPUT_DIR = "outputs"
LORA_SUFFIX = ".safetensors"
LORA_HASHES = "Lora hashes"  # A1111's field: `"name: 0123456789, ..."`
SHORT_HASH = 10  # hex digits of a sha256 in A1111's and Civitai's texts (AutoV2)
CONTROLNET_UNIT = "ControlNet 0"  # sd-webui-controlnet's field for its first unit


def build_metadata(
    req: GenerateRequest,
    prompt: str,
    negative_prompt: str,
    seed: int,
    model: ModelInfo,
    runtime: dict[str, Any],
    variation_seed: int | None = None,
) -> dict[str, Any]:
    """Every parameter that shaped one image; `runtime` is `Engine.runtime()` (dtypes, guard, quantize, compile)."""
    from .version import __version__

    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": req.steps,
        "guidance_scale": req.guidance_scale,
        "width": req.width,
        "height": req.height,
        # Recorded even when off, so reading a PNG back never has to guess a default.
        "variation_seed": variation_seed,
        "variation_strength": req.variation_strength if variation_seed is not None else 0.0,
        "variety": req.variety,
        "variety_until": req.variety_until,
        "sampler": "flow_match_euler",
        "model": model.name,
        "model_revision": model.revision,
        "model_fingerprint": model.fingerprint,
        # The input images by sha256 and their settings ({} for text-to-image); the engine sets
        # the ControlNet's identity when the request used one.
        "inputs": req.inputs.to_dict(),
        "controlnet": None,
        **runtime,
        "zturbo_version": __version__,
    }


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The A1111 `parameters` text: prompt, negative prompt line, then `Key: value` pairs (the
    request table's A1111 labels)."""
    from .request import FIELD

    loras = meta.get("loras") or ()
    fields = {
        FIELD["steps"].a1111: meta["steps"],
        "Sampler": "Euler",
        FIELD["guidance_scale"].a1111: meta["guidance_scale"],
        FIELD["seed"].a1111: meta["seed"],
        "Size": f"{meta['width']}x{meta['height']}",
        **_a1111_noise_fields(meta),
        **_a1111_input_fields(meta),
        "Model hash": (meta.get("model_fingerprint") or "")[:10],
        "Model": meta["model"],
        **_a1111_lora_hashes(loras),
        "Version": f"zturbo {meta['zturbo_version']}",
    }
    # A1111 names a prompt's LoRAs in `<lora:NAME:WEIGHT>` tags and keeps them out of the encoder's text.
    text = meta["prompt"] + "".join(f" <lora:{lora_tag_name(x['name'])}:{_weight_text(x['weight'])}>" for x in loras)
    if meta.get("negative_prompt"):
        text += f"\n{FIELD['negative_prompt'].a1111}: {meta['negative_prompt']}"
    return text + "\n" + ", ".join(f"{k}: {_a1111_value(v)}" for k, v in fields.items())


def _a1111_noise_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """A1111's names for variation seeds; seed variety has none in A1111, so it gets its own."""
    from .request import FIELD

    names: tuple[str, ...] = ()
    if meta.get("variation_seed") is not None and meta.get("variation_strength"):
        names = ("variation_seed", "variation_strength")
    if meta.get("variety"):
        names += ("variety", "variety_until")
    return {FIELD[name].a1111: meta[name] for name in names}


def _a1111_input_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The input settings A1111 has names for: `Denoising strength`; `Mask blur` (A1111 always
    pastes the original back through the blurred mask, as zturbo's paste-back does, so it is
    written only with paste-back); and the ControlNet as sd-webui-controlnet writes a unit."""
    from .request import FIELD

    inputs = meta.get("inputs") or {}
    fields: dict[str, Any] = {}
    if inputs.get("strength") is not None:
        fields[FIELD["strength"].a1111] = inputs["strength"]
    if inputs.get("paste_back"):
        fields[FIELD["mask_blur"].a1111] = inputs.get("mask_blur", 0)
    if inputs.get("controlled"):
        fields[CONTROLNET_UNIT] = _controlnet_unit(inputs, meta.get("controlnet"))
    return fields


def _controlnet_unit(inputs: dict[str, Any], controlnet: dict[str, Any] | None) -> str:
    """`Module: canny, Model: NAME [HASH10], Weight: 0.75, Guidance Start: 0, Guidance End: 1`."""
    parts = [f"Module: {inputs.get('control_type') or 'none'}"]
    if controlnet:
        parts.append(f"Model: {controlnet_model_name(str(controlnet.get('name') or ''))} "
                     f"[{str(controlnet.get('sha256') or '')[:SHORT_HASH]}]")  # fmt: skip
    parts += [
        f"Weight: {_weight_text(inputs['control_scale'])}",
        f"Guidance Start: {_weight_text(inputs['control_start'])}",
        f"Guidance End: {_weight_text(inputs['control_end'])}",
    ]
    return ", ".join(parts)


def controlnet_model_name(name: str) -> str:
    """A ControlNet's name as A1111 shows a model: the file or repository name, without its
    folders, repository owner or `.safetensors`, and without the characters a unit's text uses."""
    base = re.split(r"[/\\:]", name)[-1]
    base = base[: -len(LORA_SUFFIX)] if base.lower().endswith(LORA_SUFFIX) else base
    return re.sub(r"[,\[\]\"]", "", base)


def lora_tag_name(name: str) -> str:
    """A LoRA's name in A1111 text (`<lora:NAME:W>`, `Lora hashes`): its file name without the
    directory and `.safetensors`, as A1111 and Civitai name them, less the characters a tag cannot
    hold (`:` ends the name, `<` and `>` the tag), so the name reads back as written."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = base[: -len(LORA_SUFFIX)] if base.lower().endswith(LORA_SUFFIX) else base
    return re.sub("[:<>]", "", base)


def _weight_text(weight: float) -> str:
    """A weight as A1111 writes it (`0.7`, `1`), with every digit needed to read the same float back."""
    text = repr(float(weight))
    return text.removesuffix(".0")


def _a1111_lora_hashes(loras: Sequence[dict[str, Any]]) -> dict[str, str]:
    """A1111's `Lora hashes` field: each tag name with the first 10 hex digits of the file's sha256."""
    if not loras:
        return {}
    pairs = (f"{_hash_name(lora_tag_name(x['name']))}: {x['sha256'][:SHORT_HASH]}" for x in loras)
    return {LORA_HASHES: ", ".join(pairs)}


def _hash_name(name: str) -> str:
    """A name as A1111 writes it in `Lora hashes`: without the field's separators."""
    return name.replace(":", "").replace(",", "")


def _a1111_value(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if ("," in text or ":" in text or "\n" in text) else text


def png_info(meta: dict[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
    info.add_text(A1111_KEY, a1111_parameters(meta))
    return info


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `zturbo` JSON of a PNG written by zturbo; raises InvalidRequestError for other files."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = im.text.get(METADATA_KEY) if hasattr(im, "text") else None
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidRequestError(f"{path} is not a readable image: {e}") from None
    if text is None:
        raise InvalidRequestError(f"{path} has no {METADATA_KEY!r} metadata chunk")
    return json.loads(text)


# Keys that describe the file rather than shape the image (or that zturbo writes with a fixed value).
_A1111_INFORMATIONAL = {"Model hash", "Model", "Version", "Sampler"}
_A1111_PAIR = re.compile(r'\s*([\w .\-/()]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> tuple[dict[str, Any], list[str]]:
    """An A1111 `parameters` text -> (generation parameters, names of fields that zturbo cannot use).

    Layout: prompt lines, an optional `Negative prompt:` line (and its continuation lines), then one
    line of `Key: value` pairs where values with commas are JSON-quoted.
    """
    lines = text.rstrip("\n").split("\n")
    if not (lines and _A1111_PAIR.match(lines[-1]) and "Steps:" in lines[-1]):
        raise InvalidRequestError("the 'parameters' text has no 'Steps:' line, so it is not A1111 parameters")
    settings = lines.pop()
    prompt_lines, negative_lines, target = [], [], None
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if target is not None else prompt_lines).append(line)
    from .request import parse_size

    prompt, tags = _lora_tags("\n".join(prompt_lines))
    params: dict[str, Any] = {"prompt": prompt, "negative_prompt": "\n".join(negative_lines)}
    ignored, hashes = [], ""
    for key, raw in _A1111_PAIR.findall(settings):
        key, value = key.strip(), raw.strip()
        if value.startswith('"'):
            value = json.loads(value)
        field = _a1111_field(key)
        if key == LORA_HASHES:
            hashes = value
        elif key == CONTROLNET_UNIT:
            params.update(_controlnet_params(value, ignored))
        elif key == "Size":
            params["width"], params["height"] = _a1111_number(key, value, parse_size)
        elif field is not None:
            params[field.name] = _a1111_number(key, value, field.from_text)
        elif key == "Sampler" and value not in ("Euler", "Euler a", "flow_match_euler"):
            ignored.append(f"Sampler ({value})")
        elif key not in _A1111_INFORMATIONAL:
            ignored.append(key)
    if "mask_blur" in params:
        params["paste_back"] = True  # A1111 pastes the original back through the blurred mask
    if tags:
        params["loras"] = _with_hashes(tags, hashes)
    elif hashes:
        ignored.append(LORA_HASHES)  # hashes of LoRAs the prompt does not use
    return params, ignored


# A unit's settings zturbo reads back, by sd-webui-controlnet's labels.
_CONTROLNET_LABELS = {"Weight": "control_scale", "Guidance Start": "control_start", "Guidance End": "control_end"}
_UNIT_PART = re.compile(r"(?:^|, )([A-Z][\w ]*): ")


def _controlnet_params(text: str, ignored: list[str]) -> dict[str, Any]:
    """A `ControlNet 0` unit's module (zturbo's control type, or none: the image used as given),
    weight and guidance range. A module zturbo does not have (another tool's preprocessor) is
    named in `ignored`; the control image is then used as given."""
    from .inputs.spec import CONTROL_TYPES
    from .request import FIELD

    starts = list(_UNIT_PART.finditer(text))
    ends = [m.start() for m in starts[1:]] + [len(text)]
    unit = {m.group(1): text[m.end() : end].strip() for m, end in zip(starts, ends, strict=True)}
    params: dict[str, Any] = {}
    module = unit.get("Module", "none")
    if module in CONTROL_TYPES:
        params["control_type"] = module
    elif module != "none":
        ignored.append(f"{CONTROLNET_UNIT} module ({module})")
    for label, name in _CONTROLNET_LABELS.items():
        if label in unit:
            params[name] = _a1111_number(f"{CONTROLNET_UNIT} {label}", unit[label], FIELD[name].from_text)
    return params


# A1111's extra-network tags; the space before one is the one its writer (and zturbo) puts there.
_LORA_TAG = re.compile(r"[ \t]?<(?:lora|lyco):([^<>]*)>", re.IGNORECASE)
_WEIGHT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # ASCII digits only


def _lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:NAME[:WEIGHT...]>` tags (A1111 does not encode them), and each
    tag's name and weight."""
    tags = [_lora_tag(m.group(0).strip(), m.group(1)) for m in _LORA_TAG.finditer(prompt)]
    return (_LORA_TAG.sub("", prompt) if tags else prompt), tags


def _lora_tag(tag: str, body: str) -> tuple[str, float]:
    """A1111's reading: `NAME:TE[:UNET]`, or named `te=`/`unet=`; the UNet weight (the transformer's
    here) follows the text encoder's unless given."""
    name, *args = body.split(":")
    positional = [a.strip() for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    named = {k.strip(): v.strip() for k, v in named.items()}
    te = named.get("te", positional[0] if positional else "1")
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    if not _WEIGHT.fullmatch(unet):
        raise InvalidRequestError(f"A1111 parameters: LoRA tag {tag} has the weight {unet!r}, not a number")
    if not name.strip():
        raise InvalidRequestError(f"A1111 parameters: LoRA tag {tag} has no name")
    return name.strip(), float(unet)


def _with_hashes(tags: list[tuple[str, float]], hashes: str) -> list[dict[str, Any]]:
    """The tags as `{name, weight, sha256}` (a short hash from `Lora hashes`, or None), as zturbo's
    own metadata records LoRAs."""
    by_name: dict[str, list[str]] = {}
    for item in hashes.split(","):
        name, colon, digest = item.rpartition(":")
        if colon and name.strip():
            by_name.setdefault(name.strip(), []).append(digest.strip().lower())
    # Files of one name in two folders: the tags and the hashes pair up in order.
    return [{"name": name, "weight": weight, "sha256": _next_hash(by_name, _hash_name(name))} for name, weight in tags]


def _next_hash(by_name: dict[str, list[str]], name: str) -> str | None:
    digests = by_name.get(name)
    if not digests:
        return None
    return digests.pop(0) if len(digests) > 1 else digests[0]


def _a1111_field(label: str) -> Field | None:
    """The request field an A1111 label names (the table's `a1111` labels only)."""
    from .request import FIELDS

    return next((f for f in FIELDS if f.a1111 == label and f.name != "negative_prompt"), None)


def _a1111_number(key: str, value: str, parse: Any) -> Any:
    try:
        return parse(value)
    except ValueError:  # the table's parsers raise FieldError, a ValueError too
        raise InvalidRequestError(f"A1111 parameters: {key} {value!r} is not a number") from None


def read_parameters(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str, list[str]]:
    """Generation parameters of a PNG: (parameters, which chunk they came from, ignored A1111 fields).

    The `zturbo` JSON chunk when present (everything, exactly); otherwise an A1111 `parameters`
    chunk (prompt, seeds, steps, CFG, size). Raises InvalidRequestError naming the file otherwise.
    """
    text = _png_text(path)
    if METADATA_KEY in text:
        try:
            return json.loads(text[METADATA_KEY]), METADATA_KEY, []
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}: its {METADATA_KEY!r} chunk is not valid JSON ({e})") from None
    if A1111_KEY in text:
        params, ignored = parse_a1111(text[A1111_KEY])
        return params, A1111_KEY, ignored
    raise InvalidRequestError(
        f"{path} has no generation parameters (neither a {METADATA_KEY!r} nor an A1111 {A1111_KEY!r} text chunk)"
    )


def _png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}) or {})
    except FileNotFoundError:
        raise InvalidRequestError(f"{path} does not exist") from None
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidRequestError(f"{path} is not a readable image: {e}") from None


def save_png(image: GeneratedImage, path: Path, *, overwrite: bool = False) -> Path:
    """Write atomically: a temporary file in the same directory, fsync, then link or rename.

    Without `overwrite` the final step is a hard link, which fails if `path` exists (no race).
    The file gets the mode a plain `open(path, "w")` would give (0666 less the umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            image.image.save(f, format="PNG", pnginfo=png_info(image.metadata))
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _create_temp(directory: Path, name: str) -> tuple[int, Path]:
    """A new hidden file next to `name`, opened for writing. Not `tempfile.mkstemp`: its 0600 mode
    would survive the rename, whereas a mode of 0666 here lets the umask decide, as for any file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def _link_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it") from None
    except OSError:
        # Filesystems without hard links: check, then rename (a narrow race, documented).
        if path.exists():
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)


def is_file_target(path: str | os.PathLike[str] | None) -> bool:
    return path is not None and str(path).lower().endswith(".png")


def check_output(path: str | os.PathLike[str] | None, num_images: int, *, overwrite: bool) -> None:
    """Reject an output target before any work is done: a file where a directory belongs, one file
    for several images, an existing file, or a place this process cannot write to."""
    if not is_file_target(path):
        check_output_directory(Path(path if path is not None else DEFAULT_OUTPUT_DIR))
        return
    assert path is not None
    if num_images != 1:
        raise InvalidRequestError(
            f"output {path} names one file but {num_images} images will be made; give a directory instead"
        )
    if Path(path).exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    check_output_directory(Path(path).parent, target=path)


def check_output_directory(directory: Path, *, target: str | os.PathLike[str] | None = None) -> None:
    """Raise InvalidRequestError unless files can be created in `directory` (made if missing).

    Tried for real, with a file created and removed in the nearest existing ancestor: permission
    bits say nothing about a read-only mount, /proc, or a root process, and a write does.
    """
    shown = target if target is not None else directory
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == Path(shown) and not existing.is_dir():
        raise InvalidRequestError(f"output {shown} exists and is not a directory; give a directory or a .png path")
    if not existing.is_dir():
        raise InvalidRequestError(f"output {shown}: {existing} is a file, not a directory")
    try:
        fd, probe = _create_temp(existing, "zturbo-write-check")
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise InvalidRequestError(f"output {shown} cannot be written: {existing} refuses new files ({reason})") from e
    os.close(fd)
    probe.unlink(missing_ok=True)


def save_images(
    images: Sequence[GeneratedImage], path: str | os.PathLike[str] | None = None, *, overwrite: bool = False
) -> list[Path]:
    """`path` ending in .png: exactly that file (one image). Otherwise a directory (default ./outputs),
    with names NNNNN-SEED.png continuing the directory's highest number."""
    check_output(path, len(images), overwrite=overwrite)
    if is_file_target(path):
        assert path is not None
        return [save_png(images[0], Path(path), overwrite=overwrite)]
    directory = Path(path if path is not None else DEFAULT_OUTPUT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    number = _next_number(directory)
    written = []
    for image in images:
        while True:
            target = directory / f"{number:05d}-{image.seed}.png"
            number += 1
            try:
                written.append(save_png(image, target))
                break
            except OutputExistsError:
                continue  # another process took this number; take the next
    return written


_NUMBERED = re.compile(r"^(\d{5,})-")


def _next_number(directory: Path) -> int:
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=0) + 1
