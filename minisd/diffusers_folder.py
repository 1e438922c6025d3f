"""Reading a diffusers-format folder (`unet/ vae/ text_encoder/ [text_encoder_2/] tokenizer/ scheduler/`; SD 3's
`transformer/ vae/ text_encoder/ text_encoder_2/ [text_encoder_3/ tokenizer_3/]`): its configs become a
ModelConfig, and its weights are renamed block by block into the official single-file names, by rules
(minisd/blocks.py for the UNet, _mmdit_renames for SD 3's transformer), so the model loads them as it loads an
official file."""
import json
from dataclasses import replace
from pathlib import Path

import torch

from .blocks import unet_renames
from .checkpoint import SD3_TEXT, CheckpointError, inference_keys, mismatch_message, new_model, read_safetensors, \
    sd3_config
from .config import MMDiTConfig, ModelConfig, T5Config, TextConfig, UNetConfig, VAEConfig
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


def _mmdit_renames():
    """Official MMDiT names -> diffusers' SD3Transformer2DModel (diffusers' own single-file converter, read
    backwards). `{}` stands for q, k and v: one fused `qkv` here is three projections there."""
    prefixes = [("x_embedder.", "pos_embed."), ("pos_embed", "pos_embed.pos_embed"),
                ("t_embedder.", "time_text_embed.timestep_embedder."),
                ("y_embedder.", "time_text_embed.text_embedder."), ("final_layer.linear.", "proj_out."),
                ("final_layer.adaLN_modulation.1.", "norm_out.linear."), ("joint_blocks.", "transformer_blocks.")]
    inner = [("embedder.mlp.0.", "embedder.linear_1."), ("embedder.mlp.2.", "embedder.linear_2."),
             # the image stream
             ("x_block.attn.qkv.", "attn.to_{}."), ("x_block.attn.ln_", "attn.norm_"),
             ("x_block.attn.proj.", "attn.to_out.0."), ("x_block.attn2.qkv.", "attn2.to_{}."),
             ("x_block.attn2.ln_", "attn2.norm_"), ("x_block.attn2.proj.", "attn2.to_out.0."),
             ("x_block.adaLN_modulation.1.", "norm1.linear."), ("x_block.mlp.fc1.", "ff.net.0.proj."),
             ("x_block.mlp.fc2.", "ff.net.2."),
             # the text stream
             ("context_block.attn.qkv.", "attn.add_{}_proj."), ("context_block.attn.ln_", "attn.norm_added_"),
             ("context_block.attn.proj.", "attn.to_add_out."),
             ("context_block.adaLN_modulation.1.", "norm1_context.linear."),
             ("context_block.mlp.fc1.", "ff_context.net.0.proj."), ("context_block.mlp.fc2.", "ff_context.net.2.")]
    return prefixes, inner


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


def _vae_config(v):
    vboc = v["block_out_channels"]
    return VAEConfig(ch=vboc[0], ch_mult=tuple(c // vboc[0] for c in vboc), num_res_blocks=v["layers_per_block"],
                     z_channels=v["latent_channels"], in_channels=v.get("in_channels", 3),
                     out_ch=v.get("out_channels", 3), groups=v.get("norm_num_groups", 32),
                     scale_factor=v.get("scaling_factor", 0.18215), shift_factor=v.get("shift_factor") or 0.0,
                     use_quant_conv=v.get("use_quant_conv", True))


# what an SD 3 folder must hold, to name a part that is missing
SD3_PARTS = {"transformer": "the MMDiT", "vae": "the VAE", "text_encoder": "CLIP-L",
             "text_encoder_2": "OpenCLIP bigG"}


def sd3_config_from_diffusers(folder):
    """An SD 3 / 3.5 folder: the MMDiT's shape from transformer/config.json, the family's defaults (shift,
    sampler, steps) as for the equivalent single file (diffusers' scheduler config says shift 3 for every file;
    Stability's reference, which minisd follows, uses 1 for SD 3 Medium). Without text_encoder_3/, no T5."""
    for name, what in SD3_PARTS.items():
        if not (folder / name / "config.json").is_file():
            raise CheckpointError(f"{folder}: an SD 3 diffusers folder without {name}/config.json ({what})")
    t, v = _json(folder / "transformer" / "config.json"), _json(folder / "vae" / "config.json")
    if t.get("qk_norm") not in (None, "rms_norm"):
        raise CheckpointError(f"{folder}: transformer qk_norm {t['qk_norm']!r}; SD 3 has none or rms_norm")
    m = MMDiTConfig(depth=t["num_layers"], hidden_size=t["num_attention_heads"] * t["attention_head_dim"],
                    num_heads=t["num_attention_heads"], patch_size=t["patch_size"], in_channels=t["in_channels"],
                    pos_embed_max_size=t["pos_embed_max_size"], adm_in_channels=t["pooled_projection_dim"],
                    context_dim=t["joint_attention_dim"], qk_norm=t.get("qk_norm") == "rms_norm",
                    x_block_self_attn_layers=tuple(t.get("dual_attention_layers") or ()))
    cfg = sd3_config(m)
    cfg.vae = _vae_config(v)
    cfg.image_size = t.get("sample_size", 128) * cfg.vae.downsample
    for attr, name in (("text", "text_encoder"), ("text2", "text_encoder_2")):
        # the sizes from the folder; how SD 3 reads each CLIP (layer, padding, names) from the family. CLIP-L's
        # projection stays unused (projection_dim 0): SD 3 pools CLIP-L unprojected, as Stability's reference
        c = _json(folder / name / "config.json")
        setattr(cfg, attr, replace(
            getattr(cfg, attr), vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"], max_position_embeddings=c.get("max_position_embeddings", 77),
            hidden_act=c.get("hidden_act", "quick_gelu"), layer_norm_eps=c.get("layer_norm_eps", 1e-5),
            projection_dim=c.get("projection_dim", c["hidden_size"]) if attr == "text2" else 0))
    t5 = folder / "text_encoder_3" / "config.json"
    if not t5.is_file():
        print(f"no text_encoder_3/ in {folder}: zeros stand in for T5-XXL's tokens")
        cfg.t5 = None
        return cfg
    c = _json(t5)
    if c.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise CheckpointError(f"{t5}: feed_forward_proj {c['feed_forward_proj']!r}; SD 3's T5 v1.1 is gated-gelu")
    cfg.t5 = T5Config(vocab_size=c["vocab_size"], d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"],
                      num_layers=c["num_layers"], num_heads=c["num_heads"],
                      relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
                      relative_attention_max_distance=c.get("relative_attention_max_distance", 128))
    return cfg


def config_from_diffusers(folder):
    folder = Path(folder)
    if (folder / "transformer").is_dir():
        return sd3_config_from_diffusers(folder)
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
    vae = _vae_config(v)
    text = _text_config_from_diffusers(t, folder, "tokenizer", sdxl)
    cfg = ModelConfig(name=f"diffusers:{folder.name}", unet=unet, vae=vae, text=text,
                      image_size=u.get("sample_size", 64) * vae.downsample, regulate_blocks=None)
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


def _sd3_sources(cfg):
    sources = {"model.diffusion_model.": ("transformer", *_mmdit_renames()),
               "first_stage_model.": ("vae", *_vae_renames(cfg.vae)),
               SD3_TEXT["clip_l"]: ("text_encoder", [], []), SD3_TEXT["clip_g"]: ("text_encoder_2", [], [])}
    if cfg.t5 is not None:
        sources[SD3_TEXT["t5xxl"]] = ("text_encoder_3", [], [])
    return sources


def _sd3_text(tensors, prefix, sub):
    """The single file's own rules (checkpoint.inference_keys) on a text encoder's tensors: T5's tied embedding
    under both its names, CLIP-L's projection dropped (SD 3 pools CLIP-L unprojected, as Stability's reference)."""
    proj = tensors.get("text_projection.weight") if sub == "text_encoder" else None
    if proj is not None and not torch.equal(proj.float(), torch.eye(*proj.shape)):
        print(f"{sub}/ has a text_projection that is not the identity; unused: SD 3 pools CLIP-L unprojected, as "
              f"Stability's reference (diffusers' pipeline projects it)")
    return {k[len(prefix):]: v for k, v in inference_keys({prefix + k: v for k, v in tensors.items()}).items()}


def diffusers_to_official(folder, cfg, dtype=None, vae_float32=False):
    """Rule 3: read a diffusers folder and rename its keys to the official ones, for the model built from cfg.
    Floating tensors are cast to `dtype` as they are read (the VAE's to float32 with `vae_float32`)."""
    folder = Path(folder)
    with torch.device("meta"):
        want = new_model(cfg).state_dict()
    if cfg.is_sd3:
        sources = _sd3_sources(cfg)
    else:
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
        if sub in ("text_encoder", "text_encoder_2") and not any(k.startswith("text_model.") for k in tensors):
            # transformers 5 saves without that level
            tensors = {k if k.startswith("text_projection") else f"text_model.{k}": v for k, v in tensors.items()}
        if cfg.is_sd3 and sub.startswith("text_encoder"):
            tensors = _sd3_text(tensors, prefix, sub)
        used = set()
        for key in (k for k in want if k.startswith(prefix)):
            src = _rename(key[len(prefix):], prefixes, inner)
            matrix = src == "text_projection"  # SDXL's OpenCLIP matrix (x @ P)
            if matrix:
                src = "text_projection.weight"
            srcs = [src.format(c) for c in "qkv"] if "{}" in src else [src]
            gone = [s for s in srcs if s not in tensors]
            if gone:
                missing += [f"{sub}/{s} (for {key})" for s in gone]
                continue
            t = torch.cat([tensors[s] for s in srcs]) if len(srcs) > 1 else tensors[src]
            if matrix:
                t = t.T.contiguous()
            if t.ndim == 2 and want[key].ndim == 4:  # the VAE mid-block attention: Linear there, 1x1 conv here
                assert want[key].shape[2:] == (1, 1), key
                t = t[:, :, None, None]
            if cfg.is_sd3 and ".adaLN_modulation." in key and want[key].shape[0] == 2 * cfg.mmdit.hidden_size:
                # a two-part modulation (final layer, the last block's text stream) is (shift, scale) here and
                # (scale, shift) in diffusers' AdaLayerNormContinuous
                t = torch.cat(t.chunk(2)[::-1])
            state[key] = t
            used.update(srcs)
        unexpected += [f"{sub}/{k}" for k in tensors if k not in used and not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(mismatch_message(folder, missing, unexpected, []))
    return state
