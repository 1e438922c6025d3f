"""SD 3 / 3.5: minisd computes what diffusers computes, on tiny SD 3-shaped models (random weights, float32).

The tests write one file in the official single-file layout (`model.diffusion_model.joint_blocks.N...`,
`first_stage_model.*`, `text_encoders.{clip_l, clip_g, t5xxl}.transformer.*`). diffusers reads it with its own
single-file loaders (`SD3Transformer2DModel.from_single_file`, `AutoencoderKL.from_single_file`, its CLIP and T5
converters): an independent check that minisd's module names are the official keys. Two shapes: SD 3.5 Medium's
(qk RMSNorm, the extra image-only attention in the first blocks) and SD 3 Medium's (neither).
"""
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is the reference")

from minisd.checkpoint import CheckpointError, detect_config, new_model  # noqa: E402
from minisd.config import sd35_large, sd35_medium, sd3_medium, tiny_sd3  # noqa: E402
from minisd.loading import load_model  # noqa: E402
from minisd.pipeline_sd3 import SD3Pipeline  # noqa: E402
from minisd.samplers import FlowSchedule, flow_dpmpp_2m, flow_euler  # noqa: E402
from tools.bench.generate import clip_tokenizer  # noqa: E402
from tools.parity import random_official, save_official  # noqa: E402

try:
    from conftest import assert_within_floor as assert_close, float64_twin
except ImportError:
    from tests.conftest import assert_within_floor as assert_close, float64_twin

PROMPTS = ["a red circle left of a blue square", "a hummingbird over a green hill, studio photo"]
NEGATIVE = ["blurry, grey", ""]
WORDS = ("a an the red blue green yellow grey circle square triangle star cat dog bird over under left right of on "
         "top photo hummingbird hill studio sphere cube big small blurry").split()

def transformer_config(cfg):
    m = cfg.mmdit
    return {"_class_name": "SD3Transformer2DModel", "sample_size": cfg.image_size // cfg.vae.downsample,
            "patch_size": m.patch_size, "in_channels": m.in_channels, "out_channels": m.in_channels,
            "num_layers": m.depth, "attention_head_dim": m.hidden_size // m.num_heads,
            "num_attention_heads": m.num_heads, "joint_attention_dim": m.context_dim,
            "caption_projection_dim": m.hidden_size, "pooled_projection_dim": m.adm_in_channels,
            "pos_embed_max_size": m.pos_embed_max_size, "dual_attention_layers": list(m.x_block_self_attn_layers),
            "qk_norm": "rms_norm" if m.qk_norm else None}


def vae_config(cfg):
    v = cfg.vae
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": v.z_channels,
            "block_out_channels": [v.ch * m for m in v.ch_mult], "layers_per_block": v.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult),
            "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult), "norm_num_groups": v.groups,
            "sample_size": cfg.image_size, "scaling_factor": v.scale_factor, "shift_factor": v.shift_factor,
            "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": False}


def official_state(cfg, seed=0):
    """Random weights under the official keys of every part minisd's model has (shapes from a meta build)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in new_model(cfg).state_dict().items() if not k.endswith("position_ids")}
    state = random_official(shapes, seed)
    # T5's embedding is one tensor under two names; the official files hold it once as shared.weight
    t5 = "text_encoders.t5xxl.transformer."
    if t5 + "shared.weight" in state:
        state.pop(t5 + "encoder.embed_tokens.weight")
    return state


def write_folder(tmp, cfg):
    for name, conf in (("transformer", transformer_config(cfg)), ("vae", vae_config(cfg))):
        (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / name / "config.json").write_text(json.dumps(conf))
    return tmp


def train_t5_tokenizer(folder):
    """A tiny SentencePiece model (T5's ids: pad 0, end-of-text 1, unknown 2) as `folder/spiece.model`."""
    import random

    import sentencepiece
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    folder.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=120,
                                             pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                             minloglevel=2)
    return folder / "spiece.model"


def references(state, cfg, folder):
    """transformers' text encoders filled from the official keys by diffusers' own converters: CLIP-L with the
    identity projection its single-file loader gives it, bigG with the file's, T5 (eval: its loader leaves dropout
    on)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_sd3_t5_checkpoint_to_diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    clips = []
    for name, t in (("clip_l", cfg.text), ("clip_g", cfg.text2)):
        model = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            hidden_act=t.hidden_act, projection_dim=t.projection_dim or t.hidden_size))
        sd = convert_ldm_clip_checkpoint(dict(state), f"text_encoders.{name}.transformer.")
        if name == "clip_l":
            sd["text_projection.weight"] = torch.eye(t.hidden_size)
        model.load_state_dict(sd, strict=False)
        missing = {k for k in model.state_dict() if not k.endswith("position_ids")} - set(sd)
        assert not missing, missing
        clips.append(model.eval())
    t5 = cfg.t5
    model = T5EncoderModel(T5Config(vocab_size=t5.vocab_size, d_model=t5.d_model, d_kv=t5.d_kv, d_ff=t5.d_ff,
                                    num_layers=t5.num_layers, num_heads=t5.num_heads, feed_forward_proj="gated-gelu",
                                    is_encoder_decoder=False))
    sd = convert_sd3_t5_checkpoint_to_diffusers(dict(state))
    model.load_state_dict(sd, strict=False)
    assert {k for k in model.state_dict() if k != "encoder.embed_tokens.weight"} <= set(sd)
    from transformers import T5Tokenizer
    return clips + [model.eval(), T5Tokenizer.from_pretrained(str(folder), extra_ids=0)]


def build(tmp, dual):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    cfg = tiny_sd3(dual)
    state = official_state(cfg, seed=1 if dual else 2)
    path = tmp / f"{cfg.name}.safetensors"
    save_official(path, state, cfg)
    folder = write_folder(tmp / f"{cfg.name}-config", cfg)
    kw = dict(config=str(folder), local_files_only=True)
    transformer = SD3Transformer2DModel.from_single_file(str(path), subfolder="transformer", **kw).eval()
    vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **kw).eval()
    spiece = train_t5_tokenizer(tmp / "tokenizer_3")
    clip_l, clip_g, t5, t5_tok = references(state, cfg, spiece.parent)
    theirs = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift), vae=vae,
        text_encoder=clip_l, tokenizer=clip_tokenizer(tmp / "vocab1", pad_with_eot=True),
        text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(tmp / "vocab2", pad_with_eot=False),
        text_encoder_3=t5, tokenizer_3=t5_tok)
    theirs.set_progress_bar_config(disable=True)
    mine = SD3Pipeline.from_checkpoint(path, t5_tokenizer=spiece)
    return SimpleNamespace(cfg=cfg, state=state, path=path, folder=folder, transformer=transformer, vae=vae,
                           model=mine.model, theirs=theirs, mine=mine, spiece=spiece, tmp=tmp)


@pytest.fixture(scope="module", params=[True, False], ids=["sd3.5-medium-shape", "sd3-medium-shape"])
def sd3(request, tmp_path_factory):
    return build(tmp_path_factory.mktemp("sd3"), request.param)


@torch.no_grad()
def test_mmdit_matches_diffusers(sd3):
    """Batch 2, two timesteps, a non-square latent (the position table cropped off-centre in one direction)."""
    g = torch.Generator().manual_seed(5)
    m = sd3.cfg.mmdit
    x = torch.randn(2, 16, 16, 24, generator=g)
    ctx = torch.randn(2, 154, m.context_dim, generator=g)
    pooled = torch.randn(2, m.adm_in_channels, generator=g)
    t = torch.tensor([1000.0, 37.5])
    twin = float64_twin(sd3.transformer)
    ref, ref64 = (model(hidden_states=x.to(dtype), timestep=t.to(dtype), encoder_hidden_states=ctx.to(dtype),
                        pooled_projections=pooled.to(dtype)).sample
                  for model, dtype in ((sd3.transformer, torch.float32), (twin, torch.float64)))
    out = sd3.model.mmdit(x, t, y=pooled, context=ctx)
    assert_close(ref, out, ref64)
    assert ref.abs().max() > 0.1, "the reference output is near zero: the comparison could not see a difference"
    flipped = sd3.model.mmdit(x, t.flip(0), y=pooled, context=ctx)
    assert (flipped - ref).abs().max() > 1e-3, "the timestep does not matter"


def test_model_has_the_shape_asked(sd3):
    blocks = sd3.model.mmdit.joint_blocks
    assert [hasattr(b.x_block, "attn2") for b in blocks] == [i in sd3.cfg.mmdit.x_block_self_attn_layers
                                                            for i in range(len(blocks))]
    assert (blocks[0].x_block.attn.ln_q is not None) == sd3.cfg.mmdit.qk_norm
    assert blocks[-1].context_block.pre_only and not hasattr(blocks[-1].context_block.attn, "proj")
    assert not any(b.context_block.pre_only for b in blocks[:-1])


@torch.no_grad()
def test_vae_matches_diffusers(sd3):
    z = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(8))
    assert_close(sd3.vae.decode(z).sample, sd3.model.vae.decode(z), float64_twin(sd3.vae).decode(z.double()).sample)
    assert not hasattr(sd3.model.vae.post_quant_conv, "weight"), "SD 3's VAE has no post_quant_conv"
    assert sd3.vae.config.scaling_factor == sd3.model.cfg.vae.scale_factor == 1.5305


def test_full_size_families_detected_from_keys():
    """Official SD 3 Medium, SD 3.5 Medium and SD 3.5 Large files are told apart by their keys and shapes alone."""
    for family in (sd3_medium, sd35_medium, sd35_large):
        cfg = family()
        with torch.device("meta"):
            state = {k: v for k, v in new_model(cfg).state_dict().items() if k.startswith("model.")}
        got = detect_config(state)
        assert (got.name, got.mmdit, got.shift) == (cfg.name, cfg.mmdit, cfg.shift)


def test_missing_clip_named_with_its_flag(sd3, tmp_path):
    state = {k: v for k, v in sd3.state.items() if not k.startswith("text_encoders.clip_g.")}
    path = tmp_path / "no-clip-g.safetensors"
    save_official(path, state, sd3.cfg)
    with pytest.raises(CheckpointError, match="--clip-g"):
        load_model(path)


def test_flow_schedule_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    for shift, steps in ((3.0, 28), (1.0, 50), (3.0, 4)):
        s = FlowMatchEulerDiscreteScheduler(shift=shift)
        s.set_timesteps(steps)
        mine = FlowSchedule(shift).sigmas(steps)
        assert torch.allclose(s.sigmas, mine, atol=1e-6, rtol=0), (shift, steps)


def test_flow_euler_matches_diffusers_step_by_step():
    from diffusers import FlowMatchEulerDiscreteScheduler
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=g)

    def model(x, t, i):  # any smooth function of (x, t) stands in for the MMDiT
        return torch.sin(x * (1 + t / 1000)) - 0.3 * x

    def reference(x):
        s = FlowMatchEulerDiscreteScheduler(shift=3.0)
        s.set_timesteps(10)
        for t in s.timesteps:
            x = s.step(model(x, float(t), 0), t, x).prev_sample
        return x

    assert_close(reference(x), flow_euler(model, x, FlowSchedule(3.0), 10), reference(x.double()))


def test_flow_dpmpp_2m_matches_stabilitys_sampler():
    """Stability's `sample_dpmpp_2m` (sd3_impls.py), transcribed line by line, on the flow's sigmas."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 4, 4, generator=g)

    def velocity(x, t, i):
        return torch.cos(x * (1 + t / 1000)) + 0.2 * x

    def reference(ref):
        sigmas, old = FlowSchedule(3.0).sigmas(8).to(ref.dtype), None
        for i in range(len(sigmas) - 1):
            denoised = ref - velocity(ref, float(sigmas[i] * 1000), i) * sigmas[i]
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            if old is None or sigmas[i + 1] == 0:
                ref = (sigmas[i + 1] / sigmas[i]) * ref - (-h).expm1() * denoised
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                ref = (sigmas[i + 1] / sigmas[i]) * ref - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - old / (2 * r))
            old = denoised
        return ref

    assert_close(reference(x), flow_dpmpp_2m(velocity, x, FlowSchedule(3.0), 8), reference(x.double()))


@torch.no_grad()
def test_text_states_match_diffusers(sd3):
    """CLIP-L and bigG at the penultimate layer, side by side, zero-padded to T5's width, then T5's 77 tokens;
    pooled: CLIP-L's (unprojected) and bigG's (projected) end-of-text states. Each tokenizer's ids first."""
    theirs = sd3.theirs
    ids = [tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for tok in (theirs.tokenizer, theirs.tokenizer_2, theirs.tokenizer_3)]
    mine = sd3.mine.ids(PROMPTS)
    assert all(torch.equal(a, b) for a, b in zip(ids, mine)), "token ids differ"
    assert mine[2].shape[1] == 77 and (mine[2][:, -1] == 0).all() and (mine[2] == 1).sum() == len(PROMPTS)
    (ref, _, ref_pooled, _), (ref64, _, ref_pooled64, _) = (
        pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False, max_sequence_length=77)
        for pipe in (theirs, float64_twin(theirs)))
    context, pooled = sd3.model.encode_text(mine)
    assert_close(ref, context, ref64)
    assert_close(ref_pooled, pooled, ref_pooled64)
    assert context.shape == (2, 154, sd3.cfg.mmdit.context_dim)


def run_both(sd3, guidance, negative, mine=None, theirs=None, sequence=77, steps=4):
    """-> final latents: diffusers' (float32), minisd's, diffusers' in float64 (what float32 alone changes)."""
    mine, theirs = mine or sd3.mine, theirs or sd3.theirs
    px = sd3.cfg.image_size
    side = px // sd3.cfg.vae.downsample
    latents = torch.randn(len(PROMPTS), 16, side, side, generator=torch.Generator().manual_seed(3))
    ref, ref64 = (pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                       latents=latents.to(dtype), height=px, width=px, output_type="latent",
                       max_sequence_length=sequence).images
                  for pipe, dtype in ((theirs, torch.float32), (float64_twin(theirs), torch.float64)))
    out = mine(PROMPTS, negative_prompt=negative, steps=steps, guidance=guidance, sampler="euler",
               latents=latents.clone(), height=px, width=px, return_latents=True, decode=False).latents
    return ref, out, ref64


@pytest.mark.parametrize("guidance,negative", [(5.0, NEGATIVE), (1.0, "")], ids=["cfg5-negative", "no-cfg"])
def test_pipeline_matches_diffusers(sd3, guidance, negative):
    """The whole 4-step pipeline with Euler (diffusers' FlowMatchEulerDiscreteScheduler, shift 3): final latents."""
    ref, out, ref64 = run_both(sd3, guidance, negative)
    assert_close(ref, out, ref64)
    assert ref.abs().max() > 0.1


def test_images_match_diffusers(sd3):
    px = sd3.cfg.image_size
    side = px // sd3.cfg.vae.downsample
    latents = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(4))
    ref, ref64 = (pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=5.0, latents=latents.to(dtype), height=px,
                       width=px, output_type="pt", max_sequence_length=77).images
                  for pipe, dtype in ((sd3.theirs, torch.float32), (float64_twin(sd3.theirs), torch.float64)))
    out = sd3.mine.decode(sd3.mine(PROMPTS[0], steps=2, guidance=5.0, sampler="euler", latents=latents.clone(),
                                   return_latents=True, decode=False).latents)
    assert_close(ref, out, ref64)


def diffusers_without_t5(sd3):
    """diffusers' pipeline on the reference's parts, without text_encoder_3 (zeros stand in for T5)."""
    from diffusers import StableDiffusion3Pipeline
    t = sd3.theirs
    theirs = StableDiffusion3Pipeline(transformer=t.transformer, scheduler=t.scheduler, vae=t.vae,
                                      text_encoder=t.text_encoder, tokenizer=t.tokenizer,
                                      text_encoder_2=t.text_encoder_2, tokenizer_2=t.tokenizer_2,
                                      text_encoder_3=None, tokenizer_3=None)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def test_without_t5_zeros_stand_in(sd3, tmp_path, capsys):
    """A file without T5: one line says so; its 77 tokens are zeros, as diffusers' pipeline without text_encoder_3."""
    state = {k: v for k, v in sd3.state.items() if not k.startswith("text_encoders.t5xxl.")}
    path = tmp_path / "no-t5.safetensors"
    save_official(path, state, sd3.cfg)
    mine = SD3Pipeline.from_checkpoint(path)
    assert "no T5-XXL" in capsys.readouterr().out
    ref, out, ref64 = run_both(sd3, 5.0, NEGATIVE, mine, diffusers_without_t5(sd3), steps=2)
    assert_close(ref, out, ref64)


def test_t5_length_flag_gives_diffusers_256(sd3):
    mine = SD3Pipeline(sd3.model, sd3.spiece, t5_length=256)
    assert mine.ids(PROMPTS)[2].shape == (2, 256)
    ref, out, ref64 = run_both(sd3, 5.0, NEGATIVE, mine, sequence=256, steps=1)
    assert_close(ref, out, ref64)
    ref77, _, _ = run_both(sd3, 5.0, NEGATIVE, steps=1)
    assert (ref77 - ref).abs().max() > 1e-4, "the padding length made no difference: the test could not see it"


def test_t5_needs_a_tokenizer(sd3):
    with pytest.raises(CheckpointError, match="--t5-tokenizer"):
        SD3Pipeline(sd3.model)


def test_text_encoders_from_their_own_files(sd3, tmp_path):
    """A file without text encoders (as sd3.5_medium.safetensors) + clip_l / clip_g / t5xxl files in their own
    official layout (transformers' names, no prefix), through SD3Pipeline.from_checkpoint: the same model."""
    from safetensors.torch import save_file

    files = {}
    for name in ("clip_l", "clip_g", "t5xxl"):
        prefix = f"text_encoders.{name}.transformer."
        part = {k[len(prefix):]: v.contiguous() for k, v in sd3.state.items() if k.startswith(prefix)}
        if name == "clip_l":   # the official clip_l file has a projection SD 3 does not use
            part["text_projection.weight"] = torch.eye(sd3.cfg.text.hidden_size)
        files[name] = tmp_path / f"{name}.safetensors"
        save_file(part, str(files[name]))
    bare = tmp_path / "bare.safetensors"
    save_official(bare, {k: v for k, v in sd3.state.items() if not k.startswith("text_encoders.")}, sd3.cfg)
    pipe = SD3Pipeline.from_checkpoint(bare, text_files=files, t5_tokenizer=sd3.spiece)
    mine, ref = pipe.model.state_dict(), sd3.model.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    with pytest.raises(CheckpointError, match="--clip-l"):
        load_model(bare)


def test_sd3_options_refused_on_other_families(tmp_path):
    from minisd.checkpoint import build_model, save_checkpoint
    from minisd.config import tiny
    from minisd.pipeline import Pipeline
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model(tiny()), path)
    with pytest.raises(CheckpointError, match="SD 3's text encoders"):
        load_model(path, text_files={"t5xxl": path})
    with pytest.raises(CheckpointError, match="for SD 3 files"):
        Pipeline.from_checkpoint(path, t5_length=256)


def stability_sigmas(shift, steps, dtype=torch.float32):
    """Stability's ModelSamplingDiscreteFlow + get_sigmas (sd3_impls.py, sd3_infer.py), transcribed."""
    def sigma(t):
        t = t / 1000.0
        return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
    table = sigma(torch.arange(1, 1001, 1, dtype=dtype))
    ts = torch.linspace(table[-1] * 1000, table[0] * 1000, steps, dtype=dtype)
    return torch.tensor([sigma(t) for t in ts] + [0.0], dtype=dtype)


def stability_sample(theirs, noise, shift, steps, scale):
    """Stability's CFGDenoiser and sample_dpmpp_2m, transcribed, around diffusers' transformer and text states, in
    the dtype of `theirs` and `noise` (its float32 sigmas differ from minisd's by up to one float32 step)."""
    cond, neg, pooled, neg_pooled = theirs.encode_prompt(PROMPTS[:1], PROMPTS[:1], PROMPTS[:1],
                                                         negative_prompt="", max_sequence_length=77)
    sigmas = stability_sigmas(shift, steps, noise.dtype)

    def model(x, s):
        v = theirs.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([s, s]) * 1000,
                               encoder_hidden_states=torch.cat([cond, neg]),
                               pooled_projections=torch.cat([pooled, neg_pooled])).sample
        pos, negative = (torch.cat([x, x]) - v * s).chunk(2)
        return negative + (pos - negative) * scale

    x, old = sigmas[0] * noise, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i:i + 1])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - old / (2 * r))
        old = denoised
    return x


@torch.no_grad()
def test_pipeline_with_stabilitys_sampler(sd3):
    """SD 3.5's reference default: Stability's CFGDenoiser (denoised = x - v sigma, neg + (pos - neg) scale) and
    sample_dpmpp_2m, transcribed, around diffusers' transformer and text states; minisd's pipeline with
    sampler dpmpp_2m (the default for these files) gives the same latents."""
    steps, scale = 4, 5.0
    assert torch.allclose(stability_sigmas(sd3.cfg.shift, steps), FlowSchedule(sd3.cfg.shift).sigmas(steps), atol=1e-6)
    side = sd3.cfg.image_size // sd3.cfg.vae.downsample
    noise = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(9))
    ref, ref64 = (stability_sample(pipe, noise.to(dtype), sd3.cfg.shift, steps, scale)
                  for pipe, dtype in ((sd3.theirs, torch.float32), (float64_twin(sd3.theirs), torch.float64)))
    out = sd3.mine(PROMPTS[0], steps=steps, guidance=scale, sampler="dpmpp_2m", latents=noise.clone(),
                   return_latents=True, decode=False).latents
    assert_close(ref, out, ref64)
