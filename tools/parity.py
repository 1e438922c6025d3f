"""Does minisd compute what the reference implementations compute, at full size?

Builds Stable Diffusion 1.5 and 2.1 with random weights *in the reference code*: the original `ldm` UNetModel,
Encoder and Decoder with the hyper-parameters of the official v1/v2-inference.yaml, transformers' CLIPTextModel
(CLIP ViT-L/14's text tower) for SD 1, and for SD 2 an OpenCLIP ViT-H/14 text tower in OpenCLIP's own layout, whose
reference is the CLIPTextModel that diffusers' converter makes of it. Each family is written as one official
single-file checkpoint with the references' own key names and no minisd metadata, so minisd must also recognise
it from its keys. minisd loads it with `load_model`, and the table shows the largest differences of one UNet call
at 512 px, one VAE decode of a 64x64 latent and the text embeddings of a prompt.

    python -m tools.parity                   # both families: a few minutes on CPU, about 10 GB of memory
    python -m tools.parity --family sd2
    python -m tools.parity --only sdxl       # SDXL base (random weights): about 15 GB of memory at its peak
    python -m tools.parity --only sd3.5-medium   # SD 3.5 Medium's MMDiT and VAE against diffusers (sd3.5-large,
                                                 # sd3-medium too; Large in a 3-block stack at full width)

tests/test_parity.py runs the same builders on tiny configs.
"""
import argparse
import contextlib
import gc
import gzip
import io
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from minisd.tokenizer import DEFAULT_VOCAB

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."   # SD 1.x: transformers' names under `text_model`
OPENCLIP = "cond_stage_model.model."                # SD 2.x: OpenCLIP's names
XL_CLIP = "conditioner.embedders.0.transformer.text_model."  # SDXL's CLIP ViT-L (sgm's FrozenCLIPEmbedder)
XL_OPENCLIP = "conditioner.embedders.1.model."               # SDXL's OpenCLIP bigG (sgm's FrozenOpenCLIPEmbedder2)

# The hyper-parameters of the official configs (configs/stable-diffusion/v1-inference.yaml, v2-inference.yaml),
# written out here rather than taken from minisd.config, so that a wrong minisd config cannot agree with itself.
SD1_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                transformer_depth=1, context_dim=768, legacy=False)
SD2_UNET = dict(SD1_UNET, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)
SD_VAE_EMBED_DIM = 4
# CLIP ViT-L/14 (openai/clip-vit-large-patch14) text tower.
SD1_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# OpenCLIP ViT-H/14 text tower (width 1024, 16 heads, 24 layers, GELU); SD 2 reads the output of layer 23.
SD2_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)
# SDXL base 1.0, as diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json writes sgm's
# sd_xl_base.yaml (model_channels 320, channel_mult [1, 2, 4], attention_resolutions [4, 2], transformer_depth
# [1, 2, 10], num_head_channels 64, context_dim 2048, adm_in_channels 2816).
XL_UNET = dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
               down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
               transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816, norm_num_groups=32, sample_size=128)
# CLIP ViT-L/14 (as SD 1) and OpenCLIP ViT-bigG/14 (width 1280, 20 heads, 32 layers, GELU, projection 1280).
XL_TEXT = SD1_TEXT
XL_TEXT2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)
XL_PROJECTION = 1280
PROMPT = "a red cube on top of a blue sphere, studio photo"


# -------------------------------------------------------------------------------------------- the references

def perturb(module, std=0.02, seed=0):
    """Add noise to every parameter: the references zero-initialise the last layer of each residual branch, and a
    zero layer would hide any mistake in the layers it silences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def write_clip_vocab(folder, pad_token="<|endoftext|>"):
    """vocab.json + merges.txt derived from the .gz the way CLIP does, written independently of minisd:
    256 byte tokens, their </w> variants, merges 1..48894, <|startoftext|>, <|endoftext|>."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_chars = [chr(b) for b in keep] + [chr(256 + n) for n in range(256 - len(keep))]
    lines = gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}), encoding="utf-8")
    return folder



def quiet():
    """ldm prints a line for each attention block it makes."""
    return contextlib.redirect_stdout(io.StringIO())


def ldm_unet(params):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    with quiet():
        return UNetModel(**params, use_checkpoint=False)


class LdmVAE(torch.nn.Module):
    """The parts of ldm's AutoencoderKL that inference uses, under the same names (its class itself needs
    pytorch-lightning and a loss)."""

    def __init__(self, params, embed_dim):
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
        super().__init__()
        with quiet():
            self.encoder, self.decoder = Encoder(**params), Decoder(**params)
        z = params["z_channels"]
        self.quant_conv = torch.nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, z, 1)

    def encode_mean(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x))).mean

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def clip_text(params):
    return CLIPTextModel(CLIPTextConfig(**params)).eval()


def clip_state(clip):
    """transformers 5 has no `text_model` level in CLIPTextModel; the official files (and transformers 4) do."""
    tower = getattr(clip, "text_model", clip)
    return {CLIP + k: v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}


def openclip_text_shapes(params, prefix=OPENCLIP, projection=None):
    """Key -> shape of an OpenCLIP text tower in OpenCLIP's layout: fused q/k/v `in_proj`, `c_fc`/`c_proj`,
    `ln_final`, and a text projection (used by SDXL only) and logit scale (used by neither)."""
    w, mlp = params["hidden_size"], params["intermediate_size"]
    s = {"token_embedding.weight": (params["vocab_size"], w),
         "positional_embedding": (params["max_position_embeddings"], w),
         "ln_final.weight": (w,), "ln_final.bias": (w,), "text_projection": (w, projection or w), "logit_scale": ()}
    for i in range(params["num_hidden_layers"]):
        b = f"transformer.resblocks.{i}."
        s.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj_weight": (3 * w, w),
                  b + "attn.in_proj_bias": (3 * w,), b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                  b + "ln_2.weight": (w,), b + "ln_2.bias": (w,), b + "mlp.c_fc.weight": (mlp, w),
                  b + "mlp.c_fc.bias": (mlp,), b + "mlp.c_proj.weight": (w, mlp), b + "mlp.c_proj.bias": (w,)})
    return {prefix + k: v for k, v in s.items()}


def openclip_text_state(params, seed=0, prefix=OPENCLIP, projection=None):
    """Random weights for an OpenCLIP text tower: LayerNorms near 1, matrices scaled by 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in openclip_text_shapes(params, prefix, projection).items():
        r = torch.randn(shape, generator=g)
        if k.endswith("logit_scale"):
            r = torch.tensor(4.6)
        elif ".ln_" in k:
            r = r * 0.1 + (1.0 if k.endswith("weight") else 0.0)
        elif len(shape) == 2 and "embedding" not in k:
            r = r * shape[1] ** -0.5
        else:  # embeddings and biases
            r = r * 0.02
        state[k] = r
    return state


def clip_from_openclip(state, params):
    """The SD 2 reference: what diffusers ships for SD 2 (a CLIPTextModel cut after the penultimate layer, whose
    last_hidden_state is that layer through the final LayerNorm), filled by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    last = params["num_hidden_layers"] - 1
    clip = clip_text(dict(params, num_hidden_layers=last))
    converted = convert_open_clip_checkpoint(clip, state, prefix=OPENCLIP)
    # diffusers drops layer 23 by name (the ViT-H tower); drop the last layer of any depth the same way
    keep = {k.removeprefix("text_model."): v for k, v in converted.items()
            if not k.startswith((f"text_model.encoder.layers.{last}.", "text_projection"))}
    clip.load_state_dict(keep, strict=True)
    return clip


def clip_with_projection_from_openclip(state, params, prefix=XL_OPENCLIP):
    """SDXL's second text encoder as diffusers ships it (a whole CLIPTextModelWithProjection, read at
    hidden_states[-2], pooled through text_projection), filled by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection
    proj = state[prefix + "text_projection"].shape[1]
    with torch.device("meta"):  # filled with the tensors themselves: bigG is 2.8 GB
        clip = CLIPTextModelWithProjection(CLIPTextConfig(**params, projection_dim=proj)).eval()
    clip.load_state_dict(convert_open_clip_checkpoint(clip, state, prefix=prefix), strict=True, assign=True)
    emb = clip.text_model.embeddings  # a non-persistent buffer, left on meta
    emb.position_ids = torch.arange(emb.position_embedding.num_embeddings).expand((1, -1))
    return clip


def random_official(shapes, seed=0, dtype=torch.float32):
    """Random tensors for a key -> shape table, each drawn from a generator seeded by its name (the same in any
    order): norm scales near 1, matrices and kernels scaled by 1/sqrt(fan-in), biases small. Each is cast to
    `dtype` as it is drawn."""
    import zlib
    state = {}
    for k, shape in shapes.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(k.encode()))
        r = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            r *= torch.Size(shape[1:]).numel() ** -0.5
        elif k.endswith("weight"):
            r = 1 + 0.1 * r
        else:
            r *= 0.02
        state[k] = r.to(dtype)
    return state


def diffusers_unet_from_official(config, state):
    """diffusers' UNet2DConditionModel built from its own `config`, filled by diffusers' own single-file converter
    from official keys (`model.diffusion_model.*`, `label_emb.0.*` ...); strict, so every key must map. Built on
    the meta device and given the tensors themselves: no second copy of a 10 GB UNet."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dict(unet.config)), strict=True, assign=True)
    return unet.eval()


def diffusers_vae_from_official(config, state):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, dict(vae.config)), strict=True)
    return vae.eval()


def xl_time_ids(h, w, b):
    """SDXL's micro-conditioning as diffusers builds it by default: original = target = (h, w), crop (0, 0)."""
    return torch.tensor([[h, w, 0, 0, h, w]] * b, dtype=torch.float32)


def reference_ids(prompt, pad_with_eot):
    """Token ids as the references build them: CLIP pads with <|endoftext|>, open_clip.tokenize with 0."""
    from minisd.tokenizer import Tokenizer
    ids = Tokenizer(pad_with_eot=True)([prompt])
    if not pad_with_eot:
        eot = ids[0].tolist().index(ids[0, -1].item())
        ids[0, eot + 1:] = 0
    return ids


def diffusers_unet_config(c, micro_cond_dim=256):
    """A diffusers UNet2DConditionModel config for a minisd UNetConfig. diffusers calls SD 1's head *count*
    attention_head_dim (an int); SD 2's fixed 64-dim heads are a per-level list of head counts."""
    levels = range(len(c.channel_mult))
    boc = [c.model_channels * m for m in c.channel_mult]
    attn = [2 ** i in c.attention_resolutions for i in levels]
    heads = c.num_heads if c.num_head_channels == -1 else [b // c.num_head_channels for b in boc]
    depth = c.transformer_depth if isinstance(c.transformer_depth, int) else list(c.transformer_depth)
    extra = {}
    if c.adm_in_channels:  # SDXL: pooled text + 6 micro-conditioning numbers of micro_cond_dim channels each
        extra = dict(addition_embed_type="text_time", projection_class_embeddings_input_dim=c.adm_in_channels,
                     addition_time_embed_dim=micro_cond_dim)
    return dict(in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=boc,
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                layers_per_block=c.num_res_blocks, cross_attention_dim=c.context_dim, attention_head_dim=heads,
                use_linear_projection=c.use_linear_in_transformer, norm_num_groups=c.groups,
                transformer_layers_per_block=depth, sample_size=64, **extra)


def save_official(path, state, cfg=None):
    """One safetensors file, written by safetensors itself (not minisd's writer); `cfg` only for tiny models,
    which no key-based detection can recognise."""
    meta = {"minisd_config": cfg.to_json()} if cfg is not None else None
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)


def difference(ref, out):
    """(max |ref - out|, the same over the output scale max(1, max |ref|))."""
    d = (ref.float() - out.float()).abs().max().item()
    return d, d / max(1.0, ref.abs().max().item())


# ---------------------------------------------------------------------------------------- one family, full size

def family_parity(name, tmp, px=512):
    """Build the references of one family, keep their outputs, write the checkpoint, load it into minisd and
    compare. One reference lives at a time; their weights wait in `state` until the file is written."""
    from minisd.loading import load_model
    sd2 = name == "sd2"
    g = torch.Generator().manual_seed(0)
    lat = px // 8
    x = torch.randn(1, 4, lat, lat, generator=g)
    t = torch.tensor([421])
    ctx_dim = 1024 if sd2 else 768
    ctx = torch.randn(1, 77, ctx_dim, generator=g)
    z = torch.randn(1, 4, 64, 64, generator=g)
    ids = reference_ids(PROMPT, pad_with_eot=not sd2)
    ref, state, times = {}, {}, {}

    start = time.perf_counter()
    unet = perturb(ldm_unet(SD2_UNET if sd2 else SD1_UNET), seed=1)
    with torch.no_grad():
        ref["unet"] = unet(x, t, context=ctx)
    state.update({UNET + k: v for k, v in unet.state_dict().items()})
    del unet
    vae = perturb(LdmVAE(SD_VAE, SD_VAE_EMBED_DIM), seed=2)
    with torch.no_grad():
        ref["vae"] = vae.decode(z)
    state.update({VAE + k: v for k, v in vae.state_dict().items()})
    del vae
    if sd2:
        text = openclip_text_state(SD2_TEXT, seed=3)
        clip = clip_from_openclip(text, SD2_TEXT)
        state.update(text)
    else:
        clip = perturb(clip_text(SD1_TEXT), std=0.01, seed=3)
        state.update(clip_state(clip))
    with torch.no_grad():
        ref["text"] = clip(input_ids=ids).last_hidden_state
    del clip
    path = Path(tmp) / f"{name}-random.safetensors"
    save_official(path, state)
    del state
    gc.collect()
    times["reference"] = time.perf_counter() - start

    start = time.perf_counter()
    from minisd.tokenizer import Tokenizer
    model = load_model(path)
    path.unlink()
    out = {}
    with torch.no_grad():
        out["unet"] = model.unet(x, t, ctx)
        out["vae"] = model.vae.decode(z)
        mine = Tokenizer(pad_with_eot=model.cfg.text.pad_with_eot)([PROMPT])
        assert torch.equal(mine, ids), "minisd's tokenizer pads differently from the reference"
        out["text"] = model.encode_text(mine)
    times["minisd"] = time.perf_counter() - start
    del model
    gc.collect()
    what = {"unet": f"UNet, {px} px, t=421", "vae": "VAE decode, 64x64 latent", "text": "text embeddings (77 tokens)"}
    return [(name, what[k], *difference(ref[k], out[k]), ref[k].abs().max().item()) for k in ref], times


def sdxl_parity(tmp, px=512):
    """SDXL base at full size with one model resident at a time. The references: diffusers' SDXL UNet (config
    XL_UNET, written out above) and SD's ldm VAE, filled from official-named random tensors by diffusers' own
    converter, transformers' CLIPTextModel (ViT-L) and CLIPTextModelWithProjection (bigG, from OpenCLIP's layout
    by diffusers' converter). Their outputs are kept, their tensors written as one official single file (no minisd
    metadata: detected from the keys), the references freed, and only then minisd loads the file."""
    from minisd.loading import load_model
    from minisd.unet import UNet
    from minisd.config import UNetConfig
    g = torch.Generator().manual_seed(0)
    lat = px // 8
    x = torch.randn(1, 4, lat, lat, generator=g)
    t = torch.tensor([421])
    ctx = torch.randn(1, 77, 2048, generator=g)
    pooled = torch.randn(1, XL_PROJECTION, generator=g)
    time_ids = xl_time_ids(px, px, 1)
    z = torch.randn(1, 4, 64, 64, generator=g)
    ids = [reference_ids(PROMPT, pad_with_eot=True), reference_ids(PROMPT, pad_with_eot=False)]
    ref, state, times = {}, {}, {}

    start = time.perf_counter()
    # the official UNet key names and shapes, from sgm's hyper-parameters (diffusers' strict load checks them)
    sgm = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_head_channels=64,
                     context_dim=2048, transformer_depth=(1, 2, 10), use_linear_in_transformer=True,
                     adm_in_channels=2816)
    with torch.device("meta"):
        shapes = {UNET + k: v.shape for k, v in UNet(sgm).state_dict().items()}
    state.update(random_official(shapes, seed=1))
    unet = diffusers_unet_from_official(XL_UNET, state)
    with torch.no_grad():
        ref["unet"] = unet(x, t, encoder_hidden_states=ctx,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    del unet
    gc.collect()
    print(f"  reference UNet done ({time.perf_counter() - start:.0f} s)", flush=True)
    vae = perturb(LdmVAE(SD_VAE, SD_VAE_EMBED_DIM), seed=2)
    with torch.no_grad():
        ref["vae"] = vae.decode(z)
    state.update({VAE + k: v for k, v in vae.state_dict().items()})
    del vae
    clip = perturb(clip_text(XL_TEXT), std=0.01, seed=3)
    state.update({XL_CLIP + k[len(CLIP):]: v for k, v in clip_state(clip).items()})
    with torch.no_grad():
        first = clip(input_ids=ids[0], output_hidden_states=True).hidden_states[-2]
    del clip
    big = openclip_text_state(XL_TEXT2, seed=4, prefix=XL_OPENCLIP, projection=XL_PROJECTION)
    clip2 = clip_with_projection_from_openclip(big, XL_TEXT2)
    with torch.no_grad():
        out2 = clip2(input_ids=ids[1], output_hidden_states=True)
        ref["text"] = torch.cat([first, out2.hidden_states[-2]], dim=-1)
        ref["pooled"] = out2.text_embeds
    del clip2, out2
    state.update(big)
    del big
    gc.collect()
    path = Path(tmp) / "sd_xl_base-random.safetensors"
    save_official(path, state)
    del state
    gc.collect()
    times["reference"] = time.perf_counter() - start

    start = time.perf_counter()
    from minisd.tokenizer import Tokenizer
    model = load_model(path)
    path.unlink()
    assert model.cfg.name == "sdxl", model.cfg.name
    out = {}
    with torch.no_grad():
        out["unet"] = model.unet(x, t, ctx, model.vector(pooled, time_ids))
        out["vae"] = model.vae.decode(z)
        mine = [Tokenizer(pad_with_eot=c.pad_with_eot)([PROMPT]) for c in (model.cfg.text, model.cfg.text2)]
        assert all(torch.equal(a, b) for a, b in zip(mine, ids)), "minisd's tokenizers pad differently"
        out["text"], out["pooled"] = model.encode_text(mine)
    times["minisd"] = time.perf_counter() - start
    del model
    gc.collect()
    what = {"unet": f"UNet, {px} px, t=421, text-time vector", "vae": "VAE decode, 64x64 latent",
            "text": "text embeddings (77 x 2048)", "pooled": "pooled text (bigG projection)"}
    return [("sdxl", what[k], *difference(ref[k], out[k]), ref[k].abs().max().item()) for k in ref], times


# ------------------------------------------------------------------------------------------------- SD 3 / 3.5

# diffusers' transformer configs of the official repositories (stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-medium, stable-diffusion-3.5-large: transformer/config.json), written out here so that a
# wrong minisd config cannot agree with itself; and the published sizes (the model cards)
SD3_TRANSFORMERS = {
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=list(range(13))),
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
}
SD3_PUBLISHED = {"sd3-medium": "2B", "sd3.5-medium": "2.5B", "sd3.5-large": "8.1B"}
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
               layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)


def sd3_counts(name):
    """(minisd's MMDiT, diffusers' SD3Transformer2DModel) sizes on the meta device: parameters plus the learned
    position table (a stored buffer in both)."""
    from diffusers import SD3Transformer2DModel
    from minisd.config import FAMILIES
    from minisd.mmdit import MMDiT
    with torch.device("meta"):
        mine = MMDiT(FAMILIES[name]().mmdit)
        theirs = SD3Transformer2DModel(**SD3_TRANSFORMERS[name])
    return [sum(t.numel() for t in m.state_dict().values()) for m in (mine, theirs)]


def sd3_parity(name, tmp, px=512, depth=None):
    """One MMDiT call of an SD 3 family at full width against diffusers' SD3Transformer2DModel, filled from the same
    official-named random tensors by diffusers' own converter (the converted model shares every tensor but q/k/v
    with minisd's, so both fit in memory at once); minisd's config detected from the keys. `depth` cuts the stack
    to its first depth - 1 blocks and the pre-only last block (SD 3.5 Large: 8B parameters do not fit here twice,
    so its every kind of block is checked at full width in a shorter stack). And the 16-channel VAE's decode."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)
    from minisd.checkpoint import detect_config
    from minisd.config import FAMILIES
    from minisd.mmdit import MMDiT
    from minisd.vae import AutoencoderKL as MiniVAE
    conf = dict(SD3_TRANSFORMERS[name], **({"num_layers": depth} if depth else {}))
    if depth:
        conf["dual_attention_layers"] = [i for i in conf.get("dual_attention_layers", []) if i < depth - 1]
    family = FAMILIES[name]()
    m = family.mmdit
    m.depth, m.x_block_self_attn_layers = conf["num_layers"], tuple(conf.get("dual_attention_layers", ()))
    g = torch.Generator().manual_seed(0)
    lat = px // 8
    x, t = torch.randn(1, 16, lat, lat, generator=g), torch.tensor([750.0])
    ctx, y = torch.randn(1, 154, 4096, generator=g), torch.randn(1, 2048, generator=g)
    z = torch.randn(1, 16, 64, 64, generator=g)
    rows, times = [], {"reference": 0.0, "minisd": 0.0}

    with torch.device("meta"):
        shapes = {UNET + k: v.shape for k, v in MMDiT(m).state_dict().items()}
    state = random_official(shapes, seed=1)
    found = detect_config(state)
    assert found.mmdit == m, (found.mmdit, m)
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(**conf)
        mine = MMDiT(found.mmdit)
    theirs.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(state)), strict=True, assign=True)
    mine.load_state_dict({k[len(UNET):]: v for k, v in state.items()}, strict=True, assign=True)
    del state
    with torch.no_grad():
        start = time.perf_counter()
        ref = theirs.eval()(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=y).sample
        times["reference"] += time.perf_counter() - start
        start = time.perf_counter()
        out = mine.eval()(x, t, y=y, context=ctx)
        times["minisd"] += time.perf_counter() - start
    what = f"MMDiT call, {px} px, t=750, 77 + 77 text tokens" + (f", first {depth} blocks" if depth else "")
    rows.append((name, what, *difference(ref, out), ref.abs().max().item()))
    del theirs, mine
    gc.collect()

    with torch.device("meta"):
        shapes = {VAE + k: v.shape for k, v in MiniVAE(family.vae).state_dict().items()}
    state = random_official(shapes, seed=2)
    vae = AutoencoderKL(**SD3_VAE)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(state), dict(vae.config)), strict=True)
    mini = MiniVAE(family.vae)
    mini.load_state_dict({k[len(VAE):]: v for k, v in state.items()}, strict=True)
    with torch.no_grad():
        rows.append((name, "VAE decode, 64x64 latent", *difference(vae.eval().decode(z).sample, mini.eval().decode(z)),
                     vae.decode(z).sample.abs().max().item()))
    return rows, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", "--only", choices=["sd1", "sd2", "sdxl", "both", *SD3_TRANSFORMERS], default="both",
                    help="both = sd1 and sd2; sdxl needs about 15 GB of memory; sd3.5-medium about 12 GB; "
                         "sd3.5-large is checked in a stack of --depth blocks at full width (its 8B parameters do "
                         "not fit twice in 24 GB)")
    ap.add_argument("--depth", type=int, default=None,
                    help="SD 3: compare a stack of this many joint blocks (default: all; sd3.5-large: 3)")
    ap.add_argument("--px", type=int, default=512, help="image side of the UNet call (latent side = px / 8)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in (["sd1", "sd2"] if args.family == "both" else [args.family]):
            if name in SD3_TRANSFORMERS:
                mine, theirs = sd3_counts(name)
                print(f"{name}: MMDiT parameters + position table: minisd {mine:,}, diffusers {theirs:,}, "
                      f"published {SD3_PUBLISHED[name]}", flush=True)
                depth = args.depth or (3 if name == "sd3.5-large" else None)
                r, times = sd3_parity(name, tmp, args.px, depth)
            else:
                r, times = sdxl_parity(tmp, args.px) if name == "sdxl" else family_parity(name, tmp, args.px)
            rows += r
            print(f"{name}: references {times['reference']:.0f} s, minisd {times['minisd']:.0f} s", flush=True)
    print("\n| family | output | max abs diff | relative | max abs ref |\n|---|---|---|---|---|")
    for fam, what, d, rel, scale in rows:
        print(f"| {fam} | {what} | {d:.2e} | {rel:.2e} | {scale:.3g} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
