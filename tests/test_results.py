"""serving.results.Base64Body: the answers that carry image files in base64 are the JSON that
`json.dumps` would write with the base64 inline, whatever text the rest of the body holds."""

from __future__ import annotations

import base64
import json
import os

import pytest

from zturbo.serving.results import Base64Body


def test_each_slot_becomes_its_files_base64_in_the_json():
    files = Base64Body()
    blobs = [os.urandom(n) for n in (0, 1, 2, 3, 1000)]
    body = {"data": [{"b64_json": files.slot(b), "revised_prompt": None} for b in blobs], "n": 5, "ü": 'é\n"'}
    decoded = json.loads(files.render(body))
    assert [base64.b64decode(d["b64_json"]) for d in decoded["data"]] == blobs
    assert decoded["ü"] == 'é\n"' and decoded["n"] == 5
    expected = {**body, "data": [{"b64_json": base64.b64encode(b).decode(), "revised_prompt": None} for b in blobs]}
    assert decoded == expected


def test_a_client_text_shaped_like_a_slot_is_left_as_it_was():
    files = Base64Body()
    slot = files.slot(b"image bytes")
    nonce = slot.split(":")[0]
    guess = "0" * 32 + ":0"  # what a client could send: any nonce but this answer's
    body = {"images": [slot], "info": json.dumps({"prompt": guess}), "prompt": guess}
    decoded = json.loads(files.response(body).body)
    assert base64.b64decode(decoded["images"][0]) == b"image bytes"
    assert decoded["prompt"] == guess and json.loads(decoded["info"])["prompt"] == guess
    assert nonce != "0" * 32 and nonce not in json.dumps(decoded)


def test_a_slot_missing_from_the_body_is_an_error_not_a_silent_answer():
    files = Base64Body()
    files.slot(b"x")
    with pytest.raises(ValueError, match="slot 0 appears 0 times"):
        files.render({"images": []})
