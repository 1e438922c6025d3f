"""Stable Diffusion as one module whose parameter names are the official single-file checkpoint's keys:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.*` (text encoder)."""
import torch
import torch.nn as nn

from .attention import Attention
from .text import TextEncoder
from .unet import UNet
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.diffusion_model = UNet(cfg)


class StableDiffusion(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = TextEncoder(cfg.text)
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
        return self.cond_stage_model

    def set_hooks(self, hooks):
        self.hooks[:] = list(hooks)

    def attention_layers(self, cross_only=False):
        return [m for m in self.unet.modules() if isinstance(m, Attention) and (m.is_cross or not cross_only)]

    @torch.no_grad()
    def encode_text(self, ids):
        return self.cond_stage_model(ids)

    def decode_latents(self, latents):
        """Scaled latents -> images in [0, 1]."""
        x = self.first_stage_model.decode(latents / self.cfg.vae.scale_factor)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images, generator=None):
        """Images in [0, 1] -> scaled latents (a sample of the posterior)."""
        post = self.first_stage_model.encode(images * 2 - 1)
        return post.sample(generator) * self.cfg.vae.scale_factor
