"""A straightforward Attend-and-Excite for the tests: diffusers' StableDiffusionAttendAndExcitePipeline (0.42)
step by step, one image at a time, with its redundant passes, in its order of operations.

Written from diffusers' formulas, not from regulation/attend_excite.py. Two small extensions so that the tests can
cover the options: `end` (where the softmax's token span stops; diffusers' -1) and sub-token lists per target,
combined by "max" or "sum" (diffusers takes one int per target, which is a list of one here).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from minisd.attention import AttentionHook


def reference_kernel(kernel_size=3, sigma=0.5):
    """diffusers' GaussianSmoothing weight for dim=2, channels=1."""
    kernel = 1
    grids = torch.meshgrid([torch.arange(kernel_size, dtype=torch.float32) for _ in range(2)], indexing="ij")
    for grid in grids:
        mean = (kernel_size - 1) / 2
        kernel = kernel * (1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((grid - mean) / (2 * sigma)) ** 2)))
    return kernel / torch.sum(kernel)


def reference_smooth(image, kernel_size=3, sigma=0.5):
    """One (h, w) map: reflect-pad, then the depthwise convolution."""
    pad = kernel_size // 2
    x = F.pad(image.unsqueeze(0).unsqueeze(0), (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, reference_kernel(kernel_size, sigma).view(1, 1, kernel_size, kernel_size)).squeeze(0).squeeze(0)


def reference_max_attention(attention_maps, indices, temperature=100.0, kernel_size=3, sigma=0.5, end=-1,
                            subtokens="max"):
    """diffusers' _compute_max_attention_per_index on one image's (h, w, L) maps."""
    attention_for_text = attention_maps[:, :, 1:end].clone()
    attention_for_text *= temperature
    attention_for_text = torch.nn.functional.softmax(attention_for_text, dim=-1)
    out = []
    for target in indices:
        target = [target] if isinstance(target, int) else target
        if subtokens == "sum":
            image = sum(attention_for_text[:, :, i - 1] for i in target)
            out.append(reference_smooth(image, kernel_size, sigma).max())
        else:
            values = [reference_smooth(attention_for_text[:, :, i - 1], kernel_size, sigma).max() for i in target]
            best = values[0]
            for v in values[1:]:
                best = torch.maximum(best, v)
            out.append(best)
    return out


def reference_loss(max_attention_per_index):
    """diffusers' _compute_loss: python max, so a fully attended image gives the int 0."""
    losses = [max(0, 1.0 - curr_max) for curr_max in max_attention_per_index]
    return max(losses)


class ReferenceStore(AttentionHook):
    """diffusers' AttentionStore for one image: keeps the cross-attention of the selected layers while gradients
    flow, and averages over every head of every layer."""

    def __init__(self, select):
        self.select, self.maps = select, []

    def wants(self, layer):
        return layer.is_cross and self.select(layer)

    def edit_probs(self, layer, logits, probs):
        if probs.requires_grad:
            h, w = layer.hw
            self.maps.append(probs.reshape(-1, h, w, probs.shape[-1]))   # (1 * heads, h, w, L)
        return probs

    def aggregate(self):
        out = torch.cat(self.maps, dim=0)
        self.maps = []
        return out.sum(0) / out.shape[0]


def reference_update(latents, loss, step_size):
    grad_cond = torch.autograd.grad(loss.requires_grad_(True), [latents], retain_graph=True)[0]
    return latents - step_size * grad_cond


def reference_step(unet_one, store, latents, t, i, indices, num_steps, max_iter_to_alter=25,
                   thresholds=None, scale_factor=20, max_refinement_steps=20, loss_kwargs=None):
    """Step i's Attend-and-Excite update of `latents` (b, c, h, w), image by image as diffusers does.
    unet_one(latent, t, r) runs the conditional UNet on image r (batch of 1) with `store` among its hooks.
    Returns (new latents, [per image: the loss the final update used])."""
    thresholds = {0: 0.05, 10: 0.5, 20: 0.8} if thresholds is None else thresholds
    loss_kwargs = loss_kwargs or {}
    step_size = scale_factor * np.sqrt(np.linspace(1.0, 0.5, num_steps))

    def max_attention(latent, r):
        unet_one(latent, t, r)
        return reference_max_attention(store.aggregate(), indices, **loss_kwargs)

    updated, final_losses = [], []
    with torch.enable_grad():
        latents = latents.clone().detach().requires_grad_(True)
        for r, latent in enumerate(latents):
            latent = latent.unsqueeze(0)
            loss = reference_loss(max_attention(latent, r))
            if i in thresholds.keys() and loss > 1.0 - thresholds[i]:
                # diffusers' _perform_iterative_refinement_step
                iteration, target_loss = 0, max(0, 1.0 - thresholds[i])
                while loss > target_loss:
                    iteration += 1
                    latent = latent.clone().detach().requires_grad_(True)
                    loss = reference_loss(max_attention(latent, r))
                    if loss != 0:
                        latent = reference_update(latent, loss, step_size[i])
                    if iteration >= max_refinement_steps:
                        break
                latent = latent.clone().detach().requires_grad_(True)
                loss = reference_loss(max_attention(latent, r))
            if i < max_iter_to_alter:
                if loss != 0:
                    latent = reference_update(latent, loss, step_size[i])
            updated.append(latent)
            final_losses.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))
    return torch.cat(updated, dim=0).detach(), final_losses
