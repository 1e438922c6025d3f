"""SDXL: minisd computes what diffusers and transformers compute, on a tiny SDXL-shaped model (first level without
attention, a different transformer depth per level, two text encoders, the text-time vector), in float32.

The references get their weights from official single-file keys through diffusers' own single-file converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`); minisd reads the
same tensors from one safetensors file in the official layout (`conditioner.embedders.0.transformer.text_model.*`,
`conditioner.embedders.1.model.*` with OpenCLIP's fused q/k/v). The whole pipeline is compared with
`StableDiffusionXLPipeline`, and a diffusers folder that it saves loads too.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is the reference")

from minisd.checkpoint import CheckpointError, check_state, detect_config, openclip_to_hf  # noqa: E402
from minisd.config import sdxl, tiny_sdxl  # noqa: E402
from minisd.loading import load_model  # noqa: E402
from minisd.model import StableDiffusion  # noqa: E402
from minisd.pipeline import Pipeline  # noqa: E402
from tools.bench.generate import clip_tokenizer, sd_scheduler  # noqa: E402
from tools.parity import (CLIP, UNET, VAE, XL_CLIP, XL_OPENCLIP, XL_TEXT2, XL_UNET, LdmVAE, clip_state,  # noqa: E402
                          clip_text, clip_with_projection_from_openclip, diffusers_unet_config,
                          diffusers_unet_from_official, diffusers_vae_from_official, openclip_text_shapes,
                          openclip_text_state, perturb, random_official, save_official, xl_time_ids)

try:
    from conftest import assert_within_floor as assert_close, float64_twin
except ImportError:
    from tests.conftest import assert_within_floor as assert_close, float64_twin

PX, STEPS = 32, 3
PROMPTS = ["a red circle left of a blue square", "a hummingbird over a green hill"]
NEGATIVE = ["blurry, grey", "a yellow star"]


def text_params(t):
    return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act)


def vae_config(cfg):
    v = cfg.vae
    return dict(in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
                block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
                down_block_types=["DownEncoderBlock2D"] * len(v.ch_mult),
                up_block_types=["UpDecoderBlock2D"] * len(v.ch_mult), norm_num_groups=v.groups,
                sample_size=cfg.image_size, scaling_factor=v.scale_factor, force_upcast=True)


def official_xl(cfg, seed=0):
    """Random weights of a whole SDXL model under the official single-file keys, and the references filled from
    them by diffusers' converters: (state, diffusers UNet, diffusers VAE, CLIPTextModel,
    CLIPTextModelWithProjection)."""
    with torch.device("meta"):
        unet_shapes = {UNET + k: v.shape for k, v in StableDiffusion(cfg).unet.state_dict().items()}
    unet_state = random_official(unet_shapes, seed)
    unet = diffusers_unet_from_official(diffusers_unet_config(cfg.unet, cfg.micro_cond_dim), unet_state)
    v = cfg.vae
    ldm_vae = perturb(LdmVAE(dict(double_z=True, z_channels=v.z_channels, resolution=64, in_channels=v.in_channels,
                                  out_ch=v.out_ch, ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks,
                                  attn_resolutions=[]), v.z_channels), seed=seed + 1)
    vae_state = {VAE + k: t for k, t in ldm_vae.state_dict().items()}
    vae = diffusers_vae_from_official(vae_config(cfg), vae_state)
    clip = perturb(clip_text(text_params(cfg.text)), std=0.01, seed=seed + 2)
    clip_l = {XL_CLIP + k[len(CLIP):]: t for k, t in clip_state(clip).items()}
    big = openclip_text_state(text_params(cfg.text2), seed=seed + 3, prefix=XL_OPENCLIP,
                              projection=cfg.text2.projection_dim)
    clip2 = clip_with_projection_from_openclip(big, text_params(cfg.text2))
    return {**unet_state, **vae_state, **clip_l, **big}, unet, vae, clip, clip2


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    cfg = tiny_sdxl(image_size=PX)
    state, unet, vae, clip, clip2 = official_xl(cfg)
    tmp = tmp_path_factory.mktemp("sdxl")
    path = tmp / "tiny-sdxl.safetensors"
    save_official(path, state, cfg)   # official keys; the tiny config in the metadata (no detection can size it)
    from diffusers import StableDiffusionXLPipeline
    theirs = StableDiffusionXLPipeline(vae=vae, text_encoder=clip, text_encoder_2=clip2,
                                       tokenizer=clip_tokenizer(tmp / "vocab1", pad_with_eot=True),
                                       tokenizer_2=clip_tokenizer(tmp / "vocab2", pad_with_eot=False),
                                       unet=unet, scheduler=sd_scheduler("ddim"), force_zeros_for_empty_prompt=True,
                                       add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    return SimpleNamespace(cfg=cfg, state=state, path=path, theirs=theirs, model=load_model(path),
                           mine=Pipeline.from_checkpoint(path), tmp=tmp)


@torch.no_grad()
def test_unet_matches_diffusers_text_time(xl):
    """Batch 2, two timesteps, a non-square map; the vector built by minisd from pooled text and sizes, the same
    numbers handed to diffusers as text_embeds and time_ids."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 24, generator=g)
    ctx = torch.randn(2, 77, xl.cfg.unet.context_dim, generator=g)
    pooled = torch.randn(2, xl.cfg.text2.projection_dim, generator=g)
    t, ids = torch.tensor([3, 742]), torch.tensor([[64., 96, 0, 0, 64, 96], [1024, 768, 16, 32, 512, 512]])
    ref, ref64 = (unet(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype),
                       added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}).sample
                  for unet, dtype in ((xl.theirs.unet, torch.float32), (float64_twin(xl.theirs).unet, torch.float64)))
    assert_close(ref, xl.model.unet(x, t, ctx, xl.model.vector(pooled, ids)), ref64)
    other = xl.model.unet(x, t, ctx, xl.model.vector(pooled, ids.flip(0)))
    assert (other - ref).abs().max() > 1e-3, "the micro-conditioning does not matter: the test could not see it"


@torch.no_grad()
def test_text_encoders_match_transformers(xl):
    """CLIP ViT-L and OpenCLIP bigG, each at hidden_states[-2] (no final LayerNorm), concatenated; the pooled
    text is CLIPTextModelWithProjection's text_embeds. Each tokenizer pads its own way, as diffusers' do."""
    ids = [tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for tok in (xl.theirs.tokenizer, xl.theirs.tokenizer_2)]
    mine_ids = [tok(PROMPTS) for tok in xl.mine.tokenizers]
    assert all(torch.equal(a, b) for a, b in zip(ids, mine_ids))
    assert not torch.equal(ids[0], ids[1])  # end-of-text padding vs "!" padding
    (a, b), (a64, b64) = ((pipe.text_encoder(ids[0], output_hidden_states=True),
                           pipe.text_encoder_2(ids[1], output_hidden_states=True))
                          for pipe in (xl.theirs, float64_twin(xl.theirs)))
    context, pooled = xl.model.encode_text(mine_ids)
    assert_close(torch.cat([a.hidden_states[-2], b.hidden_states[-2]], dim=-1), context,
                 torch.cat([a64.hidden_states[-2], b64.hidden_states[-2]], dim=-1))
    assert_close(b.text_embeds, pooled, b64.text_embeds)


@torch.no_grad()
def test_vae_matches_diffusers(xl):
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(8))
    ref64 = float64_twin(xl.theirs).vae.decode(z.double()).sample
    assert_close(xl.theirs.vae.decode(z).sample, xl.model.vae.decode(z), ref64)
    assert xl.model.cfg.vae.scale_factor == 0.13025


def compare_pipelines(theirs, mine, guidance, negative, sampler="ddim"):
    """Final latents and images of diffusers' pipeline (float32, and its float64 twin for the floor) and minisd's."""
    side = PX // mine.cfg.vae.downsample
    latents = torch.randn(len(PROMPTS), 4, side, side, generator=torch.Generator().manual_seed(3))

    def reference(pipe, dtype):
        seen = {}

        def keep_latents(pipe, i, t, kw):
            seen["latents"] = kw["latents"]
            return kw

        pipe.scheduler = sd_scheduler(sampler)
        ref = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance,
                   latents=latents.to(dtype), height=PX, width=PX, output_type="np", callback_on_step_end=keep_latents)
        return seen["latents"], torch.from_numpy(ref.images)

    (ref_latents, ref_images), (ref_latents64, ref_images64) = (reference(theirs, torch.float32),
                                                                reference(float64_twin(theirs), torch.float64))
    out = mine(PROMPTS, negative_prompt=negative or "", steps=STEPS, guidance=guidance, latents=latents.clone(),
               height=PX, width=PX, sampler=sampler, decode=False, return_latents=True)
    images = mine.decode(out.latents).permute(0, 2, 3, 1)
    assert ref_images.shape == images.shape == (len(PROMPTS), PX, PX, 3)
    assert_close(ref_latents, out.latents, ref_latents64)
    assert_close(ref_images, images, ref_images64)   # images are in [0, 1]: absolute = relative
    assert (out.latents - latents).abs().max() > 0.1
    assert images.std() > 1e-3 and (images[0] - images[1]).abs().max() > 1e-3
    return out.latents


@pytest.mark.parametrize("guidance,negative", [(5.0, None), (5.0, NEGATIVE), (1.0, None)])
def test_pipeline_equals_stable_diffusion_xl_pipeline(xl, guidance, negative):
    """minisd's empty negative prompt is diffusers' negative_prompt=None under force_zeros_for_empty_prompt:
    zeros, not the encoded empty string."""
    compare_pipelines(xl.theirs, xl.mine, guidance, negative)


def test_pipeline_with_dpmpp_2m(xl):
    compare_pipelines(xl.theirs, xl.mine, 5.0, NEGATIVE, sampler="dpmpp_2m")


def test_empty_negative_prompt_is_zeros(xl):
    """The rule matters: encoding "" instead gives another image."""
    zero = xl.mine(PROMPTS[0], steps=2, height=PX, width=PX, decode=False, return_latents=True).latents
    xl.mine.cfg.zero_empty_negative = False
    try:
        encoded = xl.mine(PROMPTS[0], steps=2, height=PX, width=PX, decode=False, return_latents=True).latents
    finally:
        xl.mine.cfg.zero_empty_negative = True
    assert (zero - encoded).abs().max() > 1e-3


def test_diffusers_folder_loads(xl, tmp_path):
    """save_pretrained of the SDXL pipeline, as transformers 5 and diffusers write it, read as a folder."""
    xl.theirs.save_pretrained(tmp_path / "xl")
    mine = Pipeline.from_checkpoint(tmp_path / "xl")
    cfg = mine.cfg
    assert cfg.text2 is not None and cfg.unet.adm_in_channels == xl.cfg.unet.adm_in_channels
    assert cfg.unet.transformer_depth == xl.cfg.unet.transformer_depth and cfg.vae.scale_factor == 0.13025
    assert [t.pad_with_eot for t in mine.tokenizers] == [True, False] and cfg.zero_empty_negative
    for k, v in mine.model.state_dict().items():
        ref = xl.model.state_dict()[k]
        assert torch.equal(v, ref), k
    compare_pipelines(xl.theirs, mine, 5.0, NEGATIVE)


# ------------------------------------------------------------------------------------------ full-size keys

def full_size_official_keys():
    """SDXL base's official key set, as meta tensors: the UNet and VAE keys minisd makes (checked against
    diffusers below), CLIP ViT-L in transformers' names, bigG in OpenCLIP's layout with its projection."""
    with torch.device("meta"):
        model = StableDiffusion(sdxl())
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("conditioner.")}
        state.update({XL_CLIP + k[len(CLIP):]: v for k, v in clip_state(clip_text(text_params(sdxl().text))).items()})
        state.update({k: torch.empty(s) for k, s in openclip_text_shapes(XL_TEXT2, XL_OPENCLIP, 1280).items()})
        state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77)
    return state


def test_full_size_sdxl_is_detected_and_every_key_maps():
    state = full_size_official_keys()
    from minisd.checkpoint import inference_keys
    cfg = detect_config(inference_keys(state), path="sd_xl_base_1.0.safetensors")
    assert cfg.name == "sdxl" and cfg.image_size == 1024 and cfg.vae.scale_factor == 0.13025
    with torch.device("meta"):
        want = StableDiffusion(cfg).state_dict()
    check_state(want, openclip_to_hf(inference_keys(state)), "official sdxl")


def test_full_size_unet_keys_fit_diffusers_sdxl_config():
    """minisd's SDXL UNet keys, through diffusers' converter, fill diffusers' SDXL UNet (its config written out
    independently in tools/parity.py) exactly: strict load, same parameter count."""
    with torch.device("meta"):
        state = {UNET + k: v for k, v in StableDiffusion(sdxl()).unet.state_dict().items()}
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
        unet = UNet2DConditionModel(**XL_UNET)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dict(unet.config)), strict=True, assign=True)
    assert sum(p.numel() for p in unet.parameters()) == sum(v.numel() for v in state.values())


# ------------------------------------------------------------------------------------------ bad input

def write_without(xl, path, drop=(), change=None):
    state = {k: v for k, v in xl.state.items() if not k.startswith(tuple(drop))}
    if change:
        state[change] = torch.zeros(state[change].shape[0] + 1, *state[change].shape[1:])
    save_official(path, state, xl.cfg)
    return path


@pytest.mark.parametrize("prefix,says", [
    ("conditioner.embedders.1.", "second text encoder (OpenCLIP ViT-bigG"),
    ("conditioner.embedders.0.", "first text encoder (CLIP ViT-L"),
    ("conditioner.", "first text encoder"),
])
def test_missing_conditioner_is_named(xl, tmp_path, prefix, says):
    with pytest.raises(CheckpointError, match=r"(?s)missing: .*" + says.replace("(", r"\(")):
        load_model(write_without(xl, tmp_path / "x.safetensors", drop=[prefix]))


def test_wrong_shape_is_named(xl, tmp_path):
    key = UNET + "label_emb.0.0.weight"
    with pytest.raises(CheckpointError, match=r"wrong shapes:\n.*label_emb.0.0.weight: checkpoint \(129, 80\)"):
        load_model(write_without(xl, tmp_path / "x.safetensors", change=key))


def test_full_size_file_missing_a_text_encoder_is_still_sdxl():
    state = {k: v for k, v in full_size_official_keys().items() if not k.startswith(XL_OPENCLIP)}
    from minisd.checkpoint import inference_keys
    state = inference_keys(state)
    cfg = detect_config(state)
    with torch.device("meta"):
        want = StableDiffusion(cfg).state_dict()
    with pytest.raises(CheckpointError, match=r"missing: SDXL's second text encoder .*all 517 keys"):
        check_state(want, openclip_to_hf(state), "sdxl")


def test_refiner_is_refused_by_name(tmp_path):
    state = {f"{UNET}label_emb.0.0.weight": torch.zeros(2, 2560),
             f"{UNET}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1280),
             "conditioner.embedders.0.model.text_projection": torch.zeros(4, 4)}
    save_official(tmp_path / "sd_xl_refiner_1.0.safetensors", state)
    with pytest.raises(CheckpointError, match="SDXL refiner"):
        load_model(tmp_path / "sd_xl_refiner_1.0.safetensors")


def test_sd_unet_refuses_a_vector_and_sdxl_needs_one(xl):
    x, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, xl.cfg.unet.context_dim)
    with pytest.raises(ValueError, match="needs the vector conditioning"):
        xl.model.unet(x, 1, ctx)


# ------------------------------------------------------------------------------------------ regulation on SDXL

def test_default_regulated_layers_are_the_deepest_attention_level():
    """1/32 of the image side (32x32 at 1024 px): input_blocks.7/8 and output_blocks.0/1/2, 10 transformer
    blocks each, so 50 cross-attention layers; the middle block (also 32x32) stays out, as in SD."""
    from regulation.layers import LayerSelector
    cfg = sdxl()
    assert cfg.default_blocks() == ("input_blocks.7", "input_blocks.8", "output_blocks.0", "output_blocks.1",
                                    "output_blocks.2")
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    select = LayerSelector(None, cfg)
    chosen = [m.name for m in model.attention_layers(cross_only=True) if select(m)]
    assert len(chosen) == 50 and all(".transformer_blocks." in n for n in chosen)
    one = LayerSelector("input_blocks.7.1.transformer_blocks.3", cfg)
    assert [m.name for m in model.attention_layers(cross_only=True) if one(m)] == \
        ["model.diffusion_model.input_blocks.7.1.transformer_blocks.3.attn2"]
    for bad in ("input_blocks.7.1.transformer_blocks.10", "input_blocks.1", "input_blocks.4.1.transformer_blocks.2"):
        with pytest.raises(ValueError, match="names no"):
            LayerSelector(bad, cfg)


def test_targets_agree_across_both_tokenizers(xl):
    from regulation.targets import TargetError, resolve_targets
    toks = xl.mine.tokenizers
    assert [t.pad_with_eot for t in toks] == [True, False]
    targets = resolve_targets(toks, PROMPTS[1], ["hummingbird", "hill"])
    second = resolve_targets(toks[1], PROMPTS[1], ["hummingbird", "hill"])
    assert [t.positions for t in targets] == [t.positions for t in second]

    class Shifted:  # a second tokenizer that splits words differently: the positions disagree
        def __init__(self, tok):
            self.tok, self.eos_id, self.decoder = tok, tok.eos_id, tok.decoder

        def encode(self, text):
            return self.tok.encode(text)

        def ids(self, prompt):
            ids = self.tok.ids(prompt)
            return ids[:1] + ids[1:2] + ids[1:-1]

        def token_text(self, i):
            return self.tok.token_text(i)

    with pytest.raises(TargetError, match="must agree"):
        resolve_targets([toks[0], Shifted(toks[1])], PROMPTS[1], ["hill"])


@pytest.mark.parametrize("method", ["regulate", "attend-excite", "syngen", "dense", "composable"])
def test_cli_regulates_a_tiny_sdxl_file_end_to_end(xl, tmp_path, method):
    """The official-layout file by --checkpoint alone; each method with --save-attention (but Composable
    Diffusion, which acts on no map) writes the image, the maps grid, and records the model and the method's
    layers. The gradient passes of Attend-and-Excite and SynGen get the vector too; Composable Diffusion gives each
    concept its own pooled text."""
    from PIL import Image
    from minisd.sample import main
    from regulation.editors import METHODS
    extra = {"dense": ["--layout", "red circle:0,0,0.5,0.5;blue square:0.5,0.5,1,1"]}.get(method, [])
    maps = [] if method == "composable" else ["--save-attention", str(tmp_path / "maps")]
    main(["--prompt", "a red circle and a blue square", "--checkpoint", str(xl.path), "--steps", "2",
          "--out", str(tmp_path / "out"), "--method", method, *extra, *maps])
    [png] = sorted((tmp_path / "out").glob("*.png"))
    image = Image.open(png)
    assert image.size == (PX, PX)
    if maps:
        [grid] = sorted((tmp_path / "maps").glob("*.png"))
        assert Image.open(grid).size[0] > PX
    text = image.text["parameters"]
    assert "Model: tiny-sdxl" in text and f"Regulation: {METHODS[method].title}" in text
    from regulation.attend_excite import default_layers
    blocks = {"regulate": xl.cfg.default_blocks(), "dense": ["all"]}.get(method, default_layers(xl.cfg))
    if method != "composable":   # each method's own rule
        assert f"Regulation layers: {' '.join(blocks)}," in text


def test_float16_model_decodes_in_float32(xl):
    """SDXL's VAE overflows in float16 (diffusers' force_upcast): with a float16 model the pipeline decodes in
    float32, and the image is close to the float32 model's."""
    half = Pipeline.from_checkpoint(xl.path, dtype=torch.float16)
    latents = torch.randn(1, 4, PX // 2, PX // 2, generator=torch.Generator().manual_seed(1))
    images = half.decode(latents)
    assert next(half.model.first_stage_model.parameters()).dtype == torch.float32
    assert next(half.model.unet.parameters()).dtype == torch.float16 and half.dtype == torch.float16
    assert images.dtype == torch.float32
    assert torch.equal(images, xl.mine.decode(latents))  # the same float32 VAE, weights never rounded
    out = half(PROMPTS[0], steps=2, height=PX, width=PX)
    assert np.isfinite(np.asarray(out.images[0], dtype=np.float32)).all()


@torch.no_grad()
def test_benchmark_compares_equal_sdxl_unets():
    """tools/bench/unet.py on SDXL: minisd (vector made inside the call) and diffusers (text_embeds, time_ids)
    compute the same function from the same weights, or the timing would compare different work."""
    from tools.bench.unet import build, micro_cond_dim, unet_config
    unet, micro = unet_config("tiny-sdxl"), micro_cond_dim("tiny-sdxl")
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, unet.context_dim, generator=g)
    extra = (torch.randn(2, unet.adm_in_channels - 6 * micro, generator=g), xl_time_ids(64, 64, 2))
    (mine, _), (theirs, _) = build("minisd", unet, torch.float32, micro), build("diffusers", unet, torch.float32, micro)
    theirs64 = build("diffusers", unet, torch.float64, micro)[0]   # the same weights (drawn in float32), in float64
    t = torch.tensor([10, 900])
    assert_close(theirs(x, t, ctx, extra), mine(x, t, ctx, extra),
                 theirs64(x.double(), t, ctx.double(), tuple(e.double() for e in extra)))
