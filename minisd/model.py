"""Stable Diffusion as one module whose parameter names are the official single-file checkpoint's keys:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.*` (text encoder; SDXL:
`conditioner.embedders.*`, two text encoders)."""
import torch
import torch.nn as nn

from .attention import Attention
from .text import Conditioner, TextEncoder
from .unet import UNet, timestep_embedding
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = UNet(unet)


class StableDiffusion(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        if cfg.text2 is None:
            self.cond_stage_model = TextEncoder(cfg.text)
        else:
            self.conditioner = Conditioner([cfg.text, cfg.text2])
        self.hooks = []  # one list shared by every attention layer: set_hooks changes it in place
        for name, m in self.named_modules():
            if isinstance(m, Attention):
                m.name, m.hooks = name, self.hooks

    @property
    def unet(self):
        return self.model.diffusion_model

    @property
    def vae(self):
        return self.first_stage_model

    @property
    def text_encoder(self):
        return self.cond_stage_model if self.cfg.text2 is None else self.conditioner

    def set_hooks(self, hooks):
        self.hooks[:] = list(hooks)

    def attention_layers(self, cross_only=False):
        return [m for m in self.unet.modules() if isinstance(m, Attention) and (m.is_cross or not cross_only)]

    @torch.no_grad()
    def encode_text(self, ids):
        """SD: ids (b, 77) -> context (b, 77, d). SDXL: one ids tensor per text encoder -> (context, pooled)."""
        return self.text_encoder(ids)

    def vector(self, pooled, sizes):
        """SDXL's vector conditioning: the pooled text, then the six micro-conditioning numbers (original h, w,
        crop top, left, target h, w; a (b, 6) tensor or one list for all) each embedded sinusoidally."""
        b, dim = pooled.shape[0], self.cfg.micro_cond_dim
        sizes = torch.as_tensor(sizes, dtype=torch.float32, device=pooled.device).reshape(-1, 6).expand(b, 6)
        emb = timestep_embedding(sizes.reshape(-1), dim).reshape(b, 6 * dim)
        return torch.cat([pooled, emb.to(pooled.dtype)], dim=-1)

    def decode_latents(self, latents):
        """Scaled latents -> images in [0, 1]."""
        x = self.first_stage_model.decode(latents / self.cfg.vae.scale_factor)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images, generator=None):
        """Images in [0, 1] -> scaled latents (a sample of the posterior)."""
        post = self.first_stage_model.encode(images * 2 - 1)
        return post.sample(generator) * self.cfg.vae.scale_factor
