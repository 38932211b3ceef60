"""ModelScope as a model source: a fake local ModelScope cache, resolved through the modelscope
library itself (offline, or with the network call replaced where a test needs ModelScope
unreachable or a repo missing), the errors, ZTURBO_MODEL_SOURCE and the recorded source."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clirun import run
from zturbo.errors import InvalidRequestError, ModelNotFoundError
from zturbo.loader import resolve_model
from zturbo.modelscope_source import INSTALL_HINT

REPO = "Tongyi-MAI/Z-Image-Turbo"


def _fake_cache(root: Path, model_dir: Path, *, legacy: bool = False) -> Path:
    """`model_dir` laid out as modelscope stores a download: <cache>/models/<owner>--<name>/snapshots/
    master/ (modelscope >= 1.38), or <cache>/models/<owner>/<name> (the layout older releases wrote,
    which the library still reads)."""
    owner, name = REPO.split("/")
    if legacy:
        snapshot = root / "models" / owner / name
    else:
        snapshot = root / "models" / f"{owner}--{name}" / "snapshots" / "master"
    shutil.copytree(model_dir, snapshot)
    return snapshot


@pytest.fixture
def ms_env(monkeypatch, tmp_path):
    """An empty ModelScope cache of this test's own, and no offline switch set."""
    pytest.importorskip("modelscope")
    import modelscope_hub.config

    cache = tmp_path / "modelscope"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    # The library reads MODELSCOPE_CACHE once per process, into a default config it keeps.
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ZTURBO_MODEL_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    return cache


def _replace_network(monkeypatch, error: BaseException) -> None:
    """The library's snapshot_download with its network path raising `error`; its cache lookup
    (local_files_only=True) stays the library's own."""
    module = sys.modules["modelscope.hub.snapshot_download"]
    real = module.snapshot_download

    def snapshot_download(*args, **kwargs):
        if kwargs.get("local_files_only"):
            return real(*args, **kwargs)
        raise error

    monkeypatch.setattr(module, "snapshot_download", snapshot_download)


@pytest.mark.parametrize("legacy", [False, True], ids=["cache-layout", "legacy-layout"])
def test_modelscope_repo_resolves_from_the_local_cache_offline(ms_env, monkeypatch, tiny_dir, legacy):
    snapshot = _fake_cache(ms_env, tiny_dir, legacy=legacy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model(f"modelscope:{REPO}")
    assert source.path == snapshot
    assert source.origin == "modelscope"
    assert source.name == f"modelscope:{REPO}" and source.repo_id == REPO
    assert source.revision is None  # a branch name ("master") is not a commit
    assert resolve_model(f"modelscope:{REPO}", weights=False).path == snapshot


def test_offline_and_not_cached_is_a_clear_error(ms_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(f"modelscope:{REPO}")
    message = str(caught.value)
    assert f"'modelscope:{REPO}' is not in the local ModelScope cache ({ms_env})" in message
    assert "HF_HUB_OFFLINE=1 keeps zturbo off the network" in message
    assert f"modelscope download --model {REPO}" in message


def test_a_complete_cached_snapshot_is_used_without_asking_modelscope(ms_env, monkeypatch, tiny_dir):
    """Asking would make the library hash every cached file (33 GB for the real model) at each start."""
    snapshot = _fake_cache(ms_env, tiny_dir)
    _replace_network(monkeypatch, AssertionError("ModelScope was asked"))
    assert resolve_model(f"modelscope:{REPO}").path == snapshot


def test_an_incomplete_snapshot_is_downloaded_and_checked(ms_env, monkeypatch, tiny_dir):
    from modelscope.hub.errors import NetworkError

    snapshot = _fake_cache(ms_env, tiny_dir)
    for shard in (snapshot / "transformer").glob("*.safetensors"):
        shard.unlink()
    # Configs alone are enough without weights; with weights, ModelScope is asked for the rest.
    assert resolve_model(f"modelscope:{REPO}", weights=False).path == snapshot
    _replace_network(monkeypatch, NetworkError("Connection failed: modelscope.cn unreachable"))
    with pytest.raises(ModelNotFoundError, match=r"is incomplete in the local ModelScope cache .* cannot be reached"):
        resolve_model(f"modelscope:{REPO}")


def test_unreachable_and_not_cached_names_both(ms_env, monkeypatch):
    from modelscope.hub.errors import NetworkError

    _replace_network(monkeypatch, NetworkError("Connection failed: modelscope.cn unreachable"))
    unreachable = r"ModelScope cannot be reached \(\[E1020\] Connection failed: modelscope.cn unreachable\)"
    with pytest.raises(ModelNotFoundError, match=rf"not in the local ModelScope cache .* and {unreachable}; check"):
        resolve_model(f"modelscope:{REPO}")


def test_a_repo_missing_on_modelscope_is_named(ms_env, monkeypatch):
    import requests
    from modelscope.hub.errors import NotExistError

    # What the library raises for an unknown repo: its NotExistError wrapped in requests' HTTPError.
    try:
        raise requests.exceptions.HTTPError("404") from NotExistError("model not found")
    except requests.exceptions.HTTPError as e:
        _replace_network(monkeypatch, e)
    with pytest.raises(ModelNotFoundError, match=r"'Tongyi-MAI/Nope' does not exist on ModelScope \(or is private\)"):
        resolve_model("modelscope:Tongyi-MAI/Nope")


def test_without_the_library_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", None)  # import fails
    with pytest.raises(ModelNotFoundError, match=r"needs the modelscope package: pip install 'zturbo\[modelscope\]'"):
        resolve_model(f"modelscope:{REPO}")
    assert INSTALL_HINT == "pip install 'zturbo[modelscope]'"


def test_model_source_variable_sends_plain_repo_ids_to_modelscope(ms_env, monkeypatch, tiny_dir):
    snapshot = _fake_cache(ms_env, tiny_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ZTURBO_MODEL_SOURCE", "modelscope")
    source = resolve_model(REPO)
    assert (source.path, source.origin, source.name) == (snapshot, "modelscope", f"modelscope:{REPO}")
    # hf: overrides the variable: the Hugging Face cache (empty here) is asked, not ModelScope's.
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model(f"hf:{REPO}")


def test_bad_prefix_and_bad_model_source_are_named(monkeypatch):
    with pytest.raises(ModelNotFoundError, match=r"model source 'modelscop' in 'modelscop:Tongyi-MAI/Z-Image-Turbo' "
                       r"is not one of hf, modelscope"):  # fmt: skip
        resolve_model("modelscop:Tongyi-MAI/Z-Image-Turbo")
    with pytest.raises(ModelNotFoundError, match=r"'modelscope:Z-Image-Turbo' is neither an existing directory"):
        resolve_model("modelscope:Z-Image-Turbo")
    monkeypatch.setenv("ZTURBO_MODEL_SOURCE", "github")
    with pytest.raises(InvalidRequestError, match=r"ZTURBO_MODEL_SOURCE='github' is not one of hf, modelscope"):
        resolve_model(REPO)


def test_info_names_the_source(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    monkeypatch.delenv("ZTURBO_MODEL_SOURCE", raising=False)
    code, out, _ = run(capsys, "info", "--device", "cpu", "--model", f"modelscope:{REPO}")
    assert code == 0
    assert f"modelscope:{REPO}  (ModelScope, cache {tmp_path})" in out
    code, out, _ = run(capsys, "info", "--device", "cpu", "--model", REPO)
    assert f"{REPO}  (Hugging Face hub)" in out


def test_generate_from_modelscope_records_the_source(tiny_dir, tmp_path):
    """The CLI end to end, as a user runs it: ZTURBO_MODEL_SOURCE=modelscope and the default model,
    found in the ModelScope cache with the network off."""
    pytest.importorskip("modelscope")
    _fake_cache(tmp_path / "ms", tiny_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ZTURBO_", "MODELSCOPE_"))}
    env.update(
        MODELSCOPE_CACHE=str(tmp_path / "ms"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
        ZTURBO_MODEL_SOURCE="modelscope", ZTURBO_CACHE=str(tmp_path / "zc"),
    )  # fmt: skip
    out = tmp_path / "img.png"
    proc = subprocess.run(
        [sys.executable, "-m", "zturbo.cli", "generate", "a fox", "--seed", "3", "--width", "32", "--height", "32",
         "--steps", "2", "-o", str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from zturbo.imageio import read_metadata

    meta = read_metadata(out)
    assert (meta["model"], meta["model_source"], meta["model_revision"]) == (f"modelscope:{REPO}", "modelscope", None)


def test_server_serves_a_modelscope_model_under_either_name(ms_env, monkeypatch, tiny_dir, tmp_path):
    from serving import Server

    _fake_cache(ms_env, tiny_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server inherits the environment
    server = Server(f"modelscope:{REPO}", tmp_path / "data", "--no-ui")
    try:
        server.wait_ready()
        status = server.client.get("/v1/status").json()
        assert (status["model"], status["model_source"]) == (f"modelscope:{REPO}", "modelscope")
        # An OpenAI client may name the repo without its hub; another model is still refused.
        body = {"prompt": "a fox", "size": "64x64", "steps": 1}
        assert server.client.post("/v1/images/generations", json={**body, "model": REPO}).status_code == 200
        refused = server.client.post("/v1/images/generations", json={**body, "model": "Tongyi-MAI/Z-Image"})
        assert refused.status_code == 400 and "is not served here" in refused.text
    finally:
        server.stop()
