"""The multipart doors (POST /v1/jobs as a form, POST /v1/images/edits) read a field as their JSON
siblings do: the same names and no aliases, one value for a scalar (a list field's `name[]` parts
alone are joined), UTF-8 text, and one reading of yes/no words. In process, no workers."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving import in_process_app
from zturbo.request import FIELDS
from zturbo.serving.schemas import JobBody, OpenAIImageBody

SIZE = (("width", "64"), ("height", "64"))


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[TestClient]:
    with TestClient(in_process_app(tmp_path_factory.mktemp("forms"), sync_timeout=0.2)) as client:
        yield client


def png(color: str = "teal") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def form(*parts: tuple[str, str | bytes | tuple]) -> list[tuple[str, tuple]]:
    """Multipart parts in order (text parts have no filename; a tuple is a part as httpx takes it)."""
    return [(k, v if isinstance(v, tuple) else (None, v.encode() if isinstance(v, str) else v)) for k, v in parts]


def image_part() -> tuple[str, tuple]:
    return ("image", ("photo.png", png(), "image/png"))


def refused(r, field: str | None) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["field"]) == ("invalid_request", field), error
    return error["message"]


def job_form(api: TestClient, *parts: tuple[str, str | bytes | tuple]):
    return api.post("/v1/jobs", files=form(*parts))


def edit_form(api: TestClient, *parts: tuple[str, str | bytes | tuple]):
    return api.post("/v1/images/edits", files=[*form(*parts), image_part()])


# --- a scalar takes one part ----------------------------------------------------------------------


SCALAR_TWICE = [
    (("prompt[]", "a fox"), ("prompt[]", "a cat")),
    (("prompt", "a fox"), ("prompt", "a cat")),
    (("prompt", "a fox"), ("prompt[]", "a cat")),
    (("prompt", "a fox"), ("negative_prompt[]", "blur"), ("negative_prompt[]", "noise")),
    (("prompt", "a fox"), ("steps[]", "2"), ("steps[]", "3")),
]


@pytest.mark.parametrize("parts", SCALAR_TWICE, ids=["prompt[]", "prompt", "mixed", "negative_prompt[]", "steps[]"])
def test_a_scalar_given_twice_is_refused_never_joined(api, parts):
    """JSON takes one string for a prompt; comma-joining two would make a prompt no one sent."""
    name = parts[-1][0].removesuffix("[]")
    assert refused(job_form(api, *parts, *SIZE), name) == f"{name} is given more than once"
    assert refused(edit_form(api, *parts), name) == f"{name} is given more than once"


def test_one_name_part_is_the_value_and_list_fields_still_join(api):
    r = job_form(api, ("prompt[]", "a fox"), ("seeds[]", "7"), ("seeds[]", "3"), *SIZE)
    assert r.status_code == 202, r.text
    assert (r.json()["params"]["prompt"], r.json()["params"]["seeds"]) == ("a fox", [7, 3])
    r = job_form(api, ("prompt", "a fox"), ("seeds", "7"), ("seeds[]", "3"), *SIZE)
    assert refused(r, "seeds") == "seeds is given more than once"  # a list is `name[]` parts alone


# --- text parts are UTF-8 ---------------------------------------------------------------------------


def test_text_that_is_not_utf8_is_refused_not_read_as_latin1(api):
    """Starlette's parser would read b"a \\xff" as "a ÿ"."""
    message = refused(job_form(api, ("prompt", b"a \xff"), *SIZE), "prompt")
    assert message.startswith("prompt is not valid UTF-8 text: byte 3 is 0xff")
    assert "negative_prompt is not valid UTF-8 text" in refused(
        edit_form(api, ("prompt", "a fox"), ("negative_prompt", b"\xe9t\xe9")), "negative_prompt"
    )


def test_utf8_text_is_read_as_sent(api):
    text = "a f\u00f6x, \u72d0\u72f8"
    r = job_form(api, ("prompt", (None, text.encode(), "text/plain; charset=UTF-8")), *SIZE)
    assert r.status_code == 202, r.text
    assert r.json()["params"]["prompt"] == text


def test_a_declared_charset_other_than_utf8_is_refused_rather_than_converted(api):
    latin1 = (None, "a f\u00f6x".encode("latin-1"), "text/plain; charset=iso-8859-1")
    assert "prompt declares charset 'iso-8859-1'" in refused(job_form(api, ("prompt", latin1), *SIZE), "prompt")
    body = b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na fox\r\n--b--\r\n'
    headers = {"content-type": "multipart/form-data; boundary=b; charset=latin-1"}
    r = api.post("/v1/jobs", content=body, headers=headers)
    assert "the form declares charset 'latin-1'" in refused(r, None)
    headers = {"content-type": "multipart/form-data; boundary=b; charset=utf-8"}
    assert api.post("/v1/jobs", content=body, headers=headers).status_code == 202


# --- the JSON sibling's names, no aliases ----------------------------------------------------------

# Every other name the request table knows a field by (A1111's, OpenAI's, the CLI's short forms).
JOB_ALIASES = sorted({a for f in FIELDS for a in (f.name, *f.aliases)} - set(JobBody.model_fields) | {"size"})
EDIT_ALIASES = sorted(
    {a for f in FIELDS for a in (f.name, *f.aliases)} - set(OpenAIImageBody.model_fields) | {"preview"}
)


@pytest.mark.parametrize("name", JOB_ALIASES)
def test_a_job_form_takes_the_json_bodys_names_only(api, name):
    value = "2"
    by_json = api.post("/v1/jobs", json={"prompt": "a fox", "width": 64, "height": 64, name: value})
    by_form = job_form(api, ("prompt", "a fox"), *SIZE, (name, value))
    assert refused(by_form, name) == refused(by_json, name) == f"{name} is not a known field"


@pytest.mark.parametrize("name", EDIT_ALIASES)
def test_an_edit_form_takes_the_generation_bodys_names_only(api, name):
    by_json = api.post("/v1/images/generations", json={"prompt": "a fox", name: "2"})
    by_form = edit_form(api, ("prompt", "a fox"), (name, "2"))
    assert refused(by_form, name) == refused(by_json, name) == f"{name} is not a known field"


def test_the_reviewers_cases_are_refused_as_json_refuses_them(api):
    assert refused(job_form(api, ("prompt", "a fox"), *SIZE, ("cfg_scale", "2")), "cfg_scale")
    assert refused(job_form(api, ("prompt", "a fox"), *SIZE, ("batch_size", "2")), "batch_size")
    assert refused(edit_form(api, ("prompt", "a fox"), ("width", "128")), "width")
    r = job_form(api, ("prompt", "a fox"), *SIZE, ("n", "2"), ("guidance_scale", "2"))
    assert r.status_code == 202, r.text
    assert (r.json()["params"]["n"], r.json()["params"]["guidance_scale"]) == (2, 2.0)


# --- one reading of yes/no words ---------------------------------------------------------------------


@pytest.mark.parametrize(("word", "meaning"), [("yes", True), ("on", True), ("1", True), ("no", False),
                                               ("off", False), ("FALSE", False)])  # fmt: skip
def test_preview_reads_yes_no_words_as_paste_back_does(api, word, meaning):
    r = job_form(api, ("prompt", "a fox"), *SIZE, ("preview", word))
    assert r.status_code == 202, r.text
    assert api.app.state.service.store.get(r.json()["id"]).preview is meaning
    mask = ("mask", ("mask.png", png("white"), "image/png"))
    r = job_form(api, ("prompt", "a fox"), image_part(), mask, ("paste_back", word))
    assert r.status_code == 202, r.text
    assert r.json()["params"]["inputs"]["paste_back"] is meaning


def test_a_word_neither_yes_nor_no_is_refused_for_both(api):
    assert "'maybe'" in refused(job_form(api, ("prompt", "a fox"), *SIZE, ("preview", "maybe")), "preview")
    r = job_form(api, ("prompt", "a fox"), image_part(), ("paste_back", "maybe"))
    assert "'maybe'" in refused(r, "paste_back")
