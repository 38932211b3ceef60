"""The HTTP bodies (pydantic, at the edge only) and their one way to a GenerateRequest.

The bodies mirror `request.FIELDS`: names, JSON types, defaults and docs. They check JSON types
only (strict: `"8"` is no number); the table's limits appear in the OpenAPI schema as
documentation, and `GenerateRequest.create` alone enforces them, as it does for every other door.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr
from pydantic import Field as Json

from ..request import FIELD, LIMITS, WHOLE, GenerateRequest, ModelLimits, is_request_dict

MODEL_ALIASES = ("z-image-turbo", "zturbo")
# Body fields that are not request parameters: they steer the route, not the image.
_ROUTE_FIELDS = {"model", "response_format", "user"}
# Where the HTTP form differs from the CLI's text, whose docs the table holds.
_HTTP_DOCS = {
    "seeds": "one image per listed seed, in order (a JSON list of whole numbers); excludes seed",
    "loras": "LoRAs merged into the transformer, in order: a list of {name, weight} (weight 1 by default); "
    "names are files in the server's LoRA directory (GET /v1/loras)",
}


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
    seed: StrictInt | None = _doc("seed")
    seeds: list[StrictInt] | None = _doc("seeds")
    variation_seed: StrictInt | None = _doc("variation_seed")
    variation_strength: StrictFloat = _doc("variation_strength")
    variety: StrictFloat = _doc("variety")
    variety_until: StrictFloat = _doc("variety_until")
    loras: list[LoraBody] | None = _doc("loras")


class JobBody(_Body):
    """Body of POST /v1/jobs."""

    width: StrictInt = _doc("width")
    height: StrictInt = _doc("height")


class OpenAIImageBody(_Body):
    """Body of POST /v1/images/generations: OpenAI's images API plus zturbo's extension fields."""

    model: StrictStr | None = Json(None, max_length=200, description="omit, or the served model's name")
    size: StrictStr = Json("1024x1024", max_length=20, description="WIDTHxHEIGHT (multiples of 16) or auto")
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: StrictStr | None = Json(None, max_length=256, description="stored with the job")


def body_request(body: JobBody | OpenAIImageBody, limits: ModelLimits) -> GenerateRequest:
    """The body's request, validated once (random seeds drawn now, so a re-run makes the same pixels)."""
    given = body.model_dump(include=body.model_fields_set - _ROUTE_FIELDS)
    return GenerateRequest.from_fields(given, limits)


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
        "seed": None if listed is not None else stored["seed"],
        "seeds": listed,
        "variation_seed": stored["variation_seed"],
        "variation_strength": stored["variation_strength"],
        "variety": stored["variety"],
        "variety_until": stored["variety_until"],
        "loras": [{"name": ref["name"], "weight": ref["weight"]} for ref in stored.get("loras", ())],
    }


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
    }
