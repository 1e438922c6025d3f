"""Reading a diffusers-format folder (`unet/ vae/ text_encoder/ [text_encoder_2/] tokenizer/ scheduler/`): its
configs become a ModelConfig, and its weights are renamed block by block into the official single-file names, by
rules (minisd/blocks.py), so the model loads them as it loads an official file."""
import json
from pathlib import Path

import torch

from .blocks import unet_renames
from .checkpoint import CheckpointError, mismatch_message, read_safetensors
from .config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from .model import StableDiffusion
from .tokenizer import folder_pad_token


def _vae_renames(vae):
    levels = len(vae.ch_mult)
    r = []
    for part in ("encoder", "decoder"):
        r += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0."),
              (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1."),
              (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."),
              (f"{part}.norm_out.", f"{part}.conv_norm_out.")]
    for i in range(levels):
        r += [(f"encoder.down.{i}.block.", f"encoder.down_blocks.{i}.resnets."),
              (f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."),
              (f"decoder.up.{i}.block.", f"decoder.up_blocks.{levels - 1 - i}.resnets."),
              (f"decoder.up.{i}.upsample.", f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.")]
    inner = [("nin_shortcut.", "conv_shortcut."), ("attentions.0.norm.", "attentions.0.group_norm."),
             ("attentions.0.q.", "attentions.0.to_q."), ("attentions.0.k.", "attentions.0.to_k."),
             ("attentions.0.v.", "attentions.0.to_v."), ("attentions.0.proj_out.", "attentions.0.to_out.0.")]
    return r, inner


def _rename(key, prefixes, inner):
    for a, b in prefixes:
        if key.startswith(a):
            key = b + key[len(a):]
            break
    for a, b in inner:
        key = key.replace(a, b)
    return key


def _folder_file(folder, name):
    for fn in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name / fn).is_file():
            return folder / name / fn
    raise CheckpointError(f"{folder / name}: no diffusion_pytorch_model.safetensors or model.safetensors "
                          f"(pickle .bin weights are not read from folders)")


def _json(path):
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    return json.loads(path.read_text())


def _text_config_from_diffusers(t, folder, tokenizer, sdxl):
    """diffusers' SD 2 folders store the text tower already cut where SD reads it, so read its last layer; SDXL's
    are whole and read at the penultimate layer, without the final LayerNorm (diffusers' hidden_states[-2])."""
    pad = folder_pad_token(folder / tokenizer)
    return TextConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                      intermediate_size=t["intermediate_size"],
                      num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                      max_position_embeddings=t.get("max_position_embeddings", 77),
                      hidden_act=t.get("hidden_act", "quick_gelu"), layer_norm_eps=t.get("layer_norm_eps", 1e-5),
                      penultimate=sdxl, final_norm=not sdxl, pad_with_eot=pad == "<|endoftext|>")


def config_from_diffusers(folder):
    folder = Path(folder)
    u, v, t = (_json(folder / n / "config.json") for n in ("unet", "vae", "text_encoder"))
    sdxl = u.get("addition_embed_type") == "text_time"
    if sdxl and not (folder / "text_encoder_2").is_dir():
        raise CheckpointError(f"{folder}: an SDXL UNet (addition_embed_type text_time) but no text_encoder_2/ "
                              f"(the SDXL refiner's folders have only text_encoder_2/ and are not supported)"
                              if (folder / "text_encoder").is_dir() else f"{folder}: no text_encoder_2/")
    if u.get("addition_embed_type") not in (None, "text_time") or u.get("class_embed_type") is not None:
        raise CheckpointError(f"{folder}: unsupported UNet conditioning (addition_embed_type "
                              f"{u.get('addition_embed_type')!r}, class_embed_type {u.get('class_embed_type')!r})")
    boc, heads = u["block_out_channels"], u.get("attention_head_dim", 8)
    depth = u.get("transformer_layers_per_block", 1)
    unet = UNetConfig(in_channels=u["in_channels"], out_channels=u["out_channels"], model_channels=boc[0],
                      channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=u["layers_per_block"],
                      attention_resolutions=tuple(2 ** i for i, b in enumerate(u["down_block_types"])
                                                  if "CrossAttn" in b),
                      context_dim=u["cross_attention_dim"],
                      use_linear_in_transformer=u.get("use_linear_projection", False),
                      groups=u.get("norm_num_groups", 32),
                      transformer_depth=depth if isinstance(depth, int) else tuple(depth),
                      adm_in_channels=(u.get("projection_class_embeddings_input_dim") or 0) if sdxl else 0)
    if isinstance(heads, int):  # diffusers calls the head count of SD 1.x "attention_head_dim"
        unet.num_heads = heads
    else:
        dims = {c // h for c, h, d in zip(boc, heads, u["down_block_types"]) if "CrossAttn" in d}
        if len(dims) != 1:
            raise CheckpointError(f"unsupported attention_head_dim {heads} for block_out_channels {boc}")
        unet.num_head_channels = dims.pop()
    vboc = v["block_out_channels"]
    vae = VAEConfig(ch=vboc[0], ch_mult=tuple(c // vboc[0] for c in vboc), num_res_blocks=v["layers_per_block"],
                    z_channels=v["latent_channels"], in_channels=v.get("in_channels", 3),
                    out_ch=v.get("out_channels", 3),
                    groups=v.get("norm_num_groups", 32), scale_factor=v.get("scaling_factor", 0.18215))
    text = _text_config_from_diffusers(t, folder, "tokenizer", sdxl)
    cfg = ModelConfig(name=f"diffusers:{folder.name}", unet=unet, vae=vae, text=text,
                      image_size=u.get("sample_size", 64) * 2 ** (len(vboc) - 1), regulate_blocks=None)
    if sdxl:
        t2 = _json(folder / "text_encoder_2" / "config.json")
        cfg.text2 = _text_config_from_diffusers(t2, folder, "tokenizer_2", sdxl)
        cfg.text2.projection_dim = t2.get("projection_dim", t2["hidden_size"])
        cfg.micro_cond_dim = u.get("addition_time_embed_dim", 256)
        cfg.zero_empty_negative = True
        mi = folder / "model_index.json"
        if mi.is_file():
            cfg.zero_empty_negative = json.loads(mi.read_text()).get("force_zeros_for_empty_prompt", True)
        cfg.vae_upcast = v.get("force_upcast", True)
        cfg.default_guidance = 5.0
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        s = json.loads(sched.read_text())
        cfg.prediction = "v" if s.get("prediction_type") == "v_prediction" else "epsilon"
        cfg.beta_start, cfg.beta_end = s.get("beta_start", cfg.beta_start), s.get("beta_end", cfg.beta_end)
    return cfg


def diffusers_to_official(folder, cfg, dtype=None, vae_float32=False):
    """Rule 3: read a diffusers folder and rename its keys to the official ones, for the model built from cfg.
    Floating tensors are cast to `dtype` as they are read (the VAE's to float32 with `vae_float32`)."""
    folder = Path(folder)
    with torch.device("meta"):
        want = StableDiffusion(cfg).state_dict()
    sources = {"model.diffusion_model.": ("unet", *unet_renames(cfg.unet)),
               "first_stage_model.": ("vae", *_vae_renames(cfg.vae))}
    if cfg.text2 is None:
        sources["cond_stage_model.transformer."] = ("text_encoder", [], [])
    else:
        sources["conditioner.embedders.0.transformer."] = ("text_encoder", [], [])
        # CLIPTextModelWithProjection: its tower, and text_projection as a Linear (weight = OpenCLIP's matrix^T)
        sources["conditioner.embedders.1."] = ("text_encoder_2", [("transformer.", "")], [])
    state, missing, unexpected = {}, [], []
    for prefix, (sub, prefixes, inner) in sources.items():
        tensors, _ = read_safetensors(_folder_file(folder, sub), dtype,
                                      ("",) if vae_float32 and sub == "vae" else ())
        if sub.startswith("text_encoder") and not any(k.startswith("text_model.") for k in tensors):
            # transformers 5 saves without that level
            tensors = {k if k.startswith("text_projection") else f"text_model.{k}": v for k, v in tensors.items()}
        used = set()
        for key in (k for k in want if k.startswith(prefix)):
            src = _rename(key[len(prefix):], prefixes, inner)
            if src == "text_projection":
                src = "text_projection.weight"
            if src not in tensors:
                missing.append(f"{sub}/{src} (for {key})")
                continue
            t = tensors[src]
            if src == "text_projection.weight":
                t = t.T.contiguous()
            if t.ndim == 2 and want[key].ndim == 4:  # the VAE mid-block attention: Linear there, 1x1 conv here
                assert want[key].shape[2:] == (1, 1), key
                t = t[:, :, None, None]
            state[key], _ = t, used.add(src)
        unexpected += [f"{sub}/{k}" for k in tensors if k not in used and not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(mismatch_message(folder, missing, unexpected, []))
    return state
