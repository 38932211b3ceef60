"""The multipart doors (POST /v1/jobs as a form, POST /v1/images/edits) read a field as their JSON
siblings do: the same names and no aliases, one value for a scalar (a list field's `name[]` parts
alone are joined), UTF-8 text, and one reading of yes/no words. In process, no workers."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import numpy as np
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


def raw_form(api: TestClient, parts: list[tuple[list[str], bytes]], form_type: str = "", end: bytes = b"--b--\r\n"):
    """POST /v1/jobs a multipart body written by hand: each part its header lines and bytes."""
    heads = ["".join(f"{h}\r\n" for h in headers).encode() for headers, _ in parts]
    body = b"".join(b"--b\r\n" + head + b"\r\n" + data + b"\r\n" for head, (_, data) in zip(heads, parts, strict=True))
    content_type = f"multipart/form-data; boundary=b{form_type}"
    return api.post("/v1/jobs", content=body + end, headers={"content-type": content_type})


def text_part(name: str, data: bytes, content_type: str | None = None) -> tuple[list[str], bytes]:
    headers = [f'Content-Disposition: form-data; name="{name}"']
    return ([*headers, f"Content-Type: {content_type}"] if content_type else headers), data


SIZE_PARTS = [text_part("width", b"64"), text_part("height", b"64")]


def test_apache_httpclients_latin1_labelled_parts_are_read_in_latin1(api):
    """Apache HttpClient's `addTextBody` (4.x and 5.x) labels every text part, and 5.x the form
    too, ISO-8859-1: the bytes HttpClient 5.1.3 writes, headers as it writes them."""
    latin1 = "text/plain; charset=ISO-8859-1"
    parts = [text_part("prompt", b"a fox", latin1), text_part("negative_prompt", b"caf\xe9", latin1), *SIZE_PARTS]
    r = raw_form(api, parts, "; charset=ISO-8859-1")
    assert r.status_code == 202, r.text
    assert (r.json()["params"]["prompt"], r.json()["params"]["negative_prompt"]) == ("a fox", "caf\u00e9")
    headers = [*text_part("prompt", b"", latin1)[0], "Content-Transfer-Encoding: 8bit"]  # 4.x's STRICT mode
    r = raw_form(api, [(headers, b"a f\xf6x"), *SIZE_PARTS])
    assert r.status_code == 202, r.text
    assert r.json()["params"]["prompt"] == "a f\u00f6x"
    r = edit_form(api, ("prompt", (None, b"a f\xf6x", latin1)))
    assert r.status_code == 504, r.text  # accepted; no worker runs it here
    job_id = r.json()["error"]["message"].split()[1]
    assert api.get(f"/v1/jobs/{job_id}").json()["params"]["prompt"] == "a f\u00f6x"


def test_a_part_without_a_charset_is_read_in_the_forms(api):
    r = raw_form(api, [text_part("prompt", b"a f\xf6x"), *SIZE_PARTS], "; charset=latin-1")
    assert r.status_code == 202, r.text
    assert r.json()["params"]["prompt"] == "a f\u00f6x"
    utf8 = "text/plain; charset=utf-8"  # a part's own charset wins over the form's
    r = raw_form(api, [text_part("prompt", "a f\u00f6x".encode(), utf8), *SIZE_PARTS], "; charset=latin-1")
    assert r.json()["params"]["prompt"] == "a f\u00f6x"
    r = raw_form(api, [text_part("prompt", b"a \xff"), *SIZE_PARTS], "; charset=us-ascii")
    assert refused(r, "prompt") == "prompt is not valid us-ascii text (the charset the form declares): byte 3 is 0xff"


@pytest.mark.parametrize("charset", ["us-ascii", "utf-8", "UTF-16LE"])
def test_bytes_invalid_in_the_declared_charset_are_refused_by_name(api, charset):
    r = raw_form(api, [text_part("prompt", b"a \xff", f"text/plain; charset={charset}"), *SIZE_PARTS])
    message = refused(r, "prompt")
    assert message.startswith(f"prompt is not valid {charset} text (the charset its part declares): byte "), message


@pytest.mark.parametrize("charset", ["x-no-such-charset", "base64", "unicode_escape", '""', "utf-8\x00"])
def test_a_charset_python_does_not_read_as_text_is_refused_by_name(api, charset):
    r = raw_form(api, [text_part("prompt", b"a fox", f"text/plain; charset={charset}"), *SIZE_PARTS])
    name = charset.strip('"')
    assert refused(r, "prompt").startswith(f"prompt declares charset {name!r}, which this server does not know")
    r = raw_form(api, [text_part("prompt", b"a fox"), *SIZE_PARTS], f"; charset={charset}")
    assert refused(r, None).startswith(f"the form declares charset {name!r}, which this server does not know")


def test_text_a_charset_decodes_to_a_lone_surrogate_is_refused(api):
    r = edit_form(api, ("prompt", "a fox"), ("user", (None, b"+2AA-", "text/plain; charset=utf-7")))
    assert "user contains an unpaired surrogate (\\ud800 at character 1)" in refused(r, "user")


# --- the body itself ---------------------------------------------------------------------------------


def test_a_body_cut_before_its_closing_boundary_is_refused_not_read_short(api):
    """python-multipart ends a part only at the next boundary: the cut part would be lost."""
    parts = [text_part("prompt", b"a fox"), *SIZE_PARTS]
    for end in (b"", b'--b\r\nContent-Disposition: form-data; name="seed"\r\n\r\n7'):
        message = refused(raw_form(api, parts, end=end), None)
        assert message == "Invalid multipart data: the body ends before its closing boundary."
    assert raw_form(api, parts, end=b"--b--").status_code == 202  # no CRLF after the last boundary


def test_malformed_forms_are_400s_naming_what_is_wrong(api):
    r = api.post("/v1/jobs", content=b"x", headers={"content-type": "multipart/form-data"})
    assert refused(r, None) == "Missing boundary in multipart."
    r = raw_form(api, [(["Content-Disposition: form-data"], b"a fox")])
    assert refused(r, None) == 'The Content-Disposition header field "name" must be provided.'
    r = api.post("/v1/jobs", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=b"})
    assert refused(r, None).startswith("Invalid multipart data: ")
    r = raw_form(api, [text_part(f"f{i}", b"1") for i in range(257)])
    assert refused(r, None) == "Too many fields. Maximum number of fields is 256."


def test_an_image_fields_text_part_is_bounded_by_the_image_limit(tmp_path):
    with TestClient(in_process_app(tmp_path, max_input_bytes=3000)) as small:
        r = raw_form(small, [text_part("prompt", b"a fox"), text_part("image", b"a" * 4001), *SIZE_PARTS])
        assert refused(r, None) == "Part exceeded maximum size of 3KB."
        r = raw_form(small, [text_part("prompt", b"a fox"), text_part("image[]", b"a" * 4001), *SIZE_PARTS])
        assert refused(r, None) == "Part exceeded maximum size of 3KB."


def test_other_text_parts_are_bounded_by_the_body_limit_while_read(tmp_path, monkeypatch):
    """A 5 MB prompt is refused once its bytes pass the text limit, never held whole: the reader
    stops at the first chunk past it (413, as `check_body_size` answers a JSON body)."""
    from zturbo.serving import app as app_module

    held: list[int] = []
    extend = app_module._FormReader.on_part_data

    def on_part_data(self, data, start, end):
        extend(self, data, start, end)
        held.append(len(self.part.data))

    monkeypatch.setattr(app_module._FormReader, "on_part_data", on_part_data)
    with TestClient(in_process_app(tmp_path, max_body_bytes=100_000)) as small:
        r = raw_form(small, [text_part("prompt", b"a" * 5_000_000), *SIZE_PARTS])
        assert r.status_code == 413, r.text
        assert "this server accepts at most 100000" in r.json()["error"]["message"]
        assert max(held, default=0) <= 100_000
        held.clear()  # the limit is over all the text parts, not each
        parts = [text_part("prompt", b"a" * 60_000), text_part("negative_prompt", b"b" * 60_000), *SIZE_PARTS]
        assert raw_form(small, parts).status_code == 413
        r = raw_form(small, [text_part("prompt", b"a" * 90_000), *SIZE_PARTS])
        assert r.status_code == 400 and r.json()["error"]["field"] == "prompt", r.text  # read whole, then judged


def test_unknown_charset_names_are_not_cached_by_codecs(api):
    """`codecs.lookup` keeps every name it is asked in `encodings._cache`: a client's names never
    reach it unless a codec has them, and a long or odd one is refused by a truncated name."""
    import encodings

    before = len(encodings._cache)
    for i in range(50):
        charset = f"x-unknown-{i}-" + "z" * 3000 if i % 2 else f"x-unknown-{i}"
        r = raw_form(api, [text_part("prompt", b"a fox", f"text/plain; charset={charset}"), *SIZE_PARTS])
        assert refused(r, "prompt").startswith(f"prompt declares charset {charset[:40]!r}, which this server")
        r = raw_form(api, [text_part("prompt", b"a fox"), *SIZE_PARTS], f"; charset={charset}")
        assert refused(r, None).startswith(f"the form declares charset {charset[:40]!r}, which this server")
    assert len(encodings._cache) == before


def test_part_names_are_read_as_utf8_whatever_the_forms_charset(api):
    """A form's charset is its text's: `name="prompt"` in a UTF-16 form still names the prompt."""
    parts = [text_part("prompt", "a fox".encode("utf-16")), text_part("width", "64".encode("utf-16"))]
    r = raw_form(api, [*parts, text_part("height", "64".encode("utf-16"))], "; charset=utf-16")
    assert r.status_code == 202, r.text
    assert r.json()["params"]["prompt"] == "a fox"
    r = raw_form(api, [text_part("pr\u00f6mpt", "x".encode("utf-16")), *SIZE_PARTS], "; charset=utf-16")
    assert refused(r, "pr\u00f6mpt") == "pr\u00f6mpt is not a known field"  # the UTF-8 name, as sent


def test_a_file_part_past_the_memory_spool_arrives_whole(api):
    """A file part over 1 MiB spills to disk, as Starlette's UploadFile does; the job keeps its bytes."""
    noise = np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert len(data) > 1024 * 1024
    r = job_form(api, ("prompt", "a fox"), ("image", ("big.png", data, "image/png")))
    assert r.status_code == 202, r.text
    assert r.json()["params"]["inputs"]["images"]["image"]["sha256"] == hashlib.sha256(data).hexdigest()


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
