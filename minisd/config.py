"""One plain config object per model family. No YAML: a checkpoint's family is detected from its keys
and shapes (checkpoint.py), or read from the config that our own checkpoints store in their metadata."""
from dataclasses import dataclass, field, asdict, fields, replace
import json
import re
from pathlib import Path

from .blocks import attention_levels, level_blocks


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)  # downsampling factors (1, 2, 4 = levels 0..2) that hold a transformer
    num_heads: int = 8                         # used when num_head_channels == -1 (SD 1.x)
    num_head_channels: int = -1                # SD 2.x: fixed 64-dim heads
    context_dim: int = 768
    transformer_depth: object = 1              # transformer blocks per attention block: one number, or one per level
    transformer_depth_middle: int = None       # the middle block's; None: the deepest level's
    use_linear_in_transformer: bool = False    # SD 2.x: Linear instead of 1x1 conv around the transformer
    groups: int = 32                           # GroupNorm groups
    adm_in_channels: int = 0                   # SDXL: width of the vector added to the time embedding (label_emb)

    def depth_at(self, level):
        """Transformer blocks in each attention block of `level` (-1: the middle block)."""
        d = self.transformer_depth
        if level == -1:
            return self.transformer_depth_middle if self.transformer_depth_middle is not None else \
                (d if isinstance(d, int) else d[-1])
        return d if isinstance(d, int) else d[level]

    def heads_at(self, ch):
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    groups: int = 32
    scale_factor: float = 0.18215  # latents are multiplied by this before the UNet sees them
    shift_factor: float = 0.0      # SD 3: and this is subtracted first (its latents are not centred)
    use_quant_conv: bool = True    # SD 3's VAE has no 1x1 convolutions around the latent

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    penultimate: bool = False   # SD 2.x reads the layer before the last one, then the final LayerNorm
    pad_with_eot: bool = True   # SD 1.x pads with end-of-text; SD 2.x (OpenCLIP) pads with "!" (id 0)
    key_layout: str = "hf"      # "hf": cond_stage_model.transformer.text_model.*; "openclip": cond_stage_model.model.*
    final_norm: bool = True     # with penultimate: SD 2.x applies the final LayerNorm to that layer, SDXL does not
    projection_dim: int = 0     # SDXL's OpenCLIP bigG: also return the pooled end-of-text state @ text_projection


@dataclass
class MMDiTConfig:
    """SD 3's transformer (minisd/mmdit.py). Stability's files fix hidden_size = 64 * depth and heads = depth."""
    depth: int = 24                   # joint blocks
    hidden_size: int = 1536
    num_heads: int = 24
    patch_size: int = 2
    in_channels: int = 16
    pos_embed_max_size: int = 192     # the learned position table is max x max patches, cropped to the image
    adm_in_channels: int = 2048       # pooled text: CLIP-L (768) + CLIP-G (1280)
    context_dim: int = 4096           # T5-XXL's width; the CLIP states are zero-padded to it
    mlp_ratio: float = 4.0
    qk_norm: bool = False             # SD 3.5: RMSNorm on each head's q and k
    x_block_self_attn_layers: tuple = ()  # SD 3.5 Medium: blocks with a second, image-only attention (attn2)
    frequency_embedding_size: int = 256


@dataclass
class T5Config:
    """T5 v1.1's encoder as SD 3 reads it (transformers.T5EncoderModel)."""
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    min_length: int = 77              # Stability's reference pads (never cuts) to 77 tokens; diffusers: 256


@dataclass
class ModelConfig:
    name: str = "sd1"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    text2: TextConfig = None           # SDXL: the second text encoder (OpenCLIP bigG), its output concatenated
    prediction: str = "epsilon"        # "epsilon" or "v"
    image_size: int = 512              # default generation size in pixels
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # Blocks whose cross-attention is regulated by default. None (every family we define) means the one rule in
    # default_blocks(); a tuple of block names overrides it.
    regulate_blocks: tuple = None

    default_steps: int = 50
    default_guidance: float = 7.5
    # SDXL's vector conditioning (unet.adm_in_channels = text2.projection_dim + 6 * micro_cond_dim): the pooled
    # text and six sinusoidally embedded numbers, original size (h, w), crop top-left (top, left), target size.
    micro_cond_dim: int = 256
    # SDXL: an empty negative prompt is zero embeddings (diffusers' force_zeros_for_empty_prompt)
    zero_empty_negative: bool = False
    vae_upcast: bool = False           # SDXL's VAE overflows in float16: decode in float32 when the model is float16
    # SD 3: the MMDiT in place of the UNet (unet is then None), T5-XXL beside the two CLIPs (text, text2), and the
    # rectified-flow schedule with its shift; default_sampler is what Stability's reference samples with.
    mmdit: MMDiTConfig = None
    t5: T5Config = None
    shift: float = 1.0
    default_sampler: str = "dpmpp_2m"

    @property
    def is_sd3(self):
        return self.mmdit is not None

    def default_blocks(self):
        """The blocks whose cross-attention is regulated (and shown) by default, by one rule for every family:
        the deepest level of the UNet's down and up paths that has cross-attention (the middle block aside),
        where SD decides the layout. SD 1.x/2.x: input_blocks.7/8 and output_blocks.3/4/5 (16x16 maps at 512 px,
        the paper's layers); SDXL: input_blocks.7/8 and output_blocks.0/1/2 (32x32 at 1024 px); the shipped
        shapes model: input_blocks.3 and output_blocks.2/3 (8x8 at 128 px). It does not depend on the image
        size. `regulate_blocks` overrides it."""
        if self.regulate_blocks is not None:
            return tuple(self.regulate_blocks)
        if self.is_sd3:
            return sd3_default_blocks(self.mmdit)
        return level_blocks(self.unet, max(attention_levels(self.unet)))

    def to_json(self):
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(s):
        d = json.loads(s) if isinstance(s, str) else dict(s)
        sub = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig, "text2": TextConfig,
               "mmdit": MMDiTConfig, "t5": T5Config}
        kw = {}
        for f in fields(ModelConfig):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name in sub and v is not None:
                known = {g.name for g in fields(sub[f.name])}
                v = sub[f.name](**{k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items() if k in known})
            elif isinstance(v, list):
                v = tuple(v)
            kw[f.name] = v
        return ModelConfig(**kw)


def sd1():
    """Stable Diffusion 1.x: CLIP ViT-L/14 text encoder, last layer, 8 heads everywhere."""
    return ModelConfig(name="sd1")


def sd2(v_prediction=False):
    """Stable Diffusion 2.x: OpenCLIP ViT-H/14 text tower at the penultimate layer, 64-dim heads, linear
    projections in the spatial transformers. The 768 px models predict v."""
    return ModelConfig(
        name="sd2-v" if v_prediction else "sd2",
        unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
        text=TextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        hidden_act="gelu", penultimate=True, pad_with_eot=False, key_layout="openclip"),
        prediction="v" if v_prediction else "epsilon",
        image_size=768 if v_prediction else 512,
    )


def tiny(sd2_layout=False, image_size=64):
    """A tiny family for tests: the same code paths, seconds to run. With a 2-level VAE (factor 2) and a
    3-level UNet, the regulated layers are the ones at the lowest UNet resolution."""
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1, 2, 4),
                      num_heads=2, context_dim=32, groups=8)
    text = TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if sd2_layout:
        unet.num_head_channels, unet.use_linear_in_transformer = 8, True
        text.hidden_act, text.penultimate, text.pad_with_eot, text.key_layout = "gelu", True, False, "openclip"
        text.num_hidden_layers = 3
    return ModelConfig(
        name="tiny-sd2" if sd2_layout else "tiny", unet=unet,
        vae=VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, groups=8), text=text, image_size=image_size,
        regulate_blocks=None,
    )


def sdxl():
    """Stable Diffusion XL base 1.0 (sgm's sd_xl_base.yaml): a 3-level UNet (320, 640, 1280 channels) with no
    attention at the first level, 2 and 10 transformer blocks per attention block at the others (10 in the
    middle), 64-dim heads, context 2048 = CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280), both read at the
    penultimate layer without the final LayerNorm, and a vector input of 2816 = bigG's pooled projection (1280) +
    6 x 256 micro-conditioning. The VAE is SD's with another latent scale."""
    return ModelConfig(
        name="sdxl",
        unet=UNetConfig(model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2),
                        num_head_channels=64, context_dim=2048, transformer_depth=(1, 2, 10),
                        use_linear_in_transformer=True, adm_in_channels=2816),
        vae=VAEConfig(scale_factor=0.13025),
        text=TextConfig(penultimate=True, final_norm=False),
        text2=TextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                         hidden_act="gelu", penultimate=True, final_norm=False, pad_with_eot=False,
                         key_layout="openclip", projection_dim=1280),
        image_size=1024, default_guidance=5.0, regulate_blocks=None,
        zero_empty_negative=True, vae_upcast=True,
    )


def tiny_sdxl(image_size=64, groups=8):
    """SDXL's shape in miniature, for tests: first level without attention, 1 and 2 transformer blocks per level
    (2 in the middle), two text encoders (quick_gelu + eot padding; gelu + "!" padding with a square projection),
    vector conditioning with 8-wide micro-conditioning embeddings."""
    cfg = sdxl()
    cfg.name, cfg.image_size = "tiny-sdxl", image_size
    cfg.unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4, 2),
                          num_head_channels=8, context_dim=64, transformer_depth=(1, 1, 2),
                          use_linear_in_transformer=True, groups=groups, adm_in_channels=32 + 6 * 8)
    cfg.vae = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, groups=32, scale_factor=0.13025)  # ldm's GroupNorm(32)
    cfg.text = TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          penultimate=True, final_norm=False)
    cfg.text2 = TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           hidden_act="gelu", penultimate=True, final_norm=False, pad_with_eot=False,
                           key_layout="openclip", projection_dim=32)
    cfg.micro_cond_dim = 8
    return cfg


def sd3_default_blocks(mmdit):
    """The joint blocks regulated by default. MMDiT has no resolution levels, so the UNet's rule (the deepest
    level, where the layout is decided) has no direct analogue. Provisional rule: the middle third of the joint
    blocks. Work that reads SD 3's image-to-text maps (e.g. the MMDiT attention analyses behind training-free
    layout and editing methods) reports that the first blocks' maps are diffuse, the last blocks' refine
    appearance, and the middle blocks place the objects; no trained MMDiT is reachable here to measure it."""
    n = mmdit.depth
    return tuple(f"joint_blocks.{i}" for i in range(n // 3, max(n // 3 + 1, 2 * n // 3)))


def sd3_text():
    """CLIP-L and OpenCLIP bigG as SD 3 stores them: transformers' names under `text_encoders.clip_l.` and
    `.clip_g.`, both read at the penultimate layer without the final LayerNorm; bigG's projection a Linear."""
    return (TextConfig(penultimate=True, final_norm=False, key_layout="sd3"),
            TextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       hidden_act="gelu", penultimate=True, final_norm=False, pad_with_eot=False,
                       key_layout="sd3", projection_dim=1280))


def sd3_family(name, mmdit, shift, steps, guidance, sampler="dpmpp_2m"):
    clip_l, clip_g = sd3_text()
    return ModelConfig(name=name, unet=None, mmdit=mmdit, t5=T5Config(), text=clip_l, text2=clip_g,
                       vae=VAEConfig(z_channels=16, scale_factor=1.5305, shift_factor=0.0609,
                                     use_quant_conv=False),
                       prediction="flow", image_size=1024, shift=shift, default_steps=steps,
                       default_guidance=guidance, default_sampler=sampler)


def sd3_medium():
    """Stable Diffusion 3 Medium (2B): 24 joint blocks, 1536 wide, a 192 x 192 position table. Defaults as
    Stability's reference (sd3_infer.py) for `sd3_medium`: 50 steps, guidance 5, dpmpp_2m; but shift 3.0, which
    the code released with SD 3 Medium and diffusers' scheduler config run, not the later table's 1.0
    (docs/sd3.md says why)."""
    return sd3_family("sd3-medium", MMDiTConfig(), 3.0, 50, 5.0)


def sd35_medium():
    """Stable Diffusion 3.5 Medium (2.5B): SD 3 Medium's shape with qk RMSNorm, a 384 x 384 position table and
    a second image-only attention in blocks 0-12 (MMDiT-X). Reference defaults: shift 3, 50 steps, guidance 5."""
    return sd3_family("sd3.5-medium", MMDiTConfig(pos_embed_max_size=384, qk_norm=True,
                                                  x_block_self_attn_layers=tuple(range(13))), 3.0, 50, 5.0)


def sd35_large():
    """Stable Diffusion 3.5 Large (8B): 38 joint blocks, 2432 wide, qk RMSNorm. Reference defaults: shift 3,
    40 steps, guidance 4.5."""
    return sd3_family("sd3.5-large", MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, qk_norm=True),
                      3.0, 40, 4.5)


def sd35_large_turbo():
    """Stable Diffusion 3.5 Large Turbo: SD 3.5 Large's weights distilled (ADD) to sample in 4 steps without
    guidance. Reference defaults: shift 3, 4 steps, guidance 1, Euler."""
    cfg = sd35_large()
    cfg.name, cfg.default_steps, cfg.default_guidance, cfg.default_sampler = "sd3.5-large-turbo", 4, 1.0, "euler"
    return cfg


# Stability's reference (sd3_infer.py: CONFIGS) picks the sampling settings by the checkpoint file's name; minisd
# reads the same names, also inside a longer one (sd3.5_large_turbo_fp8), in the file's `modelspec.architecture`
# or `modelspec.title` metadata, or in a diffusers folder's name (stable-diffusion-3.5-large-turbo)
SD3_PRESETS = {"sd3_medium": sd3_medium, "sd3.5_medium": sd35_medium, "sd3.5_large": sd35_large,
               "sd3.5_large_turbo": sd35_large_turbo}
SD3_NAME = re.compile(r"(?:sd|stable[-_ ]?diffusion)[-_ ]?v?3(\.5)?[-_ ]*(medium|large)(?:[-_ ]*(turbo))?")


def sd3_preset(path=None, metadata=None):
    """(SD3_PRESETS key, where it was read) for a file whose name or metadata names an SD 3 model, else None."""
    metadata = metadata or {}
    places = [(f"the name {Path(path).name}", Path(path).name)] if path else []
    places += [(f"the file's {k} ({metadata[k]})", metadata[k]) for k in ("modelspec.architecture", "modelspec.title")
               if metadata.get(k)]
    for where, text in places:
        m = SD3_NAME.search(str(text).lower())
        key = m and f"sd3{m.group(1) or ''}_{m.group(2)}{'_turbo' if m.group(3) else ''}"
        if key in SD3_PRESETS:   # (SD 3 Large and SD 3 Medium Turbo were never released as files)
            return key, where
    return None


def with_sd3_preset(cfg, path=None, metadata=None):
    """An SD 3 `cfg` with the sampling defaults (shift, steps, guidance, sampler) and the name of the preset that
    the file's name or metadata names (sd3_preset), if any; the architecture stays the file's."""
    found = sd3_preset(path, metadata) if cfg.is_sd3 else None
    if found is None:
        return cfg
    preset = SD3_PRESETS[found[0]]()
    return replace(cfg, name=preset.name, shift=preset.shift, default_steps=preset.default_steps,
                   default_guidance=preset.default_guidance, default_sampler=preset.default_sampler)


def tiny_sd3(dual=True, image_size=32):
    """SD 3.5's shape in miniature, for tests: 3 joint blocks 32 wide; `dual`: SD 3.5 Medium's qk norm and extra
    image-only attention in block 0 and 1, else SD 3 Medium's plain blocks. Tiny CLIPs and T5."""
    cfg = sd3_family("tiny-sd3.5" if dual else "tiny-sd3",
                     MMDiTConfig(depth=3, hidden_size=32, num_heads=2, pos_embed_max_size=12,
                                 adm_in_channels=64, context_dim=48, qk_norm=dual,
                                 x_block_self_attn_layers=(0, 1) if dual else ()),
                     3.0, 4, 5.0, "euler")
    cfg.image_size = image_size
    cfg.vae = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, scale_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False)
    cfg.text = TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                          penultimate=True, final_norm=False, key_layout="sd3")
    cfg.text2 = TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                           hidden_act="gelu", penultimate=True, final_norm=False, pad_with_eot=False,
                           key_layout="sd3", projection_dim=48)
    cfg.t5 = T5Config(vocab_size=300, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    return cfg


FAMILIES = {"sd1": sd1, "sd2": sd2, "sd2-v": lambda: sd2(True), "sdxl": sdxl, "tiny": tiny,
            "tiny-sd2": lambda: tiny(True), "tiny-sdxl": tiny_sdxl, "sd3-medium": sd3_medium,
            "sd3.5-medium": sd35_medium, "sd3.5-large": sd35_large, "sd3.5-large-turbo": sd35_large_turbo,
            "tiny-sd3": lambda: tiny_sd3(False),
            "tiny-sd3.5": tiny_sd3}
