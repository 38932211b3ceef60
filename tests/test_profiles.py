"""Model profiles: the base model (Tongyi-MAI/Z-Image) against diffusers, detection, the preset, metadata.

The tiny base checkpoint is the tiny Turbo one's architecture with the base model's published
scheduler config (shift 6.0); its images must match diffusers' ZImagePipeline loading the same
directory within 1/255, with the profile's defaults (28 steps, guidance 4) and a negative prompt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import run
from zturbo.config import RuntimeConfig
from zturbo.engine import Engine
from zturbo.errors import InvalidRequestError
from zturbo.imageio import read_metadata
from zturbo.loader import resolve_model
from zturbo.profiles import BASE, PLAIN_CFG, TURBO, CfgOptions, Chosen, choose_profile, detect_profile, scheduler_config
from zturbo.request import GenerateRequest, ModelLimits

BASE_LIMITS = ModelLimits(spatial_unit=16, max_pixels=1 << 20, profile=BASE)

PROMPT, NEGATIVE, SEED = "a lighthouse at dusk", "blurry, low quality", 77


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zturbo.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"), seed=1, profile=BASE)


@pytest.fixture(scope="module")
def base_engine(base_dir: Path) -> Engine:
    return Engine.load(RuntimeConfig(model=str(base_dir), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def base_pipe(base_dir: Path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(base_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, steps: int, size: int, **cfg: float) -> np.ndarray:
    out = pipe(
        prompt=[PROMPT],
        negative_prompt=[NEGATIVE],
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
        output_type="pil",
        **cfg,
    )
    return np.asarray(out.images[0])


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert ours.std() > 10  # a flat image would match anything
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}, mean {diff.mean():.3f}"


def test_base_checkpoint_defaults_match_diffusers_at_28_steps(base_engine, base_pipe):
    """No steps or guidance given: the base profile's 28 steps at guidance 4, shift 6, with CFG
    (the positive and negative halves in one batch), as diffusers runs them."""
    assert base_engine.profile == Chosen(BASE, "scheduler shift")
    result = base_engine.generate(PROMPT, negative_prompt=NEGATIVE, seed=SEED, width=32, height=32)
    assert (result.request.steps, result.request.guidance_scale) == (28, 4.0)
    assert_close(np.asarray(result.images[0].image), reference(base_pipe, 28, 32))


@pytest.mark.parametrize(
    "normalization, truncation", [(1.0, 1.0), (0.0, 0.2), (1.2, 0.3)], ids=["normalize", "truncate", "both"]
)
def test_cfg_options_match_diffusers(base_engine, base_pipe, normalization, truncation):
    """diffusers' cfg_normalization and cfg_truncation as request fields; each changes the image
    (checked), ours follows diffusers given the same options, and the metadata records them."""
    result = base_engine.generate(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=6, width=48, height=48,
        cfg_normalization=normalization, cfg_truncation=truncation,
    )  # fmt: skip
    ours = np.asarray(result.images[0].image)
    plain = reference(base_pipe, 6, 48)
    assert np.abs(ours.astype(int) - plain.astype(int)).max() > 8, "the option changed nothing: a vacuous check"
    ref = reference(base_pipe, 6, 48, cfg_normalization=normalization, cfg_truncation=truncation)
    assert_close(ours, ref)
    meta = result.images[0].metadata
    assert (meta["cfg_normalization"], meta["cfg_truncation"]) == (normalization, truncation)
    assert (meta["profile"]["cfg_normalization"], meta["profile"]["cfg_truncation"]) == (0.0, 1.0)  # the defaults


def test_metadata_records_the_profile(base_engine):
    meta = base_engine.generate(PROMPT, seed=1, steps=2, width=32, height=32).images[0].metadata
    assert (meta["cfg_normalization"], meta["cfg_truncation"]) == (0.0, 1.0)  # the profile's, not given
    assert meta["profile"] == {
        "name": "base", "steps": 28, "guidance_scale": 4.0, "steps_range": [28, 50], "guidance_range": [3.0, 5.0],
        "negative_prompt": True, "shift": 6.0, "cfg_normalization": 0.0, "cfg_truncation": 1.0,
        "sizes": [f"{w}x{h}" for w, h in BASE.sizes], "chosen_by": "scheduler shift",
    }  # fmt: skip
    assert meta["profile"]["sizes"][:3] == ["1024x1024", "1152x896", "896x1152"]


@pytest.mark.parametrize(
    "given, message",
    [
        ({"cfg_normalization": -0.5}, "cfg_normalization -0.5 is out of range; allowed 0..10 (0 = off)"),
        ({"cfg_normalization": 12.0}, "cfg_normalization 12.0 is out of range; allowed 0..10 (0 = off)"),
        ({"cfg_normalization": True}, "cfg_normalization must be a finite number, 0..10; got True"),
        ({"cfg_truncation": 1.5}, "cfg_truncation 1.5 is out of range; allowed 0..1 (1 = off)"),
        ({"cfg_truncation": float("nan")}, "cfg_truncation must be a finite number, 0..1; got nan"),
        ({"cfg_truncation": "high"}, "cfg_truncation 'high' is not a number (ASCII digits)"),
    ],
)
def test_bad_cfg_options_are_refused_by_name_with_the_range(given, message):
    with pytest.raises(InvalidRequestError) as refused:
        GenerateRequest.from_fields({"prompt": "x", "size": "32x32", **given}, BASE_LIMITS)
    assert str(refused.value) == message and refused.value.field == next(iter(given))


def test_http_body_carries_cfg_options_and_refuses_bad_ones():
    from zturbo.serving.schemas import JobBody, body_request, job_params

    body = JobBody(prompt="x", width=32, height=32, cfg_normalization=1.5, cfg_truncation=0.25)
    request = body_request(body, BASE_LIMITS, 1 << 20)
    assert request.cfg == CfgOptions(1.5, 0.25)
    assert body_request(JobBody(prompt="x", width=32, height=32), BASE_LIMITS, 1 << 20).cfg == PLAIN_CFG
    params = job_params(request.to_dict())
    assert (params["cfg_normalization"], params["cfg_truncation"]) == (1.5, 0.25)
    with pytest.raises(InvalidRequestError, match=r"cfg_truncation 2.0 is out of range; allowed 0..1"):
        body_request(JobBody(prompt="x", width=32, height=32, cfg_truncation=2.0), BASE_LIMITS, 1 << 20)
    schema = JobBody.model_json_schema()["properties"]
    assert (schema["cfg_normalization"]["minimum"], schema["cfg_normalization"]["maximum"]) == (0.0, 10.0)
    assert (schema["cfg_truncation"]["minimum"], schema["cfg_truncation"]["maximum"]) == (0.0, 1.0)


def test_requests_with_other_cfg_options_are_not_batched_together():
    from zturbo.serving.jobs import batch_key

    def request(**cfg: float) -> GenerateRequest:
        return GenerateRequest.create("x", limits=BASE_LIMITS, width=32, height=32, seed=1, **cfg)

    plain, same = request(), request(cfg_normalization=0.0, cfg_truncation=1.0)
    truncated, normalized = request(cfg_truncation=0.5), request(cfg_normalization=1.0)
    assert batch_key(plain) == batch_key(same)
    assert len({batch_key(r) for r in (plain, truncated, normalized)}) == 3
    with pytest.raises(ValueError, match="CFG options"):
        GenerateRequest.combine([plain, truncated])
    # The stored form keeps them; one stored before they were fields ran diffusers' defaults.
    assert GenerateRequest.from_dict(truncated.to_dict()) == truncated
    old = {k: v for k, v in truncated.to_dict().items() if not k.startswith("cfg_")}
    assert GenerateRequest.from_dict(old).cfg == PLAIN_CFG


def test_cli_cfg_flags_reach_the_request_and_the_image(capsys, base_dir, tmp_path, monkeypatch):
    """`--cfg-normalization` and `--cfg-truncation` build the request the engine runs, the image
    records them, `--from` makes it again with them, and a bad value stops before the model loads."""
    seen: list[GenerateRequest] = []
    generate = Engine.generate

    def spy(self, request, *args, **kwargs):
        seen.append(request)
        return generate(self, request, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    out, again = tmp_path / "fox.png", tmp_path / "again.png"
    args = ("--model", base_dir, "--device", "cpu", "--dtype", "float32", "--width", "32", "--height", "32")
    options = ("--steps", "3", "--seed", "3", "--cfg-normalization", "1.2", "--cfg-truncation", "0.5")
    code, _, err = run(capsys, "generate", "a fox", *args, *options, "-o", out)
    assert code == 0, err
    assert seen[-1].cfg == CfgOptions(1.2, 0.5)
    meta = read_metadata(out)
    assert (meta["cfg_normalization"], meta["cfg_truncation"]) == (1.2, 0.5)
    code, _, err = run(capsys, "generate", "--from", out, *args, "-o", again)
    assert code == 0, err
    assert seen[-1].cfg == CfgOptions(1.2, 0.5)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    code, _, err = run(capsys, "generate", "a fox", *args, "--cfg-truncation", "-0.1")
    assert code == 2 and "cfg_truncation -0.1 is out of range; allowed 0..1 (1 = off)" in err


def test_turbo_checkpoint_keeps_turbo_defaults(engine):
    assert engine.profile == Chosen(TURBO, "scheduler shift")
    request = engine.request("x", width=32, height=32)
    assert (request.steps, request.guidance_scale) == (8, 0.0)


@pytest.mark.parametrize(
    "config, repo_id, expected",
    [
        ({"shift": 3.0, "use_dynamic_shifting": False}, None, ("turbo", "scheduler shift")),
        ({"shift": 6.0, "use_dynamic_shifting": False}, None, ("base", "scheduler shift")),
        ({"shift": 6.0}, "Tongyi-MAI/Z-Image-Turbo", ("turbo", "repo id")),
        ({}, "tongyi-mai/z-image", ("base", "repo id")),
        ({"shift": 4.0}, None, ("turbo", "assumed")),  # a fine-tune's own shift: the files cannot tell
        ({"shift": 6.0, "use_dynamic_shifting": True}, None, ("turbo", "assumed")),
    ],
)
def test_detect_profile(config, repo_id, expected):
    chosen = detect_profile(config, repo_id)
    assert (chosen.profile.name, chosen.how) == expected


def test_preset_overrides_the_files_and_sets_the_shift():
    chosen = choose_profile("base", {"shift": 3.0, "use_dynamic_shifting": False}, "Tongyi-MAI/Z-Image-Turbo")
    assert chosen == Chosen(BASE, "preset")
    assert scheduler_config(chosen, {"shift": 3.0, "num_train_timesteps": 1000})["shift"] == 6.0
    detected = detect_profile({"shift": 3.0}, None)
    assert scheduler_config(detected, {"shift": 3.0})["shift"] == 3.0  # detected: the file as it is


def test_bad_preset_is_refused_by_name():
    with pytest.raises(InvalidRequestError, match="preset 'fast' is not one of auto, turbo, base"):
        RuntimeConfig(preset="fast")
    with pytest.raises(InvalidRequestError, match="preset 'Base'"):
        RuntimeConfig.from_env({"ZTURBO_PRESET": "Base"})


def test_preset_from_the_environment_and_flag_wins():
    assert RuntimeConfig.from_env({"ZTURBO_PRESET": "base"}).preset == "base"
    assert RuntimeConfig.from_env({"ZTURBO_PRESET": "base"}, preset="turbo").preset == "turbo"
    assert RuntimeConfig.from_env({}).preset == "auto"


def test_engine_with_preset_runs_the_base_schedule(tiny_dir):
    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", preset="base"))
    assert engine.profile == Chosen(BASE, "preset")
    assert engine.components.scheduler_config["shift"] == 6.0
    assert engine.request("x", width=32, height=32).steps == 28


def test_request_defaults_come_from_the_model_profile():
    base = BASE_LIMITS
    request = GenerateRequest.create("x", limits=base, width=32, height=32)
    assert (request.steps, request.guidance_scale, request.cfg) == (28, 4.0, BASE.cfg)
    # A profile's own CFG options (not diffusers' defaults) are what an omitted field takes; a given
    # field replaces only itself.
    tuned = dataclasses.replace(base, profile=dataclasses.replace(BASE, cfg=CfgOptions(1.5, 0.5)))
    assert GenerateRequest.create("x", limits=tuned, width=32, height=32).cfg == CfgOptions(1.5, 0.5)
    half = GenerateRequest.create("x", limits=tuned, width=32, height=32, cfg_truncation=0.8)
    assert half.cfg == CfgOptions(1.5, 0.8)
    given = GenerateRequest.create("x", limits=base, width=32, height=32, steps=40, guidance_scale=0.0)
    assert (given.steps, given.guidance_scale) == (40, 0.0)
    by_fields = GenerateRequest.from_fields({"prompt": "x", "size": "32x32"}, base)  # the server's door
    assert (by_fields.steps, by_fields.guidance_scale) == (28, 4.0)


def test_a1111_turbo_policy_maps_to_the_served_profile():
    from zturbo.serving.a1111 import Txt2ImgBody, translate

    body = Txt2ImgBody(prompt="x", steps=20, cfg_scale=7.0)
    t = translate(body, "turbo", 1 << 20, formats=False, fixed=lambda *a: None, profile=BASE)
    assert (t.values["steps"], t.values["guidance_scale"]) == (28, 4.0)


def test_cli_preset_default_steps_metadata_and_info(capsys, tiny_dir, tmp_path):
    out = tmp_path / "fox.png"
    args = ("--model", tiny_dir, "--device", "cpu", "--dtype", "float32", "--preset", "base")
    code, _, err = run(capsys, "generate", "a fox", *args, "--width", "32", "--height", "32", "--seed", "3", "-o", out)
    assert code == 0, err
    meta = read_metadata(out)
    assert (meta["steps"], meta["guidance_scale"]) == (28, 4.0)
    assert meta["profile"]["name"] == "base" and meta["profile"]["chosen_by"] == "preset"
    code, text, _ = run(capsys, "info", "--model", tiny_dir, "--device", "cpu", "--preset", "base")
    assert code == 0
    line = next(line for line in text.splitlines() if line.startswith("profile"))
    assert "base (preset): 28 steps, guidance 4" in line and "scheduler shift 6.0" in line
    assert "CFG normalization 0, truncation 1" in line and line.endswith("sizes " + " ".join(BASE.describe()["sizes"]))
    code, text, _ = run(capsys, "info", "--model", tiny_dir, "--device", "cpu")
    assert "turbo (scheduler shift): 8 steps, guidance 0" in text


def test_status_reports_the_profile():
    from zturbo.serving.schemas import status_limits

    profile = status_limits(ModelLimits(spatial_unit=16, max_pixels=1 << 20, profile=BASE))["profile"]
    assert json.loads(json.dumps(profile))["name"] == "base"


def test_tiny_base_checkpoint_is_found_as_base(base_dir):
    assert resolve_model(str(base_dir), weights=False).profile().profile is BASE


@pytest.mark.parametrize(
    ("directory", "file_name", "preset", "expected", "warns"),
    [
        ("turbo", "z_image-Q4_K_M.gguf", "auto", ("base", "file name"), True),  # the base model's file, by name
        ("base", "z_image_turbo-Q8_0.gguf", "auto", ("turbo", "file name"), True),
        ("turbo", "z_image_turbo-Q8_0.gguf", "auto", ("turbo", "file name"), False),  # the two agree
        ("base", "my_finetune-Q8_0.gguf", "auto", ("base", "scheduler shift"), False),  # the name tells neither
        ("turbo", "z_image-Q4_K_M.gguf", "turbo", ("turbo", "preset"), False),  # the preset decides over both
    ],
)
def test_a_transformer_file_beside_a_directory_takes_the_profile_its_name_says(
    tiny_dir, base_dir, tmp_path, caplog, directory, file_name, preset, expected, warns
):
    root = tiny_dir if directory == "turbo" else base_dir
    gguf = tmp_path / file_name  # never read: the profile comes from the name
    source = dataclasses.replace(resolve_model(str(root), weights=False), transformer_file=gguf)
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        chosen = source.profile(preset)
        source.profile(preset)  # a load asks several times: one warning
        source.limits(1 << 20)  # as Engine.load asks, 'auto' whatever the preset: no warning under a preset
    assert (chosen.profile.name, chosen.how) == expected
    assert scheduler_config(chosen, source.config("scheduler"))["shift"] == chosen.profile.shift
    warned = [r.getMessage() for r in caplog.records if "is named as" in r.getMessage()]
    if warns:  # once, naming the file and the directory and the profiles each says
        assert len(warned) == 1, warned
        assert f"transformer file {gguf} is named as the {expected[0]} model's" in warned[0]
        assert f"{source.name} is the {directory} model's (by its scheduler shift)" in warned[0]
    else:
        assert warned == []


def test_info_takes_a_hub_models_profile_from_a_gguf_transformers_name(capsys, tmp_path):
    # A hub model is not downloaded for `info`: the repo id says Turbo, the file's name the base model.
    hub_model = ("--model", "Tongyi-MAI/Z-Image-Turbo", "--transformer", tmp_path / "z_image-Q4_K_M.gguf")
    code, text, err = run(capsys, "info", *hub_model, "--device", "cpu")
    assert code == 0, err
    line = next(line for line in text.splitlines() if line.startswith("profile"))
    assert "base (file name): 28 steps" in line and "scheduler shift 6.0" in line
    code, text, err = run(capsys, "info", *hub_model, "--device", "cpu", "--preset", "turbo")
    assert code == 0, err
    assert "turbo (preset): 8 steps" in text


@pytest.mark.parametrize("preset, cfg", [("auto", True), ("turbo", False)])
def test_memory_planner_plans_the_profiles_batch(base_dir, monkeypatch, preset, cfg):
    """The base model's default request guides: its load is planned for the batch of two."""
    from zturbo.device import probe
    from zturbo.memory import plan

    seen = {}

    def choose(*args, **request):
        seen.update(request)
        return plan.Choice(budget=1 << 30, chosen=None, considered=[])

    monkeypatch.setattr(plan, "choose", choose)
    config = RuntimeConfig(model=str(base_dir), preset=preset)
    source = resolve_model(str(base_dir), weights=False)
    dtypes = {"transformer": torch.float32, "text_encoder": torch.float32, "vae": torch.float32}
    plan.plan_layout(config, source, dtypes, 1 << 30, probe(torch.device("cpu")), compiled_vae=False)
    assert seen["cfg"] is cfg
