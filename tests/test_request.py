"""GenerateRequest validation through the Python API (the CLI tests cover the same rules end to end)."""

from __future__ import annotations

import re

import pytest

from zturbo.config import RuntimeConfig
from zturbo.errors import FieldError, InvalidRequestError
from zturbo.request import GenerateRequest, LoraRef, ModelLimits, nearest_multiples, parse_size

LIMITS = ModelLimits(spatial_unit=16, max_pixels=2048 * 2048)


def test_defaults_are_the_turbo_settings():
    req = GenerateRequest.create("a fox", limits=LIMITS, seed=1)
    assert (req.steps, req.guidance_scale, req.width, req.height, req.batch) == (8, 0.0, 1024, 1024, 1)
    assert not req.do_cfg and not req.seed_was_random


def test_image_order_and_seeds_for_several_prompts():
    req = GenerateRequest.create(["a", "b"], limits=LIMITS, seed=10, batch=2, negative_prompt=["x", "y"])
    assert req.image_prompts() == [("a", "x", 10), ("a", "x", 11), ("b", "y", 12), ("b", "y", 13)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"negative_prompt": ["x", "y"]}, "got 2 negative prompts for 1 prompts"),
        ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
        ({"width": "1024"}, "width must be a whole number of pixels, got '1024'"),
        ({"seed": 2**63 - 1, "batch": 2}, "seed 9223372036854775807 is out of range"),
        ({"guidance_scale": True}, "guidance_scale must be a finite number"),
    ],
)
def test_invalid_values_name_themselves(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GenerateRequest.create("a fox", limits=LIMITS, **kwargs)


def test_nearest_multiples():
    assert nearest_multiples(1000, 16) == (992, 1008)
    assert nearest_multiples(17, 16) == (16, 32)


def test_runtime_config_from_env():
    cfg = RuntimeConfig.from_env({"ZTURBO_MODEL": "/m", "ZTURBO_MAX_PIXELS": "1000000"}, device="cpu")
    assert (cfg.model, cfg.device, cfg.max_pixels) == ("/m", "cpu", 1_000_000)
    assert RuntimeConfig.from_env({"ZTURBO_MODEL": "/m"}, model="/other").model == "/other"
    with pytest.raises(InvalidRequestError, match="ZTURBO_MAX_PIXELS='lots' is not a whole number"):
        RuntimeConfig.from_env({"ZTURBO_MAX_PIXELS": "lots"})
    with pytest.raises(InvalidRequestError, match="dtype 'fp8' is not one of"):
        RuntimeConfig(dtype="fp8")


def test_serialised_request_round_trips_with_its_seeds_resolved():
    import json

    for kwargs in ({"batch": 3}, {"seeds": "4-6"}, {"batch": 2, "variation_strength": 0.3}):
        req = GenerateRequest.create(["a", "b"], limits=LIMITS, negative_prompt=["x", "y"], **kwargs)
        data = json.loads(json.dumps(req.to_dict()))  # what a job stores
        assert GenerateRequest.from_dict(data) == req
        assert all(spec["seed"] is not None for spec in data["images"])


def test_prompt_length_is_limited_for_every_prompt():
    GenerateRequest.create("x" * 4000, limits=LIMITS, seed=1)
    with pytest.raises(InvalidRequestError, match="prompt is 4001 characters long; allowed at most 4000"):
        GenerateRequest.create(["ok", "x" * 4001], limits=LIMITS, seed=1)
    with pytest.raises(InvalidRequestError, match="negative_prompt is 4001 characters long"):
        GenerateRequest.create("ok", limits=LIMITS, seed=1, negative_prompt="x" * 4001)


@pytest.mark.parametrize("size", ["64x64\n", "\uff16\uff14x64", "\u0666\u0664x64", "64x64\t", "64x\u00b964"])
def test_size_takes_ascii_digits_only(size):
    with pytest.raises(InvalidRequestError, match="is not WIDTHxHEIGHT"):
        parse_size(size)


def test_size_forms_that_stay_accepted():
    assert parse_size("64x48") == parse_size(" 64 x 48 ") == (64, 48)
    assert parse_size("auto") == (1024, 1024)


@pytest.mark.parametrize(
    "prompt",
    ["\u200b\u200c\u200d\ufeff", "\u2060 \u00a0\u3000", "\u3164\u2800\ufe0f", "\x00\t", "\u034f" * 3, "\u17b4\u17b5",
     "\u180b\U000e0020"],
)  # fmt: skip
def test_a_prompt_of_invisible_characters_is_blank(prompt):
    with pytest.raises(InvalidRequestError, match="prompt is empty or only invisible characters"):
        GenerateRequest.create(prompt, limits=LIMITS, seed=1)


def test_invisible_characters_inside_a_prompt_are_kept():
    assert GenerateRequest.create("a\u200bfox", limits=LIMITS, seed=1).prompts == ("a\u200bfox",)


@pytest.mark.parametrize("text", ["１２", "٣", "1_000", "8\n", "0x10", "", "nan5"])
def test_text_numbers_are_ascii_digits_only(text):
    from zturbo.errors import FieldError
    from zturbo.request import FIELD, parse_seeds

    for name in ("steps", "guidance_scale"):
        with pytest.raises(FieldError, match="ASCII digits"):
            FIELD[name].from_text(text)
    with pytest.raises(FieldError, match="is not a seed or a range"):
        parse_seeds(f"1,{text}")


def test_text_numbers_in_ascii_still_read():
    from zturbo.request import FIELD, parse_seeds

    assert FIELD["steps"].from_text(" 8 ") == 8 and FIELD["guidance_scale"].from_text("2.5e0") == 2.5
    assert FIELD["guidance_scale"].from_text(".5") == 0.5 and FIELD["seed"].from_text("+7") == 7
    assert parse_seeds("1-3, 9") == (1, 2, 3, 9)


# ---------------------------------------------------------------------------------------------
# LoRA lists


@pytest.mark.parametrize(
    "value",
    [
        "a.safetensors:0.7, b",
        ["a.safetensors:0.7", "b"],
        [{"name": "a.safetensors", "weight": 0.7}, {"name": "b"}],
        [("a.safetensors", 0.7), ("b", 1)],
    ],
)
def test_every_lora_list_form_gives_the_same_refs(value):
    from zturbo.request import LoraRef

    req = GenerateRequest.create("x", limits=LIMITS, seed=1, loras=value)
    assert req.loras == (LoraRef("a.safetensors", 0.7), LoraRef("b", 1.0))
    assert GenerateRequest.from_dict(req.to_dict()) == req


def test_a_windows_like_path_keeps_its_colon_and_a_trailing_weight_is_read():
    req = GenerateRequest.create("x", limits=LIMITS, loras=["C:/loras/ink.safetensors", "C:/x.safetensors:0.5"])
    assert [(r.name, r.weight) for r in req.loras] == [("C:/loras/ink.safetensors", 1.0), ("C:/x.safetensors", 0.5)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a:10.5", "loras.0: LoRA weight 10.5 is out of range; allowed -10..10"),
        ([{"name": "a", "weight": float("nan")}], "LoRA weight must be a number -10..10"),
        ([{"name": "a", "weight": True}], "LoRA weight must be a number"),
        ("a, a:0.5", "LoRA 'a' is given twice"),
        (",".join(f"l{i}" for i in range(9)), "9 LoRAs given; allowed at most 8"),
        ([{"name": "a", "strength": 1}], "loras.0 must be {name, weight}"),
        ([{"name": "a\x00b"}], "contains control characters"),
        ([{"name": "x" * 256}], "1..255 characters"),
        (5, "loras must be a list"),
    ],
)
def test_bad_lora_lists_are_refused_naming_the_value(value, message):
    with pytest.raises(InvalidRequestError) as err:
        GenerateRequest.create("x", limits=LIMITS, loras=value)
    assert message in str(err.value)


def test_requests_with_different_lora_sets_do_not_combine():
    a = GenerateRequest.create("x", limits=LIMITS, seed=1, loras="a")
    b = GenerateRequest.create("y", limits=LIMITS, seed=2, loras="b")
    with pytest.raises(ValueError, match="LoRAs"):
        GenerateRequest.combine([a, b])
    assert GenerateRequest.combine([a, GenerateRequest.create("y", limits=LIMITS, seed=2, loras="a")]).loras == a.loras


def test_a_stored_request_from_before_loras_existed_reads_with_none():
    data = GenerateRequest.create("x", limits=LIMITS, seed=1).to_dict()
    del data["loras"]
    assert GenerateRequest.from_dict(data).loras == ()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"output_format": "gif"}, "output_format 'gif' is not one of png | webp | jpeg"),
        ({"output_format": "PNG"}, "output_format 'PNG' is not one of png | webp | jpeg"),
        ({"format": None}, "format None is not one of png | webp | jpeg"),  # named as the door named it
        (
            {"output_format": "webp", "output_compression": 101},
            "output_compression 101 is out of range; allowed 0..100",
        ),
        ({"output_format": "jpeg", "output_compression": -1}, "output_compression -1 is out of range; allowed 0..100"),
        ({"output_format": "jpeg", "output_compression": 50.0}, "output_compression must be a whole number, got 50.0"),
        ({"output_format": "jpeg", "output_compression": True}, "output_compression must be a whole number, got True"),
        ({"output_compression": 80}, "output_compression 80 applies to webp and jpeg only; png is lossless"),
    ],
)
def test_output_settings_are_refused_naming_the_value_and_what_is_allowed(fields, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        GenerateRequest.from_fields({"prompt": "a fox", **fields}, LIMITS)


def test_output_settings_round_trip_and_stay_out_of_batching():
    webp = GenerateRequest.from_fields({"prompt": "a", "format": "webp", "compression": "75", "seed": 1}, LIMITS)
    assert (webp.output_format, webp.output_compression) == ("webp", 75)  # CLI and batch text read as numbers
    png = GenerateRequest.create("b", limits=LIMITS, seed=2)
    assert (png.output_format, png.output_compression) == ("png", None)
    assert webp.shared() == png.shared()  # different formats still batch together
    assert GenerateRequest.combine([webp, png]).num_images == 2
    assert GenerateRequest.from_dict(webp.to_dict()) == webp
    stored = {k: v for k, v in png.to_dict().items() if k not in ("output_format", "output_compression")}
    assert GenerateRequest.from_dict(stored) == png  # a request stored before formats existed wrote PNGs


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"prompt": "a\udfff fox"}, "prompt", "prompt contains an unpaired surrogate (\\udfff at character 2)"),
        ({"prompt": ["a fox", "\ud800"]}, "prompt", "prompt contains an unpaired surrogate (\\ud800 at character 1)"),
        ({"prompt": "a fox \udcff"}, "prompt", "(\\udcff at character 7)"),  # the CLI's undecodable byte 0xff
        ({"negative_prompt": "blur\ud800"}, "negative_prompt", "negative_prompt contains an unpaired surrogate"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "\udfff"]}, "negative_prompt", "(\\udfff at character 1)"),
        ({"loras": "ink\ud800:0.5"}, "loras.0", "loras.0: LoRA name contains an unpaired surrogate (\\ud800"),
        ({"loras": ["a", {"name": "\udfff", "weight": 1}]}, "loras.1", "loras.1: LoRA name contains an unpaired"),
        ({"loras": [LoraRef("x\udfff")]}, "loras.0", "LoRA name contains an unpaired surrogate"),
    ],
)
def test_text_that_is_not_valid_unicode_is_refused_naming_the_field(fields, field, message):
    """A lone surrogate cannot be encoded as UTF-8: the job store, the metadata and the tokenizer
    would fail on it after the request was accepted."""
    fields = {"prompt": "a fox", **fields}
    with pytest.raises(FieldError) as info:
        GenerateRequest.create(fields.pop("prompt"), limits=LIMITS, **fields)
    assert info.value.field == field
    assert message in str(info.value) and "text must be valid UTF-8" in str(info.value)
    str(info.value).encode("utf-8")  # the message itself prints and serializes anywhere


def test_text_that_is_not_valid_unicode_is_refused_as_the_door_names_it():
    with pytest.raises(FieldError) as info:
        GenerateRequest.from_fields({"prompt": "a fox", "negative": "x\ud800"}, LIMITS)
    assert info.value.field == "negative"
    assert str(info.value).startswith("negative contains an unpaired surrogate (\\ud800 at character 2)")


def test_paired_and_astral_text_is_still_valid():
    req = GenerateRequest.create("a fox 🦊 \U0001f98a", limits=LIMITS, negative_prompt="é", loras="ü", seed=1)
    assert req.prompts == ("a fox 🦊 \U0001f98a",)


@pytest.mark.parametrize("field", ["seed", "steps", "width", "guidance_scale", "variation_seed"])
def test_a_number_of_thousands_of_digits_is_refused_by_name(field):
    # int() itself refuses over 4300 digits with an error of its own, which would not name the field.
    with pytest.raises(FieldError, match=field):
        GenerateRequest.from_fields({"prompt": "a fox", field: "9" * 5000}, LIMITS)
