"""Shared fixtures: where ../shared is, tiny configs, and a tiny diffusers-format folder written by diffusers and
transformers themselves (the reference models come back with it, for the parity tests)."""
import copy
import json
import os
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from minisd.config import ModelConfig, sd1, sd2  # importable through pyproject's pytest pythonpath

ROOT = Path(__file__).resolve().parents[1]

# The test models are tiny: a second thread buys nothing and, on a shared machine, costs a lot of waiting.
torch.set_num_threads(int(os.environ.get("MINISD_TEST_THREADS", "1")))


LDM_INSTALL = "pip install --no-deps stable-diffusion-sdkit==2.1.5"

# Parity tolerances (docs/exactness.md, "How tolerances are chosen"): a reference's float32 noise floor is measured
# here, on this CPU, as how far the reference run in float32 lands from the same reference run in float64; minisd
# must land within FLOOR_FACTOR floors of the float32 reference. minisd measured at 0 to 2.6 floors.
FLOOR_FACTOR = 10
FLOAT32_EPS = 2.0 ** -23   # the least floor: one float32 step at the output scale
_FLOAT64_TWINS = weakref.WeakKeyDictionary()


def float64_twin(reference):
    """A float64 copy of a reference model or pipeline (its float32 weights exactly), made once per reference."""
    if reference not in _FLOAT64_TWINS:
        _FLOAT64_TWINS[reference] = copy.deepcopy(reference).to(torch.float64)
    return _FLOAT64_TWINS[reference]


def float32_floor(ref, ref64):
    """What float32 alone changes in a reference output: max |ref - ref64| over the output scale max(1, max |ref|).
    `ref64` None: a reference that cannot run in float64 as it runs in float32 (its random draws differ): the least
    floor, float32's resolution."""
    d = 0.0 if ref64 is None else (ref.double() - ref64.double()).abs().max().item()
    return max(d / max(1.0, ref.abs().max().item()), FLOAT32_EPS)


def assert_within_floor(ref, out, ref64, factor=FLOOR_FACTOR, floor=None):
    """minisd's `out` within `factor` float32 floors (float32_floor(ref, ref64), or `floor` measured elsewhere) of
    the float32 reference `ref`."""
    assert ref.shape == out.shape, (ref.shape, out.shape)
    floor = float32_floor(ref, ref64) if floor is None else floor
    d = (ref.double() - out.double()).abs().max().item()
    rel = d / max(1.0, ref.abs().max().item())
    assert rel <= factor * floor, (f"max abs difference {d:.3g} is {rel:.3g} of the output scale, {rel / floor:.2f} "
                                   f"float32 floors (the reference's own float32 noise here: {floor:.3g}); "
                                   f"tolerance {factor} floors")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Tests that build the original ldm code (tools.parity imports it where it is used) skip, naming the install
    line, where stable-diffusion-sdkit is absent: like the tests that need ../shared, not an error. Only a missing
    `ldm` is turned into a skip; any other error stays an error."""
    outcome = yield
    report = outcome.get_result()
    e = call.excinfo
    if e is not None and e.errisinstance(ModuleNotFoundError) and (e.value.name or "").split(".")[0] == "ldm":
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: needs the original ldm code: {LDM_INSTALL}")


@pytest.fixture
def shared_dir():
    """../shared (or $MINISD_SHARED): read-only data that is not in the repo."""
    path = Path(os.environ.get("MINISD_SHARED") or ROOT.parent / "shared")
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set MINISD_SHARED to point at it)")
    return path


def tiny32(layout):
    """A tiny model in the layout of SD 1 ("sd1") or SD 2 ("sd2"), every width a multiple of 32 because the
    original ldm code hard-codes GroupNorm(32). Everything that tells the families apart (projection kind, how
    heads are counted, the text tower's activation, layer and padding) is taken from minisd's real family config."""
    fam = sd1() if layout == "sd1" else sd2()
    unet = replace(fam.unet, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(1, 2), context_dim=32, groups=32)  # the last level has no attention, as in SD
    if layout == "sd1":
        unet.num_heads = 4
    else:
        unet.num_head_channels = 16   # fixed-size heads: 2 heads at 32 channels, 4 at 64
    return ModelConfig(name=f"tiny32-{layout}", unet=unet,
                       vae=replace(fam.vae, ch=32, ch_mult=(1, 2), num_res_blocks=1),
                       text=replace(fam.text, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=2),
                       prediction=fam.prediction, image_size=32, regulate_blocks=None)


@pytest.fixture(scope="session")
def make_tiny32():
    return tiny32


def write_diffusers_folder(folder, cfg, prediction_type="epsilon", pad_token=None, seed=0):
    """A diffusers-format Stable Diffusion folder for `cfg`, written as diffusers and the Hugging Face Hub lay it
    out: unet/ and vae/ by diffusers' save_pretrained, text_encoder/ with transformers' config and the Hub's key
    names (`text_model.*`), scheduler/ and, if pad_token is given, tokenizer/special_tokens_map.json.
    Returns the reference models (random weights, perturbed so that no layer is zero)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tools.parity import clip_state, clip_text, diffusers_unet_config, perturb

    folder = Path(folder)
    unet = perturb(UNet2DConditionModel(**diffusers_unet_config(cfg.unet)), seed=seed)
    v = cfg.vae
    vae = perturb(AutoencoderKL(
        in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
        block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * len(v.ch_mult), up_block_types=["UpDecoderBlock2D"] * len(v.ch_mult),
        norm_num_groups=v.groups, sample_size=cfg.image_size, scaling_factor=v.scale_factor), seed=seed + 1)
    t = cfg.text
    # diffusers' SD 2 text encoder is already cut after the penultimate layer, so it is read at its last layer
    clip = perturb(clip_text(dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                  intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                                  num_attention_heads=t.num_attention_heads, hidden_act=t.hidden_act,
                                  max_position_embeddings=t.max_position_embeddings)), std=0.01, seed=seed + 2)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    clip.config.save_pretrained(folder / "text_encoder")
    from safetensors.torch import save_file
    hub = {k.removeprefix("cond_stage_model.transformer."): v.contiguous() for k, v in clip_state(clip).items()}
    save_file(hub, str(folder / "text_encoder" / "model.safetensors"))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000, "prediction_type": prediction_type}))
    if pad_token is not None:
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
    return unet.eval(), vae.eval(), clip.eval()


@pytest.fixture(scope="session")
def make_diffusers_folder():
    return write_diffusers_folder


@pytest.fixture
def tiny_diffusers(tmp_path):
    """A small SD-1-layout diffusers folder (GroupNorm of 16 groups, unlike ldm's fixed 32)."""
    cfg = tiny32("sd1")
    cfg.unet.groups = cfg.vae.groups = 16
    folder = tmp_path / "tiny-diffusers"
    write_diffusers_folder(folder, cfg)
    return folder
