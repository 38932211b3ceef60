"""The HTTP bodies (pydantic, at the edge only) and their one way to a GenerateRequest.

The bodies mirror `request.FIELDS`: names, JSON types, defaults and docs. They check JSON types
only (strict: `"8"` is no number); the table's limits appear in the OpenAPI schema as
documentation, and `GenerateRequest.create` alone enforces them, as it does for every other door.

Input images come as base64 text in JSON (plain, or a `data:image/...;base64,` URL) or as file
parts of a multipart form. Each is checked here before anything else reads it: its size (413), its
declared type (415), its base64 (400), then `inputs.images.decode_image` (400: corrupt, too many
pixels, animated), every error naming the field.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import encodings
import encodings.aliases
import functools
import pkgutil
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import Field as Json
from python_multipart.multipart import parse_options_header

from ..errors import FieldError
from ..inputs.images import InputImage, decode_image
from ..inputs.spec import ALPHA_MASK, CONTROL_TYPES, RESIZE_MODES
from ..request import (
    CHOICE,
    FIELD,
    FLAG,
    IMAGE_FIELDS,
    LIMITS,
    OUTPUT_FORMATS,
    WHOLE,
    Field,
    GenerateRequest,
    ModelLimits,
    is_request_dict,
)

MODEL_ALIASES = ("z-image-turbo", "zturbo")
# Body fields that are not request parameters: they steer the route, not the image.
_ROUTE_FIELDS = {"model", "response_format", "user"}
# Native job body fields that steer the job's events, not the image.
JOB_FIELDS = frozenset({"preview"})
# Where the HTTP form differs from the CLI's text, whose docs the table holds.
_HTTP_DOCS = {
    "seeds": "one image per listed seed, in order (a JSON list of whole numbers); excludes seed",
    "loras": "LoRAs merged into the transformer, in order: a list of {name, weight} (weight 1 by default); "
    "names are files in the server's LoRA directory (GET /v1/loras)",
    "image": "input image, base64 or a data:image/...;base64, URL (multipart: a file part): img2img, or with "
    "mask or outpaint, inpaint",
    "mask": "inpaint mask of the image's size, base64 or a data URL (multipart: a file part): white repaints, or, "
    "in a mask with transparency, transparent repaints; 'alpha': the image's own transparency",
    "control_image": "ControlNet control image, base64 or a data URL (multipart: a file part); needs a server "
    "started with --controlnet",
    "outpaint": "extend the input image by [left, right, top, bottom] pixels (or the text 'L,R,T,B') and fill them in",
}
_CHOICES = {"resize": RESIZE_MODES, "control_type": CONTROL_TYPES, "output_format": OUTPUT_FORMATS}


def _doc(name: str) -> Any:
    """A body field's default, description and documented bounds, from the request table."""
    f = FIELD[name]
    schema: dict[str, Any] = {}
    bounds = f.range()
    if bounds is not None:
        lo, hi = (int(b) for b in bounds) if f.kind == WHOLE else bounds
        schema |= {"exclusiveMinimum" if f.bounds == "fraction>0" else "minimum": lo, "maximum": hi}
    elif f.bounds == "prompt":
        schema["maxLength"] = LIMITS.prompt_chars
    elif f.bounds == "seeds":
        schema |= {"minItems": 1, "maxItems": LIMITS.images[1]}
    elif f.bounds == "loras":
        schema["maxItems"] = LIMITS.loras
    elif f.kind == CHOICE:
        schema["enum"] = list(_CHOICES[name])
    doc = _HTTP_DOCS.get(name, f.doc)
    description = f"{doc}; allowed: {f.allowed()}"
    if name == "prompt":  # the one required field
        return Json(description=description, json_schema_extra=schema)
    return Json(f.default, description=description, json_schema_extra=schema)


class LoraBody(BaseModel):
    """One LoRA of a body; its name and weight are checked by `GenerateRequest.create`, whether the
    file exists and fits the model by the server's LoRA library."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Json(description="a file in the server's LoRA directory, e.g. style.safetensors")
    weight: StrictFloat = Json(
        1.0, description=f"the LoRA's strength; allowed {LIMITS.lora_weight[0]:g}..{LIMITS.lora_weight[1]:g}"
    )


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = _doc("prompt")
    negative_prompt: StrictStr = _doc("negative_prompt")
    n: StrictInt = _doc("batch")
    steps: StrictInt = _doc("steps")
    guidance_scale: StrictFloat = _doc("guidance_scale")
    cfg_normalization: StrictFloat | None = _doc("cfg_normalization")
    cfg_truncation: StrictFloat | None = _doc("cfg_truncation")
    seed: StrictInt | None = _doc("seed")
    seeds: list[StrictInt] | None = _doc("seeds")
    variation_seed: StrictInt | None = _doc("variation_seed")
    variation_strength: StrictFloat = _doc("variation_strength")
    variety: StrictFloat = _doc("variety")
    variety_until: StrictFloat = _doc("variety_until")
    loras: list[LoraBody] | None = _doc("loras")
    image: StrictStr | None = _doc("image")
    mask: StrictStr | None = _doc("mask")
    strength: StrictFloat | None = _doc("strength")
    resize: StrictStr | None = _doc("resize")
    mask_blur: StrictInt | None = _doc("mask_blur")
    mask_padding: StrictInt | None = _doc("mask_padding")
    paste_back: StrictBool | None = _doc("paste_back")
    outpaint: list[StrictInt] | StrictStr | None = _doc("outpaint")
    control_image: StrictStr | None = _doc("control_image")
    control_type: StrictStr | None = _doc("control_type")
    control_scale: StrictFloat | None = _doc("control_scale")
    control_start: StrictFloat | None = _doc("control_start")
    control_end: StrictFloat | None = _doc("control_end")
    output_format: StrictStr = _doc("output_format")
    output_compression: StrictInt | None = _doc("output_compression")


class JobBody(_Body):
    """Body of POST /v1/jobs."""

    width: StrictInt = _doc("width")
    height: StrictInt = _doc("height")
    preview: StrictBool = Json(
        False, description="progress events carry a small JPEG preview of the image so far (base64, <= 256 px)"
    )


class OpenAIImageBody(_Body):
    """Body of POST /v1/images/generations: OpenAI's images API plus zturbo's extension fields."""

    model: StrictStr | None = Json(None, max_length=200, description="omit, or the served model's name")
    size: StrictStr = Json("1024x1024", max_length=20, description="WIDTHxHEIGHT (multiples of 16) or auto")
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: StrictStr | None = Json(None, max_length=256, description="stored with the job")


ROUTE_FIELDS = frozenset(_ROUTE_FIELDS)


class ImageTooLargeError(FieldError):
    """An input image over the upload limit, refused before it is decoded."""

    http_status = 413
    kind = "too_large"


class UnsupportedImageTypeError(FieldError):
    """An input image declared as something other than an image (a part's or a data URL's type)."""

    http_status = 415
    kind = "unsupported_media_type"


def body_request(body: JobBody | OpenAIImageBody, limits: ModelLimits, max_image_bytes: int) -> GenerateRequest:
    """The body's request, validated once (random seeds drawn now, so a re-run makes the same pixels)."""
    given = body.model_dump(include=body.model_fields_set - _ROUTE_FIELDS - JOB_FIELDS)
    for name in IMAGE_FIELDS:
        if isinstance(given.get(name), str):
            given[name] = text_image(name, given[name], max_image_bytes)
    return GenerateRequest.from_fields(given, limits)


# `preview` is no request field, but a yes/no word in a form must read as the table's yes/no fields
# (`paste_back`) read it: true/yes/on/1 or false/no/off/0, by the table's own parser.
_PREVIEW = Field("preview", FLAG, False, "flag", "progress events carry a small JPEG preview")


def form_preview(values: dict[str, Any]) -> bool:
    """Take a multipart job form's `preview` field out of `values` (default false)."""
    text = values.pop("preview", "false")
    try:
        return bool(_PREVIEW.from_text(text))
    except FieldError:  # the message the route has always given, which clients may match
        raise FieldError("preview", f"preview {text!r} is not one of true, false") from None


# Python codecs that decode bytes but are no charset a client could mean: they rewrite the text
# (backslash escapes, IDNA labels) or refuse every byte.
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"})


def declared_charset(field: str | None, content_type: str | bytes | None) -> str | None:
    """The charset a Content-Type (a form's, or one part's) declares, None if it declares none; one
    Python's `codecs` do not know as a text encoding is a 400 naming it."""
    _, params = parse_options_header(content_type or b"")
    declared = params.get(b"charset")
    if declared is None:
        return None
    name = declared.decode("latin-1")
    if not _is_charset(name):
        who = field or "the form"
        raise FieldError(
            field, f"{who} declares charset {name[:40]!r}, which this server does not know; send text as "
            "UTF-8 (charset=utf-8, or none), or declare a standard charset such as iso-8859-1",
        )  # fmt: skip
    return name


# A charset name a client may send: `codecs.lookup` caches every name it is asked, known or not
# (`encodings._cache`), so a name goes to it only once it is known to be a codec's; others are
# refused first, and their message truncated.
_CHARSET_NAME = re.compile(r"[A-Za-z0-9._:-]{1,40}")


@functools.cache
def _codec_names() -> frozenset[str]:
    """The names Python's `encodings` package knows: its aliases and its codec modules."""
    modules = {m.name for m in pkgutil.iter_modules(encodings.__path__)}
    return frozenset(encodings.aliases.aliases) | frozenset(modules)


def _known_codec_name(name: str) -> bool:
    """Whether `name` (as `encodings.search_function` normalizes it) is one `encodings` knows."""
    if not _CHARSET_NAME.fullmatch(name):
        return False
    norm = encodings.normalize_encoding(name).lower()
    return norm in _codec_names() or norm.replace(".", "_") in _codec_names()


def _is_charset(name: str) -> bool:
    """Whether `name` is a text encoding Python's `codecs` know, and no pseudo-charset."""
    if not _known_codec_name(name):
        return False
    try:
        if codecs.lookup(name).name in _NOT_CHARSETS:
            return False
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return False
    try:
        b"\0".decode(name)  # a codec that is no text encoding (base64, zlib) raises LookupError
    except LookupError:
        return False
    except ValueError:  # a text encoding that cannot read this one byte alone (UTF-16): still one
        pass
    return True


def form_text(field: str, data: bytes, content_type: bytes | None, form_charset: str | None) -> str:
    """A multipart text part's bytes as text, decoded strictly by the charset the part declares,
    else the one the form declares, else UTF-8 (as a JSON body is). A declared charset is the
    client's word for its bytes, so reading by it changes nothing (Apache HttpClient labels every
    text part ISO-8859-1); bytes invalid in it are refused, never guessed at (Starlette would read
    them as Latin-1)."""
    charset = declared_charset(field, content_type)
    whose = "the charset its part declares"
    if charset is None:
        charset, whose = form_charset, "the charset the form declares"
    try:
        text = data.decode(charset or "utf-8")
    except ValueError as e:  # UnicodeDecodeError; LookupError is checked by declared_charset
        at = getattr(e, "start", 0)
        byte = f"byte {at + 1} is 0x{data[at : at + 1].hex()}"
        if charset is None:
            hint = "send text as UTF-8, or declare its charset (Content-Type: text/plain; charset=...)"
            raise FieldError(field, f"{field} is not valid UTF-8 text: {byte}; {hint}") from None
        raise FieldError(field, f"{field} is not valid {charset} text ({whose}): {byte}") from None
    _check_scalars(field, text)
    return text


def _check_scalars(field: str, text: str) -> None:
    """Refuse a lone surrogate, which some charsets decode to (UTF-7's "+2AA-"): no UTF-8 encoder
    takes it, so the job store and the image metadata would fail on it after the request was
    accepted (request.py refuses one in a prompt the same way, for the other doors)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"\\u{ord(text[e.start]):04x} at character {e.start + 1}"
        raise FieldError(field, f"{field} contains an unpaired surrogate ({where}); text must be valid UTF-8") from None


def image_text_bytes(body: JobBody | OpenAIImageBody) -> int:
    """How many bytes of a JSON body its image fields' text takes (base64 needs no JSON escapes)."""
    return sum(len(v) for v in (getattr(body, name) for name in IMAGE_FIELDS) if isinstance(v, str))


def check_body_size(total: int, images: int, max_body: int, max_image_bytes: int) -> None:
    """Refuse a body whose bytes besides its images pass `max_body` (413)."""
    if total - images > max_body:
        raise ImageTooLargeError(
            None,
            f"the request body is {total - images} bytes besides its images; this server accepts at most "
            f"{max_body} (and {max_image_bytes} bytes per image)",
        )


# data:[<media type>][;param]*[;base64],<data>
_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def text_image(field: str, text: str, max_bytes: int) -> InputImage | str:
    """An image field given as text: base64 or a data URL, decoded and checked; `mask` may be 'alpha'."""
    if field == "mask" and text == ALPHA_MASK:
        return text
    payload = _data_url_payload(field, text) if text[:5].lower() == "data:" else text
    payload = _SPACE.sub("", payload)
    check_image_size(field, len(payload) // 4 * 3 - payload[-2:].count("="), max_bytes)
    try:
        altchars = b"-_" if ("-" in payload or "_" in payload) else None  # the URL-safe alphabet
        data = base64.b64decode(payload, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FieldError(
            field, f"{field} is not valid base64 ({e}); send the image file's bytes in base64, or a "
            "data:image/png;base64,... URL",
        ) from None  # fmt: skip
    return decode_image(data, field, f"(base64, {len(data)} bytes)", max_bytes=max_bytes)


def _data_url_payload(field: str, text: str) -> str:
    m = _DATA_URL.match(text)
    if m is None:
        raise FieldError(field, f"{field} is a data URL without a ','; send data:image/png;base64,<base64>")
    media = m.group(1).strip().lower()
    if media and not media.startswith("image/"):
        raise UnsupportedImageTypeError(
            field, f"{field} is a data URL of type {media[:60]!r}; send an image (image/png, image/jpeg, image/webp)"
        )
    if "base64" not in (p.strip().lower() for p in m.group(2).split(";")):
        raise FieldError(field, f"{field} is a data URL without ';base64'; send data:image/png;base64,<base64>")
    return text[m.end() :]


def check_image_size(field: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageTooLargeError(field, f"{field} is {size} bytes; allowed at most {max_bytes} bytes per image")


# Types a file part may declare and still be read as an image: none, or "anything" (what clients
# send when they do not know), or an image type; Pillow then decides what the bytes are.
_UNDECLARED = ("", "application/octet-stream")


def check_part_type(field: str, content_type: str | None) -> None:
    """Refuse (415) a file part that declares a type other than an image's."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in _UNDECLARED and not media.startswith("image/"):
        raise UnsupportedImageTypeError(
            field, f"{field} is sent as {media[:60]!r}; send an image file (image/png, image/jpeg, image/webp, ...)"
        )


def upload_image(field: str, data: bytes, filename: str | None, max_bytes: int) -> InputImage:
    """A file part's bytes (its declared type already checked), decoded and checked."""
    name = repr(filename) if filename else f"(uploaded, {len(data)} bytes)"
    return decode_image(data, field, name, max_bytes=max_bytes)


def job_params(stored: dict[str, Any]) -> dict[str, Any]:
    """The job view's `params` (docs/api.md) for a stored request; a plain dict stored by an
    earlier version already has those keys."""
    if not is_request_dict(stored):
        return stored
    listed = stored["seeds"]
    return {
        "prompt": stored["prompts"][0],
        "negative_prompt": stored["negative_prompts"][0],
        "n": len(stored["images"]),
        "width": stored["width"],
        "height": stored["height"],
        "steps": stored["steps"],
        "guidance_scale": stored["guidance_scale"],
        # Stored before CFG options were request fields: diffusers' defaults ran.
        "cfg_normalization": stored.get("cfg_normalization", 0.0),
        "cfg_truncation": stored.get("cfg_truncation", 1.0),
        "seed": None if listed is not None else stored["seed"],
        "seeds": listed,
        "variation_seed": stored["variation_seed"],
        "variation_strength": stored["variation_strength"],
        "variety": stored["variety"],
        "variety_until": stored["variety_until"],
        "loras": [{"name": ref["name"], "weight": ref["weight"]} for ref in stored.get("loras", ())],
        "output_format": stored.get("output_format", "png"),
        "output_compression": stored.get("output_compression"),
    }


def job_inputs(stored: dict[str, Any], job_id: str) -> dict[str, Any] | None:
    """The job view's `params.inputs`: the input settings as stored (mode, strength, ...) and each
    image's sha256 and URL, never its bytes; None for text-to-image."""
    inputs = stored.get("inputs") if is_request_dict(stored) else None
    if not inputs:
        return None
    images = {
        name: {"sha256": digest, "url": f"/v1/jobs/{job_id}/inputs/{name}"}
        for name, digest in inputs.get("images", {}).items()
    }
    return {**{k: v for k, v in inputs.items() if k != "images"}, "images": images}


def image_variation_seeds(stored: dict[str, Any]) -> list[int | None]:
    """Each image's variation seed (None without a variation strength)."""
    if is_request_dict(stored):
        return [spec["variation_seed"] for spec in stored["images"]]
    base = stored.get("variation_seed")  # an earlier version's plain dict: the engine's convention
    n = int(stored.get("n", 1))
    if base is None or not stored.get("variation_strength"):
        return [None] * n
    return [base if stored.get("seeds") is not None else base + i for i in range(n)]


def status_limits(limits: ModelLimits) -> dict[str, Any]:
    """`limits` of GET /v1/status: the request table's numbers and this server's model limits."""
    return {
        "spatial_unit": limits.spatial_unit,
        "max_pixels": limits.max_pixels,
        "max_images": LIMITS.images[1],
        "max_steps": LIMITS.steps[1],
        "max_guidance": LIMITS.guidance[1],
        "max_prompt_chars": LIMITS.prompt_chars,
        "max_seed": LIMITS.seed[1],
        # The served model's defaults: what a request that omits steps or guidance gets.
        "profile": limits.profile.describe(),
    }
