"""The denoising UNet of Stable Diffusion (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models", CVPR 2022). Module names equal the keys under `model.diffusion_model.` in the official checkpoints, so
`input_blocks.7.1.transformer_blocks.0.attn2.to_q.weight` is the module path and the checkpoint key alike."""
import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import SpatialTransformer


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32: half-precision statistics over large maps drift."""

    def forward(self, x):
        w, b = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch, groups):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_ch), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A block of the UNet: hands the time embedding to ResBlocks and the text to transformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        mc, nrb, g = unet.model_channels, unet.num_res_blocks, unet.groups
        emb_ch = mc * 4
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.adm_in_channels = unet.adm_in_channels
        if unet.adm_in_channels:  # SDXL: a vector (pooled text + micro-conditioning) added to the time embedding
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(unet.adm_in_channels, emb_ch), nn.SiLU(),
                                                         nn.Linear(emb_ch, emb_ch)))

        def transformer(ch, level):
            heads, dim_head = unet.heads_at(ch)
            return SpatialTransformer(ch, heads, dim_head, unet.depth_at(level), unet.context_dim,
                                      unet.use_linear_in_transformer, g)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(unet.in_channels, mc, 3, padding=1))])
        skip_chs, ch, ds = [mc], mc, 1
        for level, mult in enumerate(unet.channel_mult):
            for _ in range(nrb):
                layers = [ResBlock(ch, emb_ch, mult * mc, g)]
                ch = mult * mc
                if ds in unet.attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chs.append(ch)
            if level != len(unet.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chs.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_ch, ch, g), transformer(ch, -1),
                                                    ResBlock(ch, emb_ch, ch, g))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(unet.channel_mult))):
            for i in range(nrb + 1):
                layers = [ResBlock(ch + skip_chs.pop(), emb_ch, mult * mc, g)]
                ch = mult * mc
                if ds in unet.attention_resolutions:
                    layers.append(transformer(ch, level))
                if level and i == nrb:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), nn.Conv2d(mc, unet.out_channels, 3, padding=1))

    def forward(self, x, t, context, y=None):
        """x: noisy latents (b, 4, h, w); t: timesteps (b,) or a number; context: text embeddings (b, 77, d);
        y: SDXL's vector conditioning (b, adm_in_channels), see model.py."""
        # a tensor stays a tensor: torch.as_tensor on one is a constant to torch.jit.trace (OpenVINO's converter)
        t = t.to(x.device) if torch.is_tensor(t) else torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if bool(self.adm_in_channels) != (y is not None):
            raise ValueError(f"this UNet needs the vector conditioning y ({self.adm_in_channels} numbers per image)"
                             if self.adm_in_channels else "this UNet takes no vector conditioning y")
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
