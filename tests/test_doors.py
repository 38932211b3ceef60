"""Every door builds the same request: the CLI, batch rows, the HTTP API and the web UI accept and
refuse the same values, with the same messages, because one table and one validator decide."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serving import in_process_app
from zturbo import batch
from zturbo.cli import _given_options, build_parser
from zturbo.errors import InvalidRequestError
from zturbo.request import FIELDS, LIMITS, GenerateRequest, ModelLimits, field_for
from zturbo.serving import schemas, ui

MODEL = ModelLimits(spatial_unit=16, max_pixels=1024 * 1024)
BASE = {"prompt": "a fox", "width": 64, "height": 64}
NAN = float("nan")

# (the values over BASE, by their HTTP names; accepted?)
CASES: list[tuple[dict[str, Any], bool]] = [
    ({"steps": 0}, False),
    ({"steps": 1}, True),
    ({"steps": 100}, True),
    ({"steps": 101}, False),
    ({"n": 0}, False),
    ({"n": 1}, True),
    ({"n": 64}, True),
    ({"n": 65}, False),
    ({"guidance_scale": -1.0}, False),
    ({"guidance_scale": 0.0}, True),
    ({"guidance_scale": 30.0}, True),
    ({"guidance_scale": 31.0}, False),
    ({"guidance_scale": NAN}, False),
    ({"width": 15}, False),
    ({"width": 16}, True),
    ({"width": 1000}, False),
    ({"width": 1024}, True),
    ({"width": 2048, "height": 1024}, False),  # above the model's pixel limit
    ({"seed": -1}, False),
    ({"seed": 0}, True),
    ({"seed": 2**63 - 1}, True),
    ({"seed": 2**63}, False),
    ({"seed": 2**63 - 1, "n": 2}, False),  # the second image's seed would not fit
    ({"variation_strength": 1.5}, False),
    ({"variation_strength": 1.0}, True),
    ({"variety_until": 0.0}, False),
    ({"variety_until": 1.0}, True),
    ({"sampler": "dpm"}, False),  # an unknown field
    ({"prompt": "   "}, False),
    ({"prompt": "x" * 4001}, False),
    ({"prompt": "x" * 4000}, True),
    ({"negative_prompt": "x" * 4001}, False),
    # Input-image settings without their image: refused by the one check, whatever the door.
    ({"strength": 0.5}, False),
    ({"mask_padding": 4}, False),
    ({"control_scale": 0.5}, False),
    ({"outpaint": "0,16,0,0"}, False),
    ({"resize": "zoom"}, False),
    ({"resize": "crop"}, False),  # a valid word, but nothing to fit: text-to-image has no input image
]
IDS = [",".join(f"{k}={str(v)[:12]}" for k, v in change.items()) for change, _ in CASES]


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> TestClient:
    return TestClient(in_process_app(tmp_path_factory.mktemp("doors"), MODEL, queue_size=10_000))


def cli_door(values: dict[str, Any]) -> str | None:
    """None if `zturbo generate` would run these values, else why not (no model is loaded)."""
    argv = ["generate", values["prompt"]]
    for name, value in values.items():
        f = field_for(name)
        if name != "prompt":
            argv += [f.flag if f is not None else f"--{name}", str(value)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        return "the parser refused it"
    try:
        GenerateRequest.create(limits=MODEL, prompt=args.prompt, **_given_options(args))
    except InvalidRequestError as e:
        return str(e)
    return None


def batch_door(values: dict[str, Any]) -> str | None:
    """None if a CSV row of these values (all text) would run, else the row's error."""
    row = batch._typed_row(2, {name: str(value) for name, value in values.items()})
    if row.error is not None:
        return row.error
    try:
        GenerateRequest.create(limits=MODEL, **row.params)
    except InvalidRequestError as e:
        return str(e)
    return None


def api_door(api: TestClient, body: dict[str, Any]) -> str | None:
    # Python's JSON (the server's parser too) carries NaN, which strict encoders refuse to send.
    r = api.post("/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (202, 400), r.text
    return None if r.status_code == 202 else r.json()["error"]["message"]


FORM_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "n",
               "variation_seed", "variation_strength", "variety")  # fmt: skip


def ui_door(api: TestClient, values: dict[str, Any]) -> str | None:
    """The form's values through `ui.job_params`, then the same POST the page makes."""
    form = {"negative_prompt": "", "steps": 8, "guidance_scale": 0.0, "seed": 1, "n": 1, "variation_seed": -1,
            "variation_strength": 0.0, "variety": 0.0, **values}  # fmt: skip
    try:
        body = ui.job_params(*(form[name] for name in FORM_FIELDS))
    except ui.FormError as e:
        return str(e)
    return api_door(api, body)


@pytest.mark.parametrize(("change", "accepted"), CASES, ids=IDS)
def test_cli_batch_api_and_ui_accept_and_refuse_the_same_values(api, change, accepted):
    values = {**BASE, **change}
    cli, rows, http = cli_door(values), batch_door(values), api_door(api, values)
    assert (cli is None, rows is None, http is None) == (accepted,) * 3, (cli, rows, http)
    if not accepted and "sampler" not in change:
        # One validator: the same sentence, naming the field as each door calls it.
        assert http == cli.replace("batch", "n"), (http, cli)
        assert rows == cli
    if set(change) <= set(FORM_FIELDS) and change.get("seed") != -1:
        assert ui_door(api, values) == http
    # The form has no variety_until field and no way to send an unknown one.


# (the CLI's --lora values, the same LoRAs as an HTTP body's list, the message both give)
LORA_CASES = [
    (["a.safetensors:11"], [{"name": "a.safetensors", "weight": 11}], "loras.0: LoRA weight 11.0 is out of range"),
    (["a:1", "b", "a:0.5"], [{"name": "a"}, {"name": "b"}, {"name": "a", "weight": 0.5}], "LoRA 'a' is given twice"),
    ([f"l{i}" for i in range(9)], [{"name": f"l{i}"} for i in range(9)], "9 LoRAs given; allowed at most 8"),
]


@pytest.mark.parametrize(("flags", "body", "message"), LORA_CASES, ids=["weight", "twice", "too-many"])
def test_cli_api_and_ui_refuse_the_same_lora_lists(api, flags, body, message):
    argv = ["generate", "a fox", *(arg for flag in flags for arg in ("--lora", flag))]
    args = build_parser().parse_args(argv)
    with pytest.raises(InvalidRequestError) as cli:
        GenerateRequest.create(limits=MODEL, prompt=args.prompt, **_given_options(args))
    http = api_door(api, {**BASE, "loras": body})
    assert message in str(cli.value) and http == str(cli.value)
    pairs = [(ref["name"], float(ref.get("weight", 1.0))) for ref in body]
    assert api_door(api, ui.job_params("a fox", "", 64, 64, 8, 0.0, 1, 1, loras=pairs)) == http


def test_a_well_formed_lora_list_goes_on_to_the_servers_lora_directory(api):
    """The form is the validator's; whether a file exists is the LoRA library's (a 400 of its own)."""
    r = api.post("/v1/jobs", json={**BASE, "loras": [{"name": "nowhere.safetensors", "weight": 0.5}]})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_lora" and r.json()["error"]["field"] == "loras.0"
    assert "no LoRA named 'nowhere.safetensors'" in r.json()["error"]["message"]
    r = api.post("/v1/jobs", json={**BASE, "loras": [{"name": "x", "weight": "0.5"}]})
    assert r.json()["error"]["field"] == "loras.0.weight"  # JSON types: the body's schema


def test_the_form_sends_seed_minus_one_as_random(api):
    """The form's one convention: -1 in a seed field asks for a random seed (as in A1111)."""
    body = ui.job_params("a fox", "", 64, 64, 8, 0.0, -1, 1, -1, 0.2, 0.0)
    assert (body["seed"], body["variation_seed"]) == (None, None)
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 202
    assert isinstance(r.json()["params"]["seed"], int) and isinstance(r.json()["params"]["variation_seed"], int)


def test_openai_route_names_its_own_fields(api):
    r = api.post("/v1/images/generations", json={"prompt": "a fox", "size": "1000x64"})
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "size" and "1000 is not a multiple of 16" in r.json()["error"]["message"]
    r = api.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "n": 65})
    assert r.status_code == 400
    assert r.json()["error"] == {"type": "invalid_request", "message": "n 65 is out of range; allowed 1..64",
                                 "field": "n"}  # fmt: skip


def test_aliases_from_a1111_and_openai_name_the_same_fields():
    req = GenerateRequest.from_fields(
        {"prompt": "a fox", "cfg_scale": "2.5", "batch_size": 2, "subseed": 7, "subseed_strength": 0.5,
         "Negative prompt": "blur", "Steps": "4", "size": "64x32"},
        MODEL,
    )  # fmt: skip
    assert (req.guidance_scale, req.batch, req.steps, req.width, req.height) == (2.5, 2, 4, 64, 32)
    assert [s.variation_seed for s in req.images] == [7, 8] and req.negative_prompts == ("blur",)
    with pytest.raises(InvalidRequestError, match="unknown field 'sampler'; allowed: prompt, negative_prompt"):
        GenerateRequest.from_fields({"prompt": "a fox", "sampler": "dpm"}, MODEL)
    with pytest.raises(InvalidRequestError, match="guidance_scale is given twice"):
        GenerateRequest.from_fields({"prompt": "a fox", "guidance": 1, "cfg_scale": 2}, MODEL)


# --- the table is the only place limits live ----------------------------------------------------------

SRC = Path(__file__).resolve().parents[1] / "src" / "zturbo"
DOORS = ("cli.py", "serving/app.py", "serving/schemas.py", "serving/ui.py", "serving/ui_app.py")


@pytest.mark.parametrize("path", DOORS)
def test_no_door_defines_a_limit_of_its_own(path):
    tree = ast.parse((SRC / path).read_text())
    names = [
        target.id
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    ]
    limits = [n for n in names if any(part in ("MAX", "MIN", "UNIT", "LIMIT", "LIMITS") for part in n.split("_"))]
    assert limits == [], f"{path} defines its own limits: {limits}"


@pytest.mark.parametrize("body", [schemas.JobBody, schemas.OpenAIImageBody])
def test_http_bodies_mirror_the_table_and_check_types_only(body):
    table = {f.api_name for f in FIELDS}
    fields = set(body.model_fields)
    if body is schemas.OpenAIImageBody:
        assert fields == table - {"width", "height"} | {"size", "model", "response_format", "user"}
    else:
        assert fields == table | schemas.JOB_FIELDS
    constraints = {"Ge", "Le", "Gt", "Lt", "MinLen", "MaxLen", "Interval", "Len", "MultipleOf"}
    for name in table & fields:
        info = body.model_fields[name]
        assert not [m for m in info.metadata if type(m).__name__ in constraints], name
    # The table's limits are documented in the schema all the same.
    schema = body.model_json_schema()["properties"]
    assert (schema["steps"]["minimum"], schema["steps"]["maximum"]) == LIMITS.steps
    assert schema["n"]["maximum"] == LIMITS.images[1] and schema["prompt"]["maxLength"] == LIMITS.prompt_chars


def test_status_reports_the_table_limits(api):
    limits = api.get("/v1/status").json()["limits"]
    assert limits["max_steps"] == LIMITS.steps[1] and limits["max_images"] == LIMITS.images[1]
    assert limits["max_guidance"] == LIMITS.guidance[1] and limits["max_prompt_chars"] == LIMITS.prompt_chars
    assert (limits["spatial_unit"], limits["max_pixels"]) == (MODEL.spatial_unit, MODEL.max_pixels)


def test_ui_ranges_and_cli_help_come_from_the_table():
    assert ui.RANGES["steps"] == LIMITS.steps and ui.RANGES["n"] == LIMITS.images
    assert ui.RANGES["guidance_scale"] == LIMITS.guidance
    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()  # type: ignore[union-attr]
    for f in FIELDS:
        if f.flag is not None:
            assert f.flag in text, f.flag
    assert not math.isnan(LIMITS.guidance[1])


def test_outpaint_margins_as_text_or_a_list_are_refused_alike():
    """A batch cell or a form field sends the margins as text, a JSON body as a list: one message."""
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    messages = []
    for margins in ("-16,0,0,0", [-16, 0, 0, 0]):
        with pytest.raises(InvalidRequestError) as refused:
            GenerateRequest.from_fields({"prompt": "a fox", "image": png.getvalue(), "outpaint": margins}, MODEL)
        messages.append(str(refused.value))
    assert messages[0] == messages[1] == "outpaint [-16, 0, 0, 0]: each side must be 0..2048 pixels"
