"""Loading a model: a single file (minisd/checkpoint.py) or a diffusers folder (minisd/diffusers_folder.py) ->
its config and official-key state -> the model, loaded strictly. The one entry above both readers, so neither
imports the other."""
from pathlib import Path

import torch

from .checkpoint import (SD3_TEXT, SD3_TEXT_FLAGS, CheckpointError, check_state, check_text_file, detect_config,
                         inference_keys, new_model, openclip_to_hf, read_checkpoint, sd3_text_file)
from .config import with_sd3_preset
from .diffusers_folder import config_from_diffusers, diffusers_to_official
from .text import TextEncoder


def load_state(path, allow_pickle=False, prediction=None, dtype=None, vae_float32=False, text_files=None):
    """A checkpoint file or diffusers folder -> (config, state with official keys, metadata); floating tensors of
    safetensors files in `dtype` if given (cast as they are read), the VAE's in float32 with `vae_float32`.
    SD 3: `text_files` {"clip_l" | "clip_g" | "t5xxl": path} adds text encoders from their own files; without
    T5 the model is built without it (zeros in its place)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "unet").is_dir() and not (path / "transformer").is_dir():
            raise CheckpointError(f"{path} is a folder but not a diffusers Stable Diffusion folder (no unet/, "
                                  f"nor SD 3's transformer/)")
        if any((text_files or {}).values()):
            raise CheckpointError(f"--clip-l, --clip-g and --t5 supply a single file's text encoders; the folder "
                                  f"{path} has its own (text_encoder/, text_encoder_2/, text_encoder_3/)")
        cfg = with_sd3_preset(config_from_diffusers(path), path)   # SD 3: sampling defaults by the folder's name
        if prediction:
            cfg.prediction = prediction
        return cfg, diffusers_to_official(path, cfg, dtype, vae_float32), {}
    raw, metadata = read_checkpoint(path, allow_pickle, dtype, ("first_stage_model.",) if vae_float32 else ())
    for name, file in (text_files or {}).items():
        if file:
            raw = {**{k: v for k, v in raw.items() if not k.startswith(SD3_TEXT[name])},
                   **sd3_text_file(name, file, dtype)}
    state = inference_keys(raw)
    cfg = with_sd3_preset(detect_config(state, metadata, path, prediction), path, metadata)
    if any((text_files or {}).values()) and not cfg.is_sd3:
        raise CheckpointError(f"--clip-l, --clip-g and --t5 supply SD 3's text encoders; {path} is {cfg.name}")
    if cfg.is_sd3 and cfg.t5 is not None and not any(k.startswith(SD3_TEXT["t5xxl"]) for k in state):
        print(f"no T5-XXL in {Path(path).name}: zeros stand in for its tokens (give it with {SD3_TEXT_FLAGS['t5xxl']})")
        cfg.t5 = None
    if "openclip" in (cfg.text.key_layout, cfg.text2.key_layout if cfg.text2 else None):
        state = openclip_to_hf(state)
    return cfg, state, metadata


def load_model(path, device="cpu", dtype=torch.float32, allow_pickle=False, prediction=None, text_files=None):
    """Build Stable Diffusion for the checkpoint at `path` and load it, strictly. The model is built on the meta
    device and takes the file's tensors, cast to `dtype` as they are read: no float32 copy of a bfloat16 model.
    SDXL's VAE stays float32 in a float16 model (it overflows in float16), with the file's values, never rounded."""
    # which model this is shows only once the file is read, so with float16 every VAE is read in float32 (a few
    # hundred MB) and cast below unless the model keeps it
    cfg, state, metadata = load_state(path, allow_pickle, prediction, dtype, vae_float32=dtype == torch.float16,
                                      text_files=text_files)
    with torch.device("meta"):
        model = new_model(cfg)
    for name, file in (text_files or {}).items():   # a text encoder's own file is named in its own error
        if file:
            check_text_file(model.state_dict(), state, name, file)
    check_state(model.state_dict(), state, path)
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds the tensors now; a cast below (pickle files) can free each as it goes
    for enc in (m for m in model.modules() if isinstance(m, TextEncoder)):   # every CLIP, any family
        emb = enc.text_model.embeddings  # a non-persistent buffer, still on meta
        emb.position_ids = torch.arange(emb.position_embedding.num_embeddings).expand((1, -1))
    model.metadata = metadata
    model.requires_grad_(False)  # inference: a gradient through the UNet (Attend-and-Excite) must not keep weight grads
    vae32 = cfg.vae_upcast and dtype == torch.float16
    for name, part in model.named_children():  # the model's tensors all live in its parts
        part.to(device=device, dtype=torch.float32 if vae32 and name == "first_stage_model" else dtype)
    return model.eval()
