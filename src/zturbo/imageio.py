"""Image output in PNG, WebP or JPEG: metadata (the `zturbo` JSON and A1111's `parameters` text), atomic writes.

PNG keeps both in text chunks. WebP and JPEG keep the A1111 text where A1111 writes it, the EXIF
UserComment (UTF-16, as piexif's `UserComment.dump(..., encoding="unicode")` does), and the zturbo
JSON in an XMP packet (one `zturbo:metadata` element), so `read_metadata` and `generate --from`
read every format alike.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequestError, OutputExistsError

if TYPE_CHECKING:
    from .adapters.tags import Tags
    from .pngwrite import PngWriter
    from .request import Field, GenerateRequest
    from .result import GeneratedImage, ModelInfo

METADATA_KEY = "zturbo"
A1111_KEY = "parameters"
DEFAULT_OUTPUT_DIR = "outputs"
LORA_HASHES = "Lora hashes"  # A1111's field: `"name: 0123456789, ..."`
SHORT_HASH = 10  # hex digits of a sha256 in A1111's and Civitai's texts (AutoV2)
CONTROLNET_UNIT = "ControlNet 0"  # sd-webui-controlnet's field for its first unit
IMAGE_SUFFIXES = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
# Output file suffixes and the format each names (`.jpeg` is a JPEG too).
SUFFIX_FORMATS = {".png": "png", ".webp": "webp", ".jpg": "jpeg", ".jpeg": "jpeg"}
# PNG's zlib settings: level 1 with run-length matching (Z_RLE) deflates a photo-like 1024² image
# 3x faster than Pillow's default (level 6) into a file of the same size, since the PNG filters
# leave mostly runs (scripts/bench_encode.py; docs/performance.md, "Encoding").
PNG_LEVEL, PNG_STRATEGY = 1, zlib.Z_RLE
# Quality when `output_compression` is not given. WebP's method 0 encodes 2.5x faster than
# libwebp's default (4) for files about 10 % larger.
DEFAULT_QUALITY = {"webp": 90, "jpeg": 90}
WEBP_METHOD = 0
_PILLOW_FORMAT = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_XMP_NS = "https://github.com/zturbo/zturbo/ns/1.0/"


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
        "model_source": model.origin,
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
    from .adapters.tags import lora_tag_name
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
    from .adapters.library import SUFFIX as LORA_SUFFIX

    base = re.split(r"[/\\:]", name)[-1]
    base = base[: -len(LORA_SUFFIX)] if base.lower().endswith(LORA_SUFFIX) else base
    return re.sub(r"[,\[\]\"]", "", base)


def _weight_text(weight: float) -> str:
    """A weight as A1111 writes it (`0.7`, `1`), with every digit needed to read the same float back."""
    text = repr(float(weight))
    return text.removesuffix(".0")


def _a1111_lora_hashes(loras: Sequence[dict[str, Any]]) -> dict[str, str]:
    """A1111's `Lora hashes` field: each tag name with the first 10 hex digits of the file's sha256."""
    from .adapters.tags import lora_tag_name

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


def png_chunks(meta: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The text chunks `png_info` holds, as (type, data) pairs: the very bytes Pillow would write."""
    return [(kind, data) for kind, data, *_ in png_info(meta).chunks]


@functools.cache
def png_writer() -> PngWriter:
    """This process's PNG writer, made on first use: every caller (a worker's writer thread, the
    CLI, a library user) shares its thread pool rather than starting one per image."""
    from .pngwrite import PngWriter

    return PngWriter(level=PNG_LEVEL, strategy=PNG_STRATEGY)


def exif_bytes(meta: dict[str, Any]) -> bytes:
    """An EXIF block whose UserComment holds the A1111 text, UTF-16 in the block's (big-endian) byte
    order after the `UNICODE` code, as A1111 writes (and reads) WebP and JPEG metadata."""
    from PIL import Image

    exif = Image.Exif()
    exif[_EXIF_IFD] = {_USER_COMMENT: b"UNICODE\0" + a1111_parameters(meta).encode("utf-16-be", "surrogatepass")}
    return exif.tobytes()


# Characters XML 1.0 cannot hold; in the JSON they are written as \uXXXX escapes, which read back the same.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xmp_packet(meta: dict[str, Any]) -> bytes:
    """An XMP packet holding the zturbo JSON as the text of one `zturbo:metadata` element."""
    from xml.sax.saxutils import escape

    text = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    text = escape(_NOT_XML.sub(lambda m: f"\\u{ord(m.group()):04x}", text))
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:zturbo="{_XMP_NS}"><zturbo:metadata>{text}</zturbo:metadata>'
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="r"?>'
    ).encode("utf-8", "surrogatepass")


def encode_image(
    image: GeneratedImage,
    fp: Any,
    *,
    output_format: str,
    compression: int | None,
    options: dict[str, Any] | None = None,
) -> None:
    """Encode `image` with its metadata into the binary file `fp`. `compression` is the quality of
    WebP and JPEG (0..100, OpenAI's `output_compression`; None: `DEFAULT_QUALITY`) and must be None
    for PNG. A PNG of an 8-bit L, LA, RGB or RGBA image is written by `png_writer()` (Paeth-filtered
    row bands deflated in parallel), any other by Pillow. `options` are extra Pillow save options
    (the encoding benchmark's settings): with them, Pillow writes every format."""
    if output_format not in _PILLOW_FORMAT:
        raise ValueError(f"output format {output_format!r} is not one of {', '.join(_PILLOW_FORMAT)}")
    meta = image.metadata
    if output_format == "png":
        if compression is not None:
            raise ValueError("PNG is lossless: it takes no quality (its zlib settings are PNG_LEVEL, PNG_STRATEGY)")
        from .pngwrite import supports

        if not options and supports(image.image):
            png_writer().write(fp, image.image, png_chunks(meta))
            return
        settings: dict[str, Any] = {"pnginfo": png_info(meta)}
        settings |= {"compress_level": PNG_LEVEL, "compress_type": PNG_STRATEGY}
    else:
        quality = DEFAULT_QUALITY[output_format] if compression is None else compression
        settings = {"quality": quality, "exif": exif_bytes(meta), "xmp": xmp_packet(meta)}
        if output_format == "webp":
            settings["method"] = WEBP_METHOD
    image.image.save(fp, format=_PILLOW_FORMAT[output_format], **{**settings, **(options or {})})


def image_format(path: str | os.PathLike[str]) -> str | None:
    """The output format a file name's suffix names (`x.jpg` -> jpeg), or None."""
    return SUFFIX_FORMATS.get(os.path.splitext(os.fspath(path))[1].lower())


# Image suffixes Pillow does not register (its plugins vary by build) that still plainly name an image file.
_OTHER_IMAGE_SUFFIXES = frozenset({".heic", ".heif", ".jxl", ".svg", ".exr"})


@functools.cache
def _foreign_image_suffixes() -> frozenset[str]:
    """Suffixes that name an image format zturbo does not write: Pillow's registered ones (and a few
    it lacks) less `SUFFIX_FORMATS`. A list of known suffixes, not "any suffix", so a directory
    named `out.v2` or `run.2024` stays a directory. Cached: Pillow imports every plugin to list them."""
    from PIL import Image

    known = {suffix.lower() for suffix in Image.registered_extensions()} | _OTHER_IMAGE_SUFFIXES
    return frozenset(known - set(SUFFIX_FORMATS))


def foreign_image_format(path: str | os.PathLike[str]) -> str | None:
    """The image format a suffix zturbo cannot write names (`x.gif` -> gif), or None."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    return suffix[1:] if suffix in _foreign_image_suffixes() else None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `zturbo` JSON of an image written by zturbo; raises InvalidRequestError for other files."""
    text = _image_text(path).get(METADATA_KEY)
    if text is None:
        raise InvalidRequestError(f"{path} has no {METADATA_KEY!r} metadata")
    return json.loads(text)


# Keys that describe the file rather than shape the image (or that zturbo writes with a fixed value).
_A1111_INFORMATIONAL = {"Model hash", "Model", "Version", "Sampler"}
# A label is at most 64 characters (A1111's are under 40) and has no leading `\s*` of its own: an
# unbounded label, or spaces both it and a prefix could take, would make `findall` quadratic in the
# line's length (a 40 KB line of letters took 6 s); a longer label reads as its last 64 characters.
_A1111_PAIR = re.compile(r'([\w .\-/()]{1,64}):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def split_a1111(text: str) -> tuple[str, str, dict[str, str]]:
    """An A1111 `parameters` text's parts as written: the prompt (its `<lora:...>` tags kept), the
    negative prompt, and the last line's `Key: value` pairs as text (quoted values unquoted).

    Layout: prompt lines, an optional `Negative prompt:` line (and its continuation lines), then one
    line of `Key: value` pairs where values with commas are JSON-quoted. Raises InvalidRequestError
    for a text without that line, ValueError for a quoted value that is not JSON.
    """
    lines = text.rstrip("\n").split("\n")
    if not (lines and _A1111_PAIR.match(lines[-1].lstrip()) and "Steps:" in lines[-1]):
        raise InvalidRequestError("the 'parameters' text has no 'Steps:' line, so it is not A1111 parameters")
    settings = lines.pop()
    prompt_lines, negative_lines, target = [], [], None
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if target is not None else prompt_lines).append(line)
    pairs = ((key.strip(), value.strip()) for key, value in _A1111_PAIR.findall(settings))
    values = {key: json.loads(value) if value.startswith('"') else value for key, value in pairs}
    return "\n".join(prompt_lines), "\n".join(negative_lines), values


def parse_a1111(text: str) -> tuple[dict[str, Any], list[str]]:
    """An A1111 `parameters` text -> (generation parameters, names of fields that zturbo cannot use);
    `split_a1111` describes the layout."""
    from .request import parse_size

    raw_prompt, negative, settings = split_a1111(text)
    ignored: list[str] = []
    tags = _read_tags(raw_prompt, ignored)
    params: dict[str, Any] = {"prompt": tags.prompt, "negative_prompt": negative}
    hashes = ""
    for key, value in settings.items():
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
    if tags.loras:
        params["loras"] = _with_hashes([(tag.name, tag.weight) for tag in tags.loras], hashes)
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


def _read_tags(prompt: str, ignored: list[str]) -> Tags:
    """The prompt's extra-network tags (`adapters.tags`, the A1111 routes' reading too). What zturbo
    cannot apply is named in `ignored`, as `<tag> (why)`: a text-encoder weight, `dyn`, an
    extension's argument, a hypernetwork or a network A1111 does not know; the LoRA still runs at its
    UNet weight, and the tag never reaches the encoder's text, as in A1111."""
    from .adapters.tags import TE_WEIGHT, UNAVAILABLE_NETWORKS, UNKNOWN_NETWORK, TagError, read_tags

    try:
        tags = read_tags(prompt)
    except TagError as e:
        raise InvalidRequestError(f"A1111 parameters: LoRA {e}") from None
    for tag in tags.loras:
        why = [f"text-encoder weight {tag.te:g}: {TE_WEIGHT}"] if tag.te is not None else []
        if why or tag.unapplied:
            ignored.append(f"{tag.text} ({'; '.join([*why, *tag.unapplied])})")
    ignored += [f"{text} ({UNAVAILABLE_NETWORKS.get(network, UNKNOWN_NETWORK)})" for network, text in tags.others]
    return tags


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
    """Generation parameters of an image: (parameters, which text they came from, ignored A1111 fields).

    The `zturbo` JSON when present (everything, exactly); otherwise an A1111 `parameters` text
    (prompt, seeds, steps, CFG, size). Raises InvalidRequestError naming the file otherwise.
    """
    text = _image_text(path)
    if METADATA_KEY in text:
        try:
            return json.loads(text[METADATA_KEY]), METADATA_KEY, []
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}: its {METADATA_KEY!r} metadata is not valid JSON ({e})") from None
    if A1111_KEY in text:
        params, ignored = parse_a1111(text[A1111_KEY])
        return params, A1111_KEY, ignored
    raise InvalidRequestError(
        f"{path} has no generation parameters (neither {METADATA_KEY!r} metadata nor an A1111 {A1111_KEY!r} text)"
    )


def metadata_text(data: bytes) -> dict[str, str]:
    """The metadata texts of an encoded PNG, WebP or JPEG, read as from a file (`zturbo`,
    `parameters` and, for a PNG, its other text chunks); raises InvalidRequestError for bytes
    that are no readable image or hold a broken XMP packet."""
    import io

    return _image_text(io.BytesIO(data))  # type: ignore[arg-type]  # Pillow opens file objects


def _image_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata texts of an image file: a PNG's text chunks; for WebP and JPEG, `zturbo` from
    the XMP packet and `parameters` from the EXIF UserComment, where present."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                return dict(getattr(im, "text", {}) or {})
            texts = {METADATA_KEY: _xmp_metadata(path, im.info.get("xmp")), A1111_KEY: _user_comment(im.getexif())}
    except FileNotFoundError:
        raise InvalidRequestError(f"{path} does not exist") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise InvalidRequestError(f"{path} is not a readable image: {e}") from None
    return {k: v for k, v in texts.items() if v is not None}


def _xmp_metadata(path: str | os.PathLike[str], xmp: object) -> str | None:
    """The text of the packet's `zturbo:metadata` element; None without one (or without a packet)."""
    from xml.etree import ElementTree

    if not isinstance(xmp, (bytes, str)) or _XMP_NS.encode() not in (xmp if isinstance(xmp, bytes) else xmp.encode()):
        return None
    try:
        element = ElementTree.fromstring(xmp).find(f".//{{{_XMP_NS}}}metadata")
    except ElementTree.ParseError as e:
        raise InvalidRequestError(f"{path}: its XMP packet is not valid XML ({e})") from None
    return element.text if element is not None else None


def _user_comment(exif: Any) -> str | None:
    """The EXIF UserComment as text: its 8-byte code says how (UNICODE: UTF-16 in the block's byte
    order; ASCII, or an undefined code: UTF-8)."""
    raw = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, str):
        return raw or None
    if not isinstance(raw, bytes) or len(raw) <= 8:
        return None
    code, body = raw[:8], raw[8:]
    if code == b"UNICODE\0":
        return body.decode("utf-16-le" if getattr(exif, "endian", ">") == "<" else "utf-16-be", "replace")
    return body.decode("utf-8", "replace")


def save_image(
    image: GeneratedImage, path: Path, *, output_format: str, compression: int | None, overwrite: bool = False
) -> Path:
    """Write `image` (`encode_image`) durably and atomically: a temporary file in the same
    directory, fsynced, then linked or renamed into place, and the directory fsynced.

    Without `overwrite` the final step is a hard link, which fails if `path` exists (no race).
    The file gets the mode a plain `open(path, "w")` would give (0666 less the umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            encode_image(image, f, output_format=output_format, compression=compression)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def save_png(image: GeneratedImage, path: Path, *, overwrite: bool = False) -> Path:
    """`save_image` as PNG."""
    return save_image(image, path, output_format="png", compression=None, overwrite=overwrite)


def _fsync_directory(directory: Path) -> None:
    """Make a new name in `directory` durable (POSIX); where directories cannot be opened, a no-op."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # filesystems that cannot fsync a directory
    finally:
        os.close(fd)


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
    """Whether an output names one image file (.png, .webp, .jpg or .jpeg) rather than a directory."""
    return path is not None and image_format(path) is not None


def check_output(
    path: str | os.PathLike[str] | None, num_images: int, *, overwrite: bool, output_format: str = "png"
) -> None:
    """Reject an output target before any work is done: a file where a directory belongs, one file
    for several images, a file whose suffix names another format, an existing file, or a place this
    process cannot write to."""
    if not is_file_target(path):
        check_output_directory(Path(path if path is not None else DEFAULT_OUTPUT_DIR))
        return
    assert path is not None
    named = image_format(path)
    if named != output_format:
        raise InvalidRequestError(
            f"output {path} is a {named} file name but the output format is {output_format}; name the file "
            f"{Path(path).stem}{IMAGE_SUFFIXES[output_format]} or choose --format {named}"
        )
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
    if target is None:
        _check_not_image_name(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == Path(shown) and not existing.is_dir():
        raise InvalidRequestError(
            f"output {shown} exists and is not a directory; give a directory or an image path (.png, .webp, .jpg)"
        )
    if not existing.is_dir():
        raise InvalidRequestError(f"output {shown}: {existing} is a file, not a directory")
    try:
        fd, probe = _create_temp(existing, "zturbo-write-check")
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise InvalidRequestError(f"output {shown} cannot be written: {existing} refuses new files ({reason})") from e
    os.close(fd)
    probe.unlink(missing_ok=True)


def _check_not_image_name(directory: Path) -> None:
    """Refuse a new output directory named like an image file zturbo cannot write (`x.gif`): the user
    meant a file, and would find a directory of PNGs. An existing directory is used as it is."""
    named = foreign_image_format(directory)
    if named is not None and not directory.is_dir():
        raise InvalidRequestError(
            f"output {directory}: {named} is not an output format; use .png, .webp or .jpg (or a directory)"
        )


def save_images(
    images: Sequence[GeneratedImage],
    path: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    output_format: str = "png",
    compression: int | None = None,
) -> list[Path]:
    """`path` naming an image file (.png, .webp, .jpg): exactly that file (one image). Otherwise a
    directory (default ./outputs), with names NNNNN-SEED.png (or .webp, .jpg) continuing the
    directory's highest number."""
    check_output(path, len(images), overwrite=overwrite, output_format=output_format)
    write = functools.partial(save_image, output_format=output_format, compression=compression)
    if is_file_target(path):
        assert path is not None
        return [write(images[0], Path(path), overwrite=overwrite)]
    directory = Path(path if path is not None else DEFAULT_OUTPUT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    number = _next_number(directory)
    written = []
    for image in images:
        while True:
            target = directory / f"{number:05d}-{image.seed}{IMAGE_SUFFIXES[output_format]}"
            number += 1
            try:
                written.append(write(image, target))
                break
            except OutputExistsError:
                continue  # another process took this number; take the next
    return written


_NUMBERED = re.compile(r"^(\d{5,})-")


def _next_number(directory: Path) -> int:
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=0) + 1
