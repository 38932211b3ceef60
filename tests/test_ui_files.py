"""The web UI's files in process (no browser): what a page without the key can reach under /ui, the
session pass that opens the UI's files and uploads, where the UI's copies of images live and when
they go, the bounds on uploads, and a History whose PNG is missing. The handlers reach the API
through a TestClient of the same app."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from serving import SMALL, in_process_app
from zturbo.serving import jobs
from zturbo.serving.apiclient import ApiClient

KEY = "ui-files-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Ui:
    http: TestClient
    handlers: Any
    root: Path  # the UI's folder in the data directory
    service: Any
    service_app: Any


def _mount(monkeypatch: pytest.MonkeyPatch, data_dir: Path, **settings: Any) -> tuple[Any, TestClient]:
    from zturbo.serving import ui_app

    app = in_process_app(data_dir, **settings)
    http = TestClient(app)
    monkeypatch.setenv("GRADIO_TEMP_DIR", "")  # mount points it at the data directory; undone after the test
    monkeypatch.setattr(ui_app, "ApiClient", lambda base: _InProcess(base, http))
    ui_app.mount(app, "http://testserver")
    return app, http


class _InProcess(ApiClient):
    """The UI's API client, calling the app in this process (TestClient is an httpx.Client)."""

    def __init__(self, base_url: str, http: TestClient):
        super().__init__(base_url)
        self._http = http


def _handlers(app: Any) -> Any:
    [mounted] = [r for r in app.routes if getattr(r, "path", "") == "/ui"]
    fns = mounted.app.get_blocks().fns.values()
    return next(f.fn.__self__ for f in fns if getattr(f.fn, "__name__", "") == "history")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    """One server with a key and its UI mounted, in process (no lifespan: no workers, no Gradio queue)."""
    monkeypatch = pytest.MonkeyPatch()
    data_dir = tmp_path_factory.mktemp("ui-files") / "data"
    app, http = _mount(monkeypatch, data_dir, api_key=KEY)
    yield Ui(http, _handlers(app), data_dir / "ui-files", app.state.service, app)
    monkeypatch.undo()


def _png(prompt: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: 2, CFG scale: 0, Seed: 1, Size: 16x16")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "teal").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _finished(ui: Ui, prompt: str, **inputs: Any) -> tuple[str, str]:
    """A succeeded job of one image whose PNG (holding the prompt) is on disk: (job id, image id)."""
    r = ui.http.post("/v1/jobs", json={"prompt": prompt, **SMALL, **inputs}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = r.json()
    store = ui.service.store
    while (claim := store.claim("w-test")) is not None and claim.job_id != job["id"]:
        store.end(claim, jobs.CANCELLED)
    image_id = f"{job['id']}-img"
    (ui.service.images_dir / f"{job['id']}-0.png").write_bytes(_png(prompt))
    assert store.succeed(claim, [jobs.ImageRef(image_id, 0, 1, f"{job['id']}-0.png")])
    return job["id"], image_id


def _pass(ui: Ui) -> dict[str, str]:
    """The Cookie header of a page that typed the right key."""
    from zturbo.serving.ui_app import PASS_COOKIE

    key, _box, _status, _row, ui_pass = ui.handlers.use_key(KEY)
    assert key == KEY and ui_pass
    return {"Cookie": f"{PASS_COOKIE}={ui_pass}"}


def _uploads(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "images" not in p.relative_to(root).parts)


def _upload(ui: Ui, data: bytes, headers: dict[str, str]) -> Any:
    return ui.http.post("/ui/gradio_api/upload", files={"files": ("drop.png", data, "image/png")}, headers=headers)


def test_without_the_key_the_page_loads_but_no_file_upload_or_handler_call(ui: Ui) -> None:
    for path in ("/ui/", "/ui/config", "/ui/theme.css"):
        assert ui.http.get(path).status_code == 200, path  # the page, so the user can type the key
    _finished(ui, "an anonymous owl")
    [record] = ui.handlers.history(KEY, "anonymous owl")[2]

    r = _upload(ui, _png("planted"), {})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"], r.text
    assert _uploads(ui.root) == []
    for route in ("/ui/gradio_api/file=", "/ui/file=", "/ui/gradio_api/file/", "/ui//gradio_api/file="):
        assert ui.http.get(f"{route}{record['path']}").status_code == 401, route
    assert ui.http.post("/ui/gradio_api/call/history", json={"data": [KEY, ""]}).status_code == 401
    forged = {"Cookie": "zturbo_ui_pass=forged"}
    assert ui.http.get(f"/ui/gradio_api/file={record['path']}", headers=forged).status_code == 401


def test_the_right_key_gives_a_pass_that_opens_files_and_uploads(ui: Ui) -> None:
    assert ui.handlers.use_key("wrong")[-1] == ""  # a refused key gets no pass
    headers = _pass(ui)
    r = _upload(ui, _png("a dropped png"), headers)
    assert r.status_code == 200, r.text
    [stored] = r.json()
    assert Path(stored).is_relative_to(ui.root)
    assert ui.http.get(f"/ui/gradio_api/file={stored}", headers=headers).content == _png("a dropped png")


def test_the_uis_one_copy_of_an_image_lives_in_the_data_directory_and_goes_with_its_job(ui: Ui) -> None:
    import gradio as gr
    from gradio.processing_utils import move_files_to_cache

    headers = _pass(ui)
    job_id, image_id = _finished(ui, "a deleted heron")
    [record] = ui.handlers.history(KEY, "deleted heron")[2]
    path = Path(record["path"])
    assert path.is_relative_to(ui.root) and path.read_bytes() == _png("a deleted heron")
    # Gradio serves the copy in place: no second copy in its cache.
    gallery = gr.Gallery()
    served = move_files_to_cache(gallery.postprocess([(str(path), "c")]), gallery, postprocess=True)
    assert served[0]["image"]["path"] == str(path)
    assert ui.http.get(f"/ui/gradio_api/file={path}", headers=headers).content == _png("a deleted heron")

    assert ui.http.delete(f"/v1/history/{job_id}", headers=AUTH).status_code == 204  # any client's delete
    assert not path.exists()
    assert [p for p in ui.root.rglob("*") if image_id in p.name] == []
    assert ui.http.get(f"/ui/gradio_api/file={path}", headers=headers).status_code == 403


def test_uploads_are_bounded_in_size_and_count(ui: Ui) -> None:
    from zturbo.serving.ui_app import UPLOADS_KEPT

    headers = _pass(ui)
    most = ui.service.settings.max_upload_bytes
    big = {**headers, "Content-Length": str(most + 1), "Content-Type": "multipart/form-data; boundary=x"}
    r = ui.http.post("/ui/gradio_api/upload", content=b"--x--", headers=big)
    assert r.status_code == 413 and str(most) in r.json()["error"]["message"], r.text
    r = ui.http.post("/ui/gradio_api/upload", content=iter([b"--x--"]), headers=big | {"Content-Length": ""})
    assert r.status_code == 411, r.text
    assert ui.http.post("/ui/gradio_api/queue/join", content=b"{" * (2 << 20)).status_code == 413  # open, but bounded

    for i in range(UPLOADS_KEPT + 2):
        assert _upload(ui, _png(f"upload {i}"), headers).status_code == 200
    kept = _uploads(ui.root)
    assert len(kept) == UPLOADS_KEPT
    assert _png(f"upload {UPLOADS_KEPT + 1}") in [p.read_bytes() for p in kept]  # the newest stay


def test_painting_a_mask_never_pushes_the_input_image_out_of_the_uploads(ui: Ui) -> None:
    """The mask editor uploads its canvas (background, composite, a layer) several times a stroke:
    those uploads are kept apart from the page's own, the newest of each kept, so a long painting
    leaves the input image it paints on in place."""
    from zturbo.serving.ui_app import EDITOR_UPLOADS_KEPT, UPLOADS_KEPT

    headers = _pass(ui)
    photo = os.urandom(2 << 20)  # a photo past the 1 MiB the rest of /ui may send; uploads take 64 MiB
    r = ui.http.post("/ui/gradio_api/upload", files={"files": ("photo.jpg", photo, "image/jpeg")}, headers=headers)
    assert r.status_code == 200, r.text
    [stored] = r.json()
    for stroke in range(EDITOR_UPLOADS_KEPT):
        for name in ("background.png", "composite.png", "layer_0.png"):
            canvas = {"files": (name, f"{name} of save {stroke}".encode(), "image/png")}
            assert ui.http.post("/ui/gradio_api/upload", files=canvas, headers=headers).status_code == 200
    assert Path(stored).read_bytes() == photo
    editor = [data for p in _uploads(ui.root) if b" of save " in (data := p.read_bytes())]
    assert len(editor) == EDITOR_UPLOADS_KEPT
    assert b"layer_0.png of save %d" % (EDITOR_UPLOADS_KEPT - 1) in editor  # the newest stay

    for i in range(UPLOADS_KEPT):  # the page's own uploads still count among themselves
        assert _upload(ui, _png(f"later {i}"), headers).status_code == 200
    assert not Path(stored).exists()


def test_history_lists_the_rest_and_marks_an_image_without_a_file(ui: Ui) -> None:
    kept, _ = _finished(ui, "history-missing kept")
    broken, _ = _finished(ui, "history-missing broken")
    (ui.service.images_dir / f"{broken}-0.png").unlink()

    info, gallery, records, *_ = ui.handlers.history(KEY, "history-missing")
    assert [r["job"]["id"] for r in records] == [broken, kept]
    assert "2 image(s)" in info and "1 image(s) have no file any more" in info, info
    assert gallery[0][1].endswith("file missing") and Path(gallery[0][0]).is_file()
    assert records[0]["missing"] and not records[1]["missing"]

    text, selected, *_ = ui.handlers.select_history(KEY, records, _Select(0))
    assert broken in text and "no file" in text
    info, gallery, records, *_ = ui.handlers.delete_job(KEY, selected, "history-missing")
    assert [r["job"]["id"] for r in records] == [kept]


@dataclass
class _Select:
    index: int


def test_a_job_made_from_images_shows_its_inputs_and_reuse_fills_them_in(ui: Ui) -> None:
    """History shows the input images (fetched once from the API, kept with the job's images, gone
    with the job) and Reuse puts them back in the form: the image, its mask as the editor's layer."""
    photo = io.BytesIO()
    Image.new("RGB", (64, 64), "navy").save(photo, format="JPEG")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 16))
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")
    encoded = {k: base64.b64encode(v.getvalue()).decode() for k, v in {"image": photo, "mask": mask_png}.items()}
    job_id, _ = _finished(ui, "history-inputs heron", **encoded, strength=0.7)
    [record] = ui.handlers.history(KEY, "history-inputs")[2]
    text, job, _reuse, _delete, thumbnails = ui.handlers.select_history(KEY, [record], _Select(0))
    assert "- **Mode:** inpaint" in text and "- **Strength:** 0.7" in text
    [(image_path, image_label), (mask_path, mask_label)] = thumbnails["value"]
    assert (image_label, mask_label) == ("input image", "mask") and thumbnails["visible"]
    assert Path(image_path).read_bytes() == photo.getvalue() and image_path.endswith(".jpg")  # as uploaded
    assert Path(image_path).is_relative_to(ui.root / "images" / job_id)

    _tab, message, *fills = ui.handlers.reuse_job(KEY, job)
    from zturbo.serving.ui import FORM_KEYS

    values = dict(zip(FORM_KEYS, fills, strict=False))
    assert values["image"] == image_path and values["strength"] == 0.7 and values["strength_default"] is False
    editor = values["mask_editor"]
    assert editor["visible"] and editor["value"]["background"] == image_path
    [layer] = editor["value"]["layers"]
    assert layer.size == (64, 64) and layer.getchannel("A").getbbox() == (0, 0, 32, 16)
    assert "could not" not in message and "add them" not in message

    assert ui.http.delete(f"/v1/history/{job_id}", headers=AUTH).status_code == 204
    assert not Path(image_path).exists() and not Path(mask_path).exists()


def test_the_ui_folder_is_emptied_when_the_server_starts_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "data" / "ui-files" / "images" / "oldjob" / "zturbo-1-old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(_png("left by a previous run"))
    _, http = _mount(monkeypatch, tmp_path / "data")  # no key: nothing to pass
    assert not stale.exists()
    with http:
        r = http.post("/ui/gradio_api/upload", files={"files": ("a.png", _png("x"), "image/png")})
        assert r.status_code == 200 and Path(r.json()[0]).is_file()
    assert not (tmp_path / "data" / "ui-files").exists()


def _fn_index(ui: Ui, name: str) -> int:
    [mounted] = [r for r in ui.service_app.routes if getattr(r, "path", "") == "/ui"]
    return next(i for i, f in mounted.app.get_blocks().fns.items() if getattr(f, "name", None) == name)


def test_without_the_key_the_queue_runs_only_the_handlers_the_page_needs_first(ui: Ui) -> None:
    # A handler with a file input makes Gradio fetch and store the file before the handler runs:
    # a URL there would be downloaded by the server for anyone.
    planted = {"path": "https://example.invalid/x.png", "meta": {"_type": "gradio.FileData"}}
    body = {"data": [planted], "fn_index": _fn_index(ui, "read_png"), "session_hash": "s1", "trigger_id": 1}
    before = _uploads(ui.root)
    r = ui.http.post("/ui/gradio_api/queue/join", json=body)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"], r.text
    assert _uploads(ui.root) == before
    json_type = {"Content-Type": "application/json"}
    assert ui.http.post("/ui/gradio_api/queue/join", content=b"not json", headers=json_type).status_code == 401
    status = {"data": [None], "fn_index": _fn_index(ui, "status"), "session_hash": "s1", "trigger_id": 1}
    assert ui.http.post("/ui/gradio_api/queue/join", json=status).status_code != 401
    assert ui.http.post("/ui/gradio_api/queue/join", json=body, headers=_pass(ui)).status_code != 401


def test_an_image_fetched_while_its_job_is_deleted_is_not_written_back(tmp_path: Path) -> None:
    from zturbo.serving.apiclient import ApiError
    from zturbo.serving.ui_app import _UiFiles

    class Slow:
        """The API's answer arrives after the job was deleted."""

        def image(self, image_id: str, key: str | None) -> bytes:
            files.forget_job("job1")
            return _png("a deleted prompt")

    files = _UiFiles(tmp_path / "ui-files", Slow())  # type: ignore[arg-type]
    files.reset()
    with pytest.raises(ApiError, match="deleted"):
        files.image("job1", {"id": "img1", "seed": 1}, KEY)
    assert list((tmp_path / "ui-files").rglob("*.png")) == []
