"""The loader (minisd/checkpoint.py): every way a file can be wrong gets a clear error, training state is dropped,
the family and prediction type are told apart by keys, shapes, names and configs, and the full-size official key
sets (built on the meta device from the reference code, so nothing is allocated) map exactly onto minisd."""
import functools
import json
import pickle
import random
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisd.checkpoint import CheckpointError, check_state, detect_config, inference_keys, openclip_to_hf, \
    read_checkpoint
from minisd.config import tiny
from minisd.loading import load_model, load_state
from minisd.model import StableDiffusion
from tools.parity import (SD1_TEXT, SD1_UNET, SD2_TEXT, SD2_UNET, SD_VAE, SD_VAE_EMBED_DIM, UNET, VAE, LdmVAE,
                          clip_state, clip_text, ldm_unet, openclip_text_shapes)

TRAINING_KEYS = ["model_ema.decay", "model_ema.num_updates", "model_ema.diffusion_modelinput_blocks00weight",
                 "betas", "alphas_cumprod", "first_stage_model.loss.logvar",
                 "first_stage_model.loss.discriminator.main.0.weight",
                 "cond_stage_model.transformer.text_model.embeddings.position_ids"]


@pytest.fixture(scope="module")
def tiny_state():
    """A tiny model's weights under the official keys, and its config (which a tiny file must carry in its
    metadata: detection by keys only knows the official widths)."""
    cfg = tiny()
    torch.manual_seed(0)
    state = {k: v for k, v in StableDiffusion(cfg).state_dict().items() if not k.endswith("position_ids")}
    return cfg, state


def write(path, state, cfg=None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"minisd_config": cfg.to_json()} if cfg else None)
    return path


# ------------------------------------------------------------------------------------------- unreadable files

def test_missing_file(tmp_path):
    for name in ("absent.safetensors", "absent.ckpt"):
        with pytest.raises(CheckpointError, match="not found"):
            load_model(tmp_path / name, allow_pickle=True)


@pytest.mark.parametrize("content", [
    random.Random(0).randbytes(4096),
    b"model weights, one per line\n" * 100,
    b"",
    struct.pack("<Q", 8) + b"\xff\xfe{}]]]]" + bytes(64),  # a plausible header length, then bytes that are not JSON
], ids=["random-bytes", "text", "empty", "header-not-json"])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(path)


def test_header_that_is_json_but_not_an_object(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"[1, 2]  " + bytes(16))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(path)


def test_truncated_file(tmp_path, tiny_state):
    cfg, state = tiny_state
    data = write(tmp_path / "full.safetensors", state, cfg).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) - 1000])  # the tensors end early
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(cut)
    cut.write_bytes(data[:200])  # the header itself is cut
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(cut)


# ------------------------------------------------------------------------------------ keys that do not match

def test_every_mismatch_is_named_in_one_error(tmp_path, tiny_state):
    cfg, state = tiny_state
    state = dict(state)
    missing = ["model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_in.bias",
               "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    for k in missing:
        del state[k]
    unexpected = ["model.diffusion_model.input_blocks.99.0.weight", "first_stage_model.encoder.extra.bias",
                  "cond_stage_model.transformer.text_model.encoder.layers.7.mlp.fc1.weight"]
    for k in unexpected:
        state[k] = torch.zeros(3)
    wrong = ["model.diffusion_model.time_embed.0.weight", "first_stage_model.quant_conv.weight",
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    for k in wrong:
        state[k] = torch.zeros(state[k].shape[0] + 1, *state[k].shape[1:])
    with pytest.raises(CheckpointError) as err:
        load_model(write(tmp_path / "model.safetensors", state, cfg))
    msg = str(err.value)
    for k in missing + unexpected + wrong:
        assert k in msg
    for title in ("3 missing keys", "3 unexpected keys", "3 wrong shapes"):
        assert title in msg


@pytest.mark.parametrize("width,text_key", [
    (512, "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
    (1280, "cond_stage_model.model.ln_final.weight"),  # an OpenCLIP bigG-sized text, as in SDXL
])
def test_unknown_architecture(tmp_path, width, text_key):
    state = {f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, width),
             f"{UNET}input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
             f"{VAE}decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), text_key: torch.zeros(width)}
    with pytest.raises(CheckpointError, match=f"unknown architecture.*width {width}"):
        load_model(write(tmp_path / "model.safetensors", state))


def test_training_state_is_dropped_silently(tmp_path, tiny_state):
    cfg, state = tiny_state
    extra = {k: torch.ones(2) for k in TRAINING_KEYS}
    model = load_model(write(tmp_path / "trained.safetensors", {**state, **extra}, cfg))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------------- pickle (.ckpt)

PAYLOAD_RAN = []


def payload():
    PAYLOAD_RAN.append(True)
    return {}


class Payload:
    """What a malicious .ckpt holds: unpickling calls a function of the attacker's choosing."""

    def __reduce__(self):
        return payload, ()


def test_pickle_refused_without_opt_in(tmp_path, tiny_state):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_state[1]}, path)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model(path)


def test_pickle_read_with_opt_in(tmp_path, tiny_state):
    path = tmp_path / "model.ckpt"
    state = tiny_state[1]
    torch.save({"state_dict": {**state, "betas": torch.ones(3)}, "global_step": 10}, path)
    raw, metadata = read_checkpoint(path, allow_pickle=True)
    kept = inference_keys(raw)
    assert kept.keys() == state.keys() and all(torch.equal(kept[k], v) for k, v in state.items())


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises((CheckpointError, pickle.UnpicklingError)):
        load_model(path, allow_pickle=True)
    assert not PAYLOAD_RAN, "the loader ran code from the pickle: it must read with weights_only=True"
    torch.load(path, weights_only=False)  # control: the payload is real, a plain load runs it
    assert PAYLOAD_RAN


# -------------------------------------------------------------------------------------------- family detection

def official_meta_state(family):
    """The full-size official key set of SD 1.5 or SD 2.1 (the references' own names and shapes, training keys
    included), as meta tensors: nothing is allocated."""
    sd2 = family == "sd2"
    with torch.device("meta"):
        unet = ldm_unet(SD2_UNET if sd2 else SD1_UNET)
        vae = LdmVAE(SD_VAE, SD_VAE_EMBED_DIM)
        if sd2:
            text = {k: torch.empty(shape) for k, shape in openclip_text_shapes(SD2_TEXT).items()}
        else:
            text = clip_state(clip_text(SD1_TEXT))
        training = {k: torch.empty(2) for k in TRAINING_KEYS}
    return {**{UNET + k: v for k, v in unet.state_dict().items()},
            **{VAE + k: v for k, v in vae.state_dict().items()}, **text, **training}


@functools.lru_cache(maxsize=None)
def official_keys(family):
    return inference_keys(official_meta_state(family))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_family_detected_and_every_official_key_maps(family):
    state = official_keys(family)
    cfg = detect_config(state, path=f"{family}.safetensors")
    assert cfg.name == family and cfg.prediction == "epsilon"
    assert cfg.text.penultimate == (family == "sd2") and cfg.text.pad_with_eot == (family == "sd1")
    if cfg.text.key_layout == "openclip":
        state = openclip_to_hf(state)
    with torch.device("meta"):
        want = StableDiffusion(cfg).state_dict()
    check_state(want, state, f"official {family}")  # raises, naming every key, if one does not map


@pytest.mark.parametrize("family,name,expected", [
    ("sd2", "v2-1_768-ema-pruned.safetensors", "v"),
    ("sd2", "768-v-ema.safetensors", "v"),
    ("sd2", "my-sd21-v.safetensors", "v"),
    ("sd2", "v2-1_512-ema-pruned.safetensors", "epsilon"),
    ("sd2", "512-base-ema.safetensors", "epsilon"),
    ("sd1", "sd-v1-5-768.safetensors", "epsilon"),  # the rule is for SD 2 only
])
def test_prediction_from_file_name(family, name, expected):
    assert detect_config(official_keys(family), path=f"/models/{name}").prediction == expected


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_prediction_override(family):
    state = official_keys(family)
    assert detect_config(state, path="768-v-ema.safetensors", prediction="epsilon").prediction == "epsilon"
    assert detect_config(state, path="512-base.safetensors", prediction="v").prediction == "v"
    with pytest.raises(CheckpointError, match="prediction"):
        detect_config(state, prediction="x0")


def test_prediction_from_diffusers_scheduler(tiny_diffusers):
    sched = tiny_diffusers / "scheduler" / "scheduler_config.json"
    assert load_state(tiny_diffusers)[0].prediction == "epsilon"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    assert load_state(tiny_diffusers)[0].prediction == "v"
    assert load_state(tiny_diffusers, prediction="epsilon")[0].prediction == "epsilon"


# ----------------------------------------------------------------------------------------- diffusers folders

@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_diffusers_folder_missing_a_part(tiny_diffusers, part):
    load_model(tiny_diffusers)  # control: the complete folder loads
    shutil.rmtree(tiny_diffusers / part)
    with pytest.raises(CheckpointError, match=part):
        load_model(tiny_diffusers)


def test_diffusers_folder_missing_weights_or_keys(tiny_diffusers):
    weights = tiny_diffusers / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["conv_in.weight"]
    save_file(state, str(weights))
    named = re.escape("unet/conv_in.weight (for model.diffusion_model.input_blocks.0.0.weight)")
    with pytest.raises(CheckpointError, match=named):
        load_model(tiny_diffusers)
    weights.unlink()
    with pytest.raises(CheckpointError, match="unet.*diffusion_pytorch_model.safetensors"):
        load_model(tiny_diffusers)


def test_folder_that_is_not_diffusers(tmp_path):
    with pytest.raises(CheckpointError, match="no unet/"):
        load_model(tmp_path)


def test_text_encoder_saved_by_transformers_5(tiny_diffusers):
    """transformers >= 5 saves a CLIPTextModel it built (not one it loaded from the Hub's names) without the
    `text_model.` level."""
    from transformers import CLIPTextConfig, CLIPTextModel
    folder = tiny_diffusers / "text_encoder"
    clip = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
    hub = load_file(str(folder / "model.safetensors"))
    clip.load_state_dict({k.removeprefix("text_model."): v for k, v in hub.items()})
    clip.save_pretrained(folder)
    assert not any(k.startswith("text_model.") for k in load_file(str(folder / "model.safetensors")))
    load_model(tiny_diffusers)


def test_a_model_built_from_scratch_is_the_same_every_time():
    """build_model(cfg, seed) gives the same weights whatever ran before it: no parameter starts from uninitialised
    memory (SDXL's text projection once did)."""
    from minisd.checkpoint import build_model
    from minisd.config import tiny_sdxl
    first = build_model(tiny_sdxl(image_size=32), seed=4).state_dict()
    junk = [torch.full((4096,), float("nan")) for _ in range(64)]   # memory a later allocation may reuse
    del junk
    again = build_model(tiny_sdxl(image_size=32), seed=4).state_dict()
    assert all(torch.isfinite(v).all() and torch.equal(v, again[k]) for k, v in first.items() if v.is_floating_point())


def test_sd3_with_t5_is_written_and_reads_back_equal(tmp_path):
    """T5's input embedding is one tensor under two names (tied): written once, as shared.weight (as the official
    files hold it), read back under both names, still one tensor."""
    from minisd.checkpoint import build_model, save_checkpoint
    from minisd.config import tiny_sd3
    model = build_model(tiny_sd3(dual=True))
    path = tmp_path / "tiny-sd3.safetensors"
    save_checkpoint(model, path)
    t5 = "text_encoders.t5xxl.transformer."
    written = read_checkpoint(path)[0]
    assert t5 + "shared.weight" in written and t5 + "encoder.embed_tokens.weight" not in written
    back = load_model(path)
    mine, ref = back.state_dict(), model.state_dict()
    assert mine.keys() == ref.keys() and [k for k in ref if not torch.equal(mine[k], ref[k])] == []
    assert mine[t5 + "shared.weight"].data_ptr() == mine[t5 + "encoder.embed_tokens.weight"].data_ptr()
