"""Composable Diffusion straight from the paper's formula, for tests/test_composable.py:

    eps = eps(x, uncond) + sum_i w_i * (eps(x, c_i) - eps(x, uncond))

one image at a time, one UNet call per text (the unconditional text, then each concept alone), added up in a plain
loop and stepped by minisd's samplers. Written from the formula, not from minisd/pipeline.py's batched form.
"""
import torch

from minisd.samplers import SAMPLERS, Schedule


@torch.no_grad()
def composed_latents(pipe, concepts, latents, steps, negative="", sampler="ddim", **options):
    """Final latents of one image (latents: (1, c, h, w) starting noise) composed from [(text, weight), ...]."""
    model, cfg = pipe.model, pipe.cfg
    f = cfg.vae.downsample
    height, width = latents.shape[-2] * f, latents.shape[-1] * f

    def read(text, negative=False):
        context, pooled = pipe.encode([text])
        if negative and text == "" and cfg.zero_empty_negative:   # SDXL's empty negative prompt is zeros
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        vector = model.vector(pooled, [height, width, 0, 0, height, width]) if pooled is not None else None
        return context, vector

    uncond = read(negative, negative=True)
    conds = [(read(text), w) for text, w in concepts]

    def model_fn(x, t, i):
        def eps(context, vector):
            return model.unet(x.to(pipe.dtype), torch.tensor([t]), context, vector).float()

        e_uncond = eps(*uncond)
        guided = e_uncond
        for text, w in conds:
            guided = guided + w * (eps(*text) - e_uncond)
        return guided

    return SAMPLERS[sampler](model_fn, latents.clone(), Schedule.for_model(cfg), steps, **options)
