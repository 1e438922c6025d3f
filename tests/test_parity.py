"""minisd computes what the reference implementations compute (the original ldm code, diffusers, transformers),
on tiny random models, in float32, within 10 of the reference's float32 noise floors (tests/conftest.py:
assert_within_floor; docs/exactness.md says how the floor is measured).

The references' weights reach minisd only through files: official single files with the references' own key
names, written by safetensors, or diffusers folders written by diffusers. minisd reads them with `load_model`,
so each comparison also proves the loader's key mapping for that layout.
"""
import functools
from types import SimpleNamespace

import pytest
import torch

from minisd.attention import AttentionHook, SpatialTransformer
from minisd.loading import load_model
from minisd.tokenizer import Tokenizer
from tools.parity import (UNET, VAE, LdmVAE, clip_from_openclip, clip_state, clip_text, difference, ldm_unet,
                          openclip_text_state, perturb, reference_ids, save_official)

try:
    from conftest import assert_within_floor as assert_close, float64_twin
except ImportError:
    from tests.conftest import assert_within_floor as assert_close, float64_twin

PROMPT = "a blue star left of a red heart"


def both(run, reference, *inputs):
    """run(reference, *inputs) in float32, and run on the reference's float64 twin with the inputs in float64: the
    second measures the float32 floor of the first."""
    return run(reference, *inputs), run(float64_twin(reference), *(x.double() if x.is_floating_point() else x
                                                                   for x in inputs))


def ldm_unet_params(c):
    return dict(image_size=32, in_channels=c.in_channels, out_channels=c.out_channels,
                model_channels=c.model_channels, attention_resolutions=list(c.attention_resolutions),
                num_res_blocks=c.num_res_blocks, channel_mult=list(c.channel_mult), num_heads=c.num_heads,
                num_head_channels=c.num_head_channels, use_spatial_transformer=True,
                transformer_depth=c.transformer_depth, context_dim=c.context_dim, legacy=False,
                use_linear_in_transformer=c.use_linear_in_transformer)


def ldm_vae_params(v):
    return dict(double_z=True, z_channels=v.z_channels, resolution=64, in_channels=v.in_channels, out_ch=v.out_ch,
                ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks, attn_resolutions=[])


def text_params(t, layout):
    """The reference text tower: OpenAI CLIP uses quick_gelu, OpenCLIP's ViT-H plain GELU."""
    return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                max_position_embeddings=t.max_position_embeddings,
                hidden_act="quick_gelu" if layout == "sd1" else "gelu")


def unet_inputs(cfg, hw=(16, 24)):
    """Batch 2 with two different timesteps; a non-square map so a swapped height and width would show."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, cfg.unet.in_channels, *hw, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    return x, torch.tensor([3, 742]), ctx


# ------------------------------------------------------------------------------- official single-file layout

@pytest.fixture(scope="module", params=["sd1", "sd2"])
def official(request, tmp_path_factory, make_tiny32):
    """ldm UNet + ldm VAE + the text tower (SD 1: CLIPTextModel; SD 2: an OpenCLIP-layout tower), written as one
    official file and loaded by minisd."""
    layout = request.param
    cfg = make_tiny32(layout)
    unet = perturb(ldm_unet(ldm_unet_params(cfg.unet)), seed=1)
    vae = perturb(LdmVAE(ldm_vae_params(cfg.vae), cfg.vae.z_channels), seed=2)
    params = text_params(cfg.text, layout)
    if layout == "sd1":
        clip = perturb(clip_text(params), std=0.01, seed=3)
        text = clip_state(clip)
    else:
        text = openclip_text_state(params, seed=3)
        clip = clip_from_openclip(text, params)
    state = {**{UNET + k: v for k, v in unet.state_dict().items()},
             **{VAE + k: v for k, v in vae.state_dict().items()}, **text}
    path = tmp_path_factory.mktemp(layout) / "model.safetensors"
    save_official(path, state, cfg)
    return SimpleNamespace(layout=layout, cfg=cfg, unet=unet, vae=vae, clip=clip, keys=set(state), path=path,
                           model=load_model(path))


@torch.no_grad()
def test_unet_matches_ldm(official, monkeypatch):
    x, t, ctx = unet_inputs(official.cfg)
    # ldm computes in float32 on purpose (a dtype attribute, float32 time features, GroupNorm32's and attention
    # logits' upcasts, no-ops in float32): the twin runs the same functions in float64
    monkeypatch.setattr("ldm.modules.attention._ATTN_PRECISION", "as the inputs")
    twin = float64_twin(official.unet)
    twin.dtype = torch.float64
    if not twin.time_embed._forward_pre_hooks:
        twin.time_embed.register_forward_pre_hook(lambda module, args: tuple(a.double() for a in args))
        for m in twin.modules():
            if type(m).__name__ == "GroupNorm32":
                m.forward = functools.partial(torch.nn.GroupNorm.forward, m)
    ref, ref64 = both(lambda m, x, t, ctx: m(x, t, context=ctx), official.unet, x, t, ctx)
    assert_close(ref, official.model.unet(x, t, ctx), ref64)
    assert not torch.allclose(ref[0], official.unet(x[:1], t[1:], context=ctx[:1])[0], atol=1e-3), \
        "the timestep does not matter: the test could not see a wrong time embedding"


@torch.no_grad()
def test_vae_matches_ldm(official):
    g = torch.Generator().manual_seed(8)
    img = torch.randn(2, 3, 32, 48, generator=g).clamp(-1, 1)
    ref, ref64 = both(lambda m, img: m.encode_mean(img), official.vae, img)
    assert_close(ref, official.model.vae.encode(img).mean, ref64)
    z = torch.randn(2, 4, 8, 12, generator=g)
    ref, ref64 = both(lambda m, z: m.decode(z), official.vae, z)
    assert_close(ref, official.model.vae.decode(z), ref64)


@torch.no_grad()
def test_text_matches_reference(official):
    """SD 1: CLIPTextModel's last layer. SD 2: diffusers' converter turns the OpenCLIP tower into a CLIPTextModel
    cut after the penultimate layer (its last_hidden_state: that layer through the final LayerNorm), fed ids
    padded with 0 as open_clip.tokenize pads."""
    sd1 = official.layout == "sd1"
    ids = reference_ids(PROMPT, pad_with_eot=sd1)
    mine = Tokenizer(pad_with_eot=official.model.cfg.text.pad_with_eot)([PROMPT])
    assert torch.equal(mine, ids)
    ref, ref64 = both(lambda m, ids: m(input_ids=ids).last_hidden_state, official.clip, ids)
    assert_close(ref, official.model.encode_text(mine), ref64)


# ------------------------------------------------------------------------------------------ diffusers folders

@pytest.fixture(scope="module", params=["sd1", "sd2"])
def diffusers_pair(request, tmp_path_factory, make_tiny32, make_diffusers_folder):
    """SD 1 style: int attention_head_dim (a head count). SD 2 style: a list of head counts with
    use_linear_projection, v-prediction in the scheduler and "!" as the pad token, as stable-diffusion-2-1 ships."""
    layout = request.param
    cfg = make_tiny32(layout)
    cfg.unet.groups = cfg.vae.groups = 16  # diffusers is not bound to 32 groups
    folder = tmp_path_factory.mktemp(layout) / "sd"
    sd2 = layout == "sd2"
    unet, vae, clip = make_diffusers_folder(folder, cfg, prediction_type="v_prediction" if sd2 else "epsilon",
                                            pad_token="!" if sd2 else "<|endoftext|>")
    return SimpleNamespace(layout=layout, cfg=cfg, unet=unet, vae=vae, clip=clip, model=load_model(folder))


@torch.no_grad()
def test_unet_matches_diffusers(diffusers_pair):
    x, t, ctx = unet_inputs(diffusers_pair.cfg)
    ref, ref64 = both(lambda m, x, t, ctx: m(x, t, encoder_hidden_states=ctx).sample, diffusers_pair.unet, x, t, ctx)
    assert_close(ref, diffusers_pair.model.unet(x, t, ctx), ref64)


@torch.no_grad()
def test_vae_matches_diffusers(diffusers_pair):
    """Also checks the mid-block attention, Linear in diffusers and a 1x1 convolution here."""
    g = torch.Generator().manual_seed(9)
    img = torch.randn(2, 3, 32, 48, generator=g).clamp(-1, 1)
    ref, ref64 = both(lambda m, img: m.encode(img).latent_dist.mean, diffusers_pair.vae, img)
    assert_close(ref, diffusers_pair.model.vae.encode(img).mean, ref64)
    z = torch.randn(2, 4, 8, 12, generator=g)
    ref, ref64 = both(lambda m, z: m.decode(z).sample, diffusers_pair.vae, z)
    assert_close(ref, diffusers_pair.model.vae.decode(z), ref64)


@torch.no_grad()
def test_text_and_settings_match_diffusers(diffusers_pair):
    cfg = diffusers_pair.model.cfg
    sd2 = diffusers_pair.layout == "sd2"
    assert cfg.prediction == ("v" if sd2 else "epsilon")
    assert cfg.text.pad_with_eot == (not sd2)
    ids = Tokenizer(pad_with_eot=cfg.text.pad_with_eot)([PROMPT])
    ref, ref64 = both(lambda m, ids: m(input_ids=ids).last_hidden_state, diffusers_pair.clip, ids)
    assert_close(ref, diffusers_pair.model.encode_text(ids), ref64)


# ----------------------------------------------------------------------------------------- attention hooks

class Spy(AttentionHook):
    """Wants every layer, changes nothing, remembers what it was shown."""

    def __init__(self):
        self.calls = []

    def wants(self, layer):
        return True

    def edit_probs(self, layer, logits, probs):
        self.calls.append(SimpleNamespace(name=layer.name, cross=layer.is_cross, hw=layer.hw, heads=layer.heads,
                                          shape=tuple(logits.shape), dtypes=(logits.dtype, probs.dtype)))
        return probs


def transformer_maps(model):
    """Record the (h, w) of the map entering each spatial transformer, by the transformer's name."""
    seen = {}

    def record(name):
        return lambda module, args: seen.__setitem__(name, tuple(args[0].shape[-2:]))
    handles = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
               if isinstance(m, SpatialTransformer)]
    return seen, handles


@torch.no_grad()
def test_explicit_attention_path_equals_sdpa(official):
    model, spy = official.model, Spy()
    x, t, ctx = unet_inputs(official.cfg)
    fast = model.unet(x, t, ctx)
    seen, handles = transformer_maps(model)
    model.set_hooks([spy])
    try:
        explicit = model.unet(x, t, ctx)
    finally:
        model.set_hooks([])
        for h in handles:
            h.remove()
    # both paths are minisd's: the floor is the fast path's own, measured on the model's float64 twin
    assert_close(fast, explicit, both(lambda m, x, t, ctx: m.unet(x, t, ctx), model, x, t, ctx)[1])
    layers = {m.name for m in model.attention_layers()}
    assert {c.name for c in spy.calls} == layers and len(spy.calls) == len(layers)
    for c in spy.calls:
        assert f"{c.name}.to_q.weight" in official.keys, f"{c.name} is not a path in the official checkpoint"
        assert c.cross == c.name.endswith("attn2")
        h, w = seen[c.name.rsplit(".transformer_blocks.", 1)[0]]
        assert c.hw == (h, w), f"{c.name}: hw {c.hw}, map {(h, w)}"
        assert c.shape == (2, c.heads, h * w, 77 if c.cross else h * w)


@torch.no_grad()
def test_hooks_see_float32_in_bfloat16(official):
    model, spy = load_model(official.path, dtype=torch.bfloat16), Spy()
    model.set_hooks([spy])
    x, t, ctx = unet_inputs(official.cfg)
    out = model.unet(x.bfloat16(), t, ctx.bfloat16())
    assert out.dtype == torch.bfloat16 and spy.calls
    assert all(c.dtypes == (torch.float32, torch.float32) for c in spy.calls)


def test_hook_that_wants_nothing_keeps_the_fast_path(official):
    class Idle(AttentionHook):
        def edit_logits(self, layer, logits):
            raise AssertionError("called for a layer it does not want")

    model = official.model
    x, t, ctx = unet_inputs(official.cfg)
    with torch.no_grad():
        fast = model.unet(x, t, ctx)
        model.set_hooks([Idle()])
        try:
            assert torch.equal(fast, model.unet(x, t, ctx))
        finally:
            model.set_hooks([])


# -------------------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_on_cpu(official, dtype):
    """Same shapes, finite, and near float32 within a loose bound (bfloat16 keeps 8 bits of mantissa, float16
    11), which still catches a part that ignores the dtype or overflows."""
    ref, half = official.model, load_model(official.path, dtype=dtype)
    x, t, ctx = unet_inputs(official.cfg)
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    ids = Tokenizer(pad_with_eot=ref.cfg.text.pad_with_eot)([PROMPT, "two green circles"])
    pairs = [(ref.unet(x, t, ctx), half.unet(x.to(dtype), t, ctx.to(dtype))),
             (ref.vae.decode(z), half.vae.decode(z.to(dtype))),
             (ref.encode_text(ids), half.encode_text(ids))]
    for full, low in pairs:
        assert low.dtype == dtype and low.shape == full.shape
        assert torch.isfinite(low).all()
        # bfloat16 and float16 steps (2^-8, 2^-11) dwarf float32's floor: fixed bounds, far above either
        d, rel = difference(full, low)
        tol = 0.1 if dtype == torch.bfloat16 else 0.02
        assert rel <= tol, f"max abs difference {d:.3g} is {rel:.3g} of the output scale (tolerance {tol})"


# ------------------------------------------------------------------------------------------------ the benchmark

@torch.no_grad()
def test_benchmark_compares_equal_unets():
    """tools/bench/unet.py times minisd against diffusers filled by diffusers' own converter from the same
    official-named weights: both must compute the same function, or the timing compares different work."""
    from tools.bench.unet import build, unet_config
    unet = unet_config("tiny")
    x, t, ctx = unet_inputs(SimpleNamespace(unet=unet))
    (mine, _), (theirs, _) = build("minisd", unet, torch.float32), build("diffusers", unet, torch.float32)
    theirs64 = build("diffusers", unet, torch.float64)[0]   # the same weights (drawn in float32), in float64
    assert_close(theirs(x, t, ctx), mine(x, t, ctx), theirs64(x.double(), t, ctx.double()))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_benchmark_full_size_weights_fit_diffusers(family):
    """The full-size benchmark's conversion, on the meta device: every official UNet key reaches diffusers."""
    from minisd.unet import UNet
    from tools.bench.unet import diffusers_unet, unet_config
    unet_cfg = unet_config(family)
    with torch.device("meta"):
        state = UNet(unet_cfg).state_dict()
    unet = diffusers_unet(unet_cfg, state)  # load_state_dict(strict=True) names any key left over
    assert sum(p.numel() for p in unet.parameters()) == sum(v.numel() for v in state.values())
