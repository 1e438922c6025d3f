"""Stable Diffusion 3 / 3.5 as one module whose parameter names are the official single file's keys:
`model.diffusion_model.*` (the MMDiT), `first_stage_model.*` (the 16-channel VAE), `text_encoders.{clip_l, clip_g,
t5xxl}.transformer.*` (the text encoders, in files that include them)."""
import torch
import torch.nn as nn

from .mmdit import MMDiT, JointAttention
from .text import SD3Text
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, mmdit):
        super().__init__()
        self.diffusion_model = MMDiT(mmdit)


class StableDiffusion3(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(cfg.mmdit)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.text_encoders = SD3Text(cfg.text, cfg.text2, cfg.t5, cfg.mmdit.context_dim,
                                     cfg.t5.min_length if cfg.t5 else 77)
        self.hooks = []  # one list shared by every joint attention: set_hooks changes it in place
        for name, m in self.named_modules():
            if isinstance(m, JointAttention):
                # named as the checkpoint names the block (`...joint_blocks.N`): the attention has no weights
                m.name, m.hooks = name.rsplit(".", 1)[0], self.hooks

    @property
    def mmdit(self):
        return self.model.diffusion_model

    @property
    def vae(self):
        return self.first_stage_model

    def set_hooks(self, hooks):
        self.hooks[:] = list(hooks)

    def attention_layers(self):
        """The joint attentions, one per joint block (each reads the text)."""
        return [m for m in self.mmdit.modules() if isinstance(m, JointAttention)]

    @torch.no_grad()
    def encode_text(self, ids):
        """(CLIP-L ids, CLIP-G ids, T5 ids or None) -> (context, pooled)."""
        return self.text_encoders(ids)

    def decode_latents(self, latents):
        """Latents as the MMDiT sees them -> images in [0, 1]."""
        v = self.cfg.vae
        x = self.first_stage_model.decode(latents / v.scale_factor + v.shift_factor)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images, generator=None):
        v = self.cfg.vae
        post = self.first_stage_model.encode(images * 2 - 1)
        return (post.sample(generator) - v.shift_factor) * v.scale_factor
