"""TAESD, the Tiny AutoEncoder for Stable Diffusion (Ollin Boer Bohan, github.com/madebyollin/taesd, MIT).

A distilled encoder/decoder pair of about 1.2 M parameters each that shares the latent space of SD 1.x/2.x's
KL autoencoder (vae.py, about 84 M parameters): a cheap preview decoder, or a fast one when quality can give.
No attention and no normalisation: 3x3 convolutions, ReLU residual blocks, and x2 resampling between
the four resolutions (8x down / up, like the VAE).

Conventions of the released weights (followed here):
  encoder: RGB in [0, 1] -> latents already on SD's *scaled* scale (VAE latent x 0.18215)
  decoder: those scaled latents -> RGB in roughly [0, 1]
`TAESDDecoder.decode` (clamped to [0, 1]) and `TAESDEncoder.encode` take the same images in [0, 1] as
model.py's decode_latents / encode_images, so `Pipeline(model, decoder=taesd.decode)` swaps the VAE out.

The module tree is a plain nn.Sequential, so the checkpoint keys are layer indices ("3.conv.0.weight").
The weights are not shipped: point `load_taesd_decoder` at taesd_decoder.safetensors.
"""
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file


def conv(n_in, n_out, stride=1, bias=True):
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + x): a residual block, always 64 -> 64 channels in TAESD
    (the released code's 1x1 skip for n_in != n_out is never used, so it has no weights here)."""

    def __init__(self, ch=64):
        super().__init__()
        self.conv = nn.Sequential(conv(ch, ch), nn.ReLU(), conv(ch, ch), nn.ReLU(), conv(ch, ch))

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    """3 tanh(x / 3): keeps latents in (-3, 3) smoothly, so out-of-range latents cannot blow up the decoder."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class TAESDEncoder(nn.Sequential):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 4, H/8, W/8) scaled latents. Indices 0..14 = checkpoint keys."""

    def __init__(self, latent_channels=4):
        layers = [conv(3, 64), Block()]
        for _ in range(3):  # each level: a stride-2 conv halves the size, then three blocks
            layers += [conv(64, 64, stride=2, bias=False), Block(), Block(), Block()]
        super().__init__(*layers, conv(64, latent_channels))

    def encode(self, images):
        """Images in [0, 1] -> scaled latents (deterministic: TAESD has no posterior to sample)."""
        return self(images)


class TAESDDecoder(nn.Sequential):
    """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) RGB in about [0, 1]. Indices 0..19 = checkpoint keys
    (2 = ReLU, 6/11/16 = upsampling: no weights)."""

    def __init__(self, latent_channels=4):
        layers = [SoftClamp(), conv(latent_channels, 64), nn.ReLU()]
        for _ in range(3):  # each level: three blocks, then nearest x2 upsampling and a conv
            layers += [Block(), Block(), Block(), nn.Upsample(scale_factor=2), conv(64, 64, bias=False)]
        super().__init__(*layers, Block(), conv(64, 3))

    def decode(self, latents):
        """Scaled latents (the sampler's output: no 1 / 0.18215 here) -> images in [0, 1]."""
        return self(latents).clamp(0, 1)


def load_state(model, path, name):
    """Load a safetensors file into `model`, failing with the offending keys named."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"TAESD weights not found: {path}. Download {name}.safetensors from "
                                f"github.com/madebyollin/taesd (or diffusers' madebyollin/taesd) and pass its path.")
    state = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit {type(model).__name__} (is it a TAESD {name} in the nn.Sequential "
                         f"layout?)\n  missing: {missing[:8]}\n  unexpected: {unexpected[:8]}\n"
                         f"  wrong shape: {wrong[:8]}")
    model.load_state_dict(state)
    return model


def load_taesd_decoder(path, device="cpu", dtype=torch.float32):
    """path: taesd_decoder.safetensors or a folder holding it."""
    return load_state(TAESDDecoder(), path, "taesd_decoder").to(device=device, dtype=dtype).eval()


def load_taesd_encoder(path, device="cpu", dtype=torch.float32):
    """path: taesd_encoder.safetensors or a folder holding it."""
    return load_state(TAESDEncoder(), path, "taesd_encoder").to(device=device, dtype=dtype).eval()
