"""The KL autoencoder of Stable Diffusion: pixels <-> latents at 1/8 of the side (for SD's config).
Module names equal the keys under `first_stage_model.` in the official checkpoints."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def Normalize(ch, groups):
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, ch, out_ch, groups):
        super().__init__()
        self.norm1, self.conv1 = Normalize(ch, groups), nn.Conv2d(ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = Normalize(out_ch, groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; the original code writes q, k, v as 1x1 convolutions."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = Normalize(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # (b, c, h, w) -> (b, 1, h*w, c): one head whose tokens are the pixels
        q, k, v = (m(y).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # the original pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): res blocks, then a resampler."""

    def __init__(self, chs, groups, resample=None):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(a, b, groups) for a, b in zip(chs, chs[1:])])
        self.attn = nn.ModuleList()  # SD's VAE has no attention inside the levels
        self.resample = None if resample is None else ("downsample" if isinstance(resample, Downsample) else "upsample")
        if resample is not None:
            setattr(self, self.resample, resample)

    def forward(self, x):
        for b in self.block:
            x = b(x)
        return x if self.resample is None else getattr(self, self.resample)(x)


class Encoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        g, chs = vae.groups, [vae.ch * m for m in vae.ch_mult]
        self.conv_in = nn.Conv2d(vae.in_channels, vae.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = vae.ch
        for i, out in enumerate(chs):
            last = i == len(chs) - 1
            self.down.append(Level([ch] + [out] * vae.num_res_blocks, g, None if last else Downsample(out)))
            ch = out
        self.mid = Mid(ch, g)
        self.norm_out = Normalize(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * vae.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        g, chs = vae.groups, [vae.ch * m for m in vae.ch_mult]
        ch = chs[-1]
        self.conv_in = nn.Conv2d(vae.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, g)
        levels = []
        for i in reversed(range(len(chs))):
            levels.append(Level([ch] + [chs[i]] * (vae.num_res_blocks + 1), g, Upsample(chs[i]) if i else None))
            ch = chs[i]
        self.up = nn.ModuleList(reversed(levels))  # up.0 is the full-resolution level, run last
        self.norm_out = Normalize(ch, g)
        self.conv_out = nn.Conv2d(ch, vae.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        # drawn where the generator lives (a CPU generator for a model on the GPU), as diffusers' randn_tensor
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self):
        return 0.5 * (self.mean ** 2 + self.std ** 2 - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.encoder, self.decoder = Encoder(vae), Decoder(vae)
        if vae.use_quant_conv:  # SD 3's 16-channel VAE has neither
            self.quant_conv = nn.Conv2d(2 * vae.z_channels, 2 * vae.z_channels, 1)
            self.post_quant_conv = nn.Conv2d(vae.z_channels, vae.z_channels, 1)
        else:
            self.quant_conv = self.post_quant_conv = nn.Identity()

    def encode(self, x):
        """Pixels in [-1, 1] -> the posterior over (unscaled) latents."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """(Unscaled) latents -> pixels in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
