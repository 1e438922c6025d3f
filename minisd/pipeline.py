"""Load once, generate many: prompts -> token ids -> text embeddings -> (noise -> UNet x steps under a sampler,
with classifier-free guidance) -> latents -> VAE (or TAESD) -> images.

Guidance, in general form: the UNet reads the unconditional text and k conditional texts in one batch, and

    eps = eps(x, uncond) + sum_i w_i * (eps(x, c_i) - eps(x, uncond)).

Classifier-free guidance is k = 1, the prompt, w = the guidance scale; Composable Diffusion (`concepts`, see
regulation/composable.py) is one c_i per concept of a prompt, each with its own weight.

The pipeline knows nothing of regulation: it takes attention hooks (observers and editors, see attention.py),
gives those that have `begin_run(seeds)` the seed of each image before sampling (so that a hook drawing random
numbers can give each image its own generator), tells them the step index and which batch rows are conditional
before each UNet call, and removes them after. It checks the latents after every step and stops with a
NonFiniteError at the first step that overflowed.

Image-to-image (`init_image`, `denoise`): the image's latents, noised to the level of the step the run starts at,
replace the starting noise, and only the last steps run (as diffusers' img2img pipelines choose them: the last
int(steps * denoise)); the hooks and the callback count the steps that run from 0.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import CheckpointError
from .loading import load_model
from .samplers import SAMPLERS, Schedule
from .tokenizer import Tokenizer


@dataclass
class Result:
    images: list                      # PIL images, prompt-major: prompt p, image j -> index p * n + j
    seeds: list
    latents: torch.Tensor = None      # final latents, on request


class NonFiniteError(ValueError):
    """The latents (or the decoded pixels) stopped being finite numbers: an overflow, usually of float16, or a
    guidance scale so large that the guided prediction overflows."""


def size_unit(cfg):
    """Image sides must be multiples of this: the VAE's factor times the UNet's 2 ** (levels - 1) downsamplings,
    so that every UNet level's map has a whole size (SD: 8 x 8 = 64; the shipped model: 8 x 4 = 32); SD 3: the
    VAE's factor times the MMDiT's patch size (16)."""
    if cfg.is_sd3:
        return cfg.vae.downsample * cfg.mmdit.patch_size
    return cfg.vae.downsample * 2 ** (len(cfg.unet.channel_mult) - 1)


def check_concepts(concepts, prompts, guidance, hooks):
    """Composable Diffusion's (text, weight) pairs, refused where they could not mean what they say."""
    if len(prompts) != 1:
        raise ValueError(f"composable concepts compose one prompt; got {len(prompts)} prompts (run them one by one)")
    if not concepts:
        raise ValueError("concepts must be a non-empty list of (text, weight) pairs")
    for c in concepts:
        if not (isinstance(c, (tuple, list)) and len(c) == 2 and isinstance(c[0], str)):
            raise ValueError(f"each concept must be a (text, weight) pair, got {c!r}")
        if isinstance(c[1], bool) or not isinstance(c[1], (int, float)) or not np.isfinite(c[1]):
            raise ValueError(f"the weight of concept {c[0]!r} must be a finite number, got {c[1]!r}")
    if not guidance > 1.0:
        raise ValueError(f"composable concepts are weighed against the unconditional prediction, which only "
                         f"guidance above 1 computes; got guidance {guidance}")
    if hooks:
        # hooks are told one block of conditional rows, one row per image; here each image has one row per concept
        raise ValueError("composable concepts cannot be combined with attention editors or observers (hooks)")


def init_images(image, b):
    """Image-to-image's images: a PIL image, a list of them (one, or one per image of the batch), or a tensor
    (1 or b, 3, h, w) in [0, 1] -> (b, 3, h, w) float32 in [0, 1]."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if len({im.size for im in image}) > 1:
            raise ValueError(f"the init images differ in size: {sorted({im.size for im in image})}")
        image = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                             for im in image])
    if not torch.is_tensor(image) or image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"init_image must be a PIL image, a list of them or a (n, 3, h, w) tensor in [0, 1], got "
                         f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
    if image.shape[0] not in (1, b):
        raise ValueError(f"got {image.shape[0]} init images for {b} images: give one, or one per image")
    return image.float().expand(b, -1, -1, -1)


def to_pil(images):
    """(b, 3, h, w) in [0, 1] -> PIL images."""
    arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def sample(model, hooks, sampler, model_fn, cond_model, latents, schedule, steps, generators, progress, callback,
           about, sampler_options):
    """The sampling loop's side doors, the same for the UNet and the MMDiT: `hooks` installed in `model` for the
    run; hooks that also move the latents (Attend-and-Excite, SynGen) get, at the start of each step, a conditional
    pass `cond_model(x, t)` they can differentiate through (every row of it conditional); after each step the
    latents are checked (one reduction), so a run that overflowed stops there instead of computing on and writing
    a black image. `about`: the settings the error names."""
    movers = [h for h in hooks if hasattr(h, "edit_latents")]

    def edit(x, t, i):
        for h in hooks:
            h.begin_step(i, slice(None))
        for h in movers:
            x = h.edit_latents(x, t, i, cond_model)
        return x

    runs = steps - sampler_options.get("start", 0)   # image-to-image runs the last steps only
    bar = tqdm(total=runs, disable=not progress, leave=False, desc="steps")

    def on_step(info):
        if not torch.isfinite(info["x"]).all():
            raise NonFiniteError(f"the latents stopped being finite at step {info['i'] + 1} of {runs} ({about}): "
                                 f"use float32 or bfloat16, or a smaller guidance scale")
        bar.update(1)
        if callback:
            callback(info)

    model.set_hooks(hooks)
    try:
        return sampler(model_fn, latents, schedule, steps, generator=generators, callback=on_step,
                       edit=edit if movers else None, **sampler_options)
    finally:
        model.set_hooks([])
        bar.close()


class BasePipeline:
    """What SD and SD 3 pipelines share: the model's device and dtype (its parameters'), the step's times, decoding."""

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def decode(self, latents):
        """Latents -> images in [0, 1], through `self.decoder` if set (e.g. TAESD), else the model's VAE."""
        latents = latents.to(self.device)
        if self.decoder is not None:
            return self.decoder(latents.to(self.dtype))
        vae = self.model.first_stage_model
        if self.cfg.vae_upcast and latents.dtype == torch.float16:  # SDXL's VAE overflows in float16
            vae.float()
        return self.model.decode_latents(latents.to(next(vae.parameters()).dtype))

    def start_noise(self, b, seed, latents, height, width, images=None):
        """Image i of b gets seed + i and a generator of its own, which draws (image-to-image) its image's latents
        from the VAE's posterior, then its starting noise (unless `latents` gives it), then any noise the sampler
        draws (DDIM with eta > 0), in diffusers' order: (seeds, generators, noise, the images' latents or None)."""
        seeds = [seed + i for i in range(b)]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        init = None if images is None else self.encode_images(images, generators)
        if latents is None:
            latents = self.initial_latents(generators, height, width)
        return seeds, generators, latents.to(self.device, torch.float32), init

    @torch.no_grad()
    def encode_images(self, images, generators):
        """Images (b, 3, h, w) in [0, 1] -> the latents the model reads, image i's drawn from the VAE's posterior by
        generator i (one encoder call per image, as diffusers' img2img pipelines given a list of generators)."""
        vae = self.model.first_stage_model
        if self.cfg.vae_upcast and self.dtype == torch.float16:  # as decode: SDXL's VAE overflows in float16
            vae.float()
        dtype = next(vae.parameters()).dtype
        return torch.cat([self.model.encode_images(images[i:i + 1].to(self.device, dtype), g).float()
                          for i, g in enumerate(generators)])

    def image_to_image(self, init_image, denoise, b, height, width, steps):
        """Image-to-image's inputs checked: (images (b, 3, h, w) in [0, 1] or None, height, width, the step the
        run starts at). The run keeps the image's size: height and width, if given, must be the image's."""
        if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) or not 0 < denoise <= 1:
            raise ValueError(f"denoise is the fraction of the steps that run, in (0, 1]; got {denoise!r}")
        if init_image is None:
            if denoise != 1:
                raise ValueError("denoise applies to image-to-image: give init_image")
            return None, height, width, 0
        images = init_images(init_image, b)
        h, w = images.shape[-2:]
        if (height or h, width or w) != (h, w):
            raise ValueError(f"image-to-image keeps the init image's size, {w}x{h}; got width {width}, height "
                             f"{height}: leave them out, or resize the image")
        f = size_unit(self.cfg)
        if h % f or w % f:
            raise ValueError(f"the init image is {w}x{h} px; this model needs sides that are multiples of {f}: crop "
                             f"or resize it (e.g. to {max(f, w // f * f)}x{max(f, h // f * f)})")
        start = self.start_step(steps, denoise)
        if start >= steps:
            raise ValueError(f"denoise {denoise} of {steps} steps runs no step; raise denoise or steps")
        return images, h, w, start

    @staticmethod
    def start_step(steps, denoise):
        """The step image-to-image starts at, as diffusers' img2img pipelines choose it: the last
        int(steps * denoise) steps run (get_timesteps: init_timestep = min(int(steps * strength), steps))."""
        return steps - min(int(steps * denoise), steps)

    def timesteps(self, t, x):
        """The step's time, one per row of x, filled on the device: a tensor built from a list is a copy from the
        host, which on a GPU makes the host wait for the GPU's queue at every model call."""
        return torch.full((x.shape[0],), t, device=self.device)


class Pipeline(BasePipeline):
    def __init__(self, model, tokenizer=None, decoder=None):
        self.model = model
        self.cfg = model.cfg
        texts = [self.cfg.text] + ([self.cfg.text2] if self.cfg.text2 else [])
        given = tokenizer if isinstance(tokenizer, (list, tuple)) else [tokenizer] * len(texts)
        # one tokenizer per text encoder (SDXL: the same vocabulary, padded with end-of-text and with "!")
        self.tokenizers = [t or Tokenizer(pad_with_eot=c.pad_with_eot) for t, c in zip(given, texts)]
        self.tokenizer = self.tokenizers[0]
        self.decoder = decoder  # None: the model's VAE; else a callable scaled latents -> images in [0, 1]

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32, allow_pickle=False, prediction=None,
                        text_files=None, t5_tokenizer=None, t5_length=None):
        """SD 1.x, 2.x and SDXL; an SD 3 file is refused by name: SD3Pipeline.from_checkpoint (minisd/pipeline_sd3.py)
        reads it, and the command line (minisd/generate.py: load_pipeline) chooses between the two."""
        model = load_model(path, device=device, dtype=dtype, allow_pickle=allow_pickle, prediction=prediction,
                           text_files=text_files)
        return cls.from_model(model, path, t5_tokenizer, t5_length)

    @classmethod
    def from_model(cls, model, path, t5_tokenizer=None, t5_length=None):
        """A loaded model read from `path`, whose diffusers folder (if it is one) brings its own tokenizers."""
        if model.cfg.is_sd3:
            raise CheckpointError(f"{path} is {model.cfg.name}: load it with SD3Pipeline.from_checkpoint "
                                  f"(minisd/pipeline_sd3.py)")
        if t5_tokenizer or t5_length:
            raise CheckpointError(f"--t5-tokenizer and --t5-length are for SD 3 files; {path} is {model.cfg.name}")
        tok = [Tokenizer.from_folder(d) if (d := Path(path) / name).is_dir() else None
               for name in ("tokenizer", "tokenizer_2")[:1 + (model.cfg.text2 is not None)]]
        return cls(model, tok)

    def compile(self, backend="inductor"):
        """Run the UNet through torch.compile from now on, attention hooks included (minisd/fast.py); "eager"
        leaves it as it is. The first call per image size pays a one-time compile. Returns self."""
        from .fast import compile_unet
        compile_unet(self.model.unet, backend)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """Prompts -> the text embeddings the UNet's cross-attention reads."""
        if self.cfg.text2 is None:
            return self.model.encode_text(self.tokenizer(prompts).to(self.device))
        return self.encode(prompts)[0]

    @torch.no_grad()
    def encode(self, prompts):
        """Prompts -> (text embeddings, pooled text or None). SDXL: each text encoder reads its own tokenizer's ids.
        (SD goes through encode_prompts, which tools may replace.)"""
        if self.cfg.text2 is None:
            return self.encode_prompts(prompts), None
        return self.model.encode_text([tok(prompts).to(self.device) for tok in self.tokenizers])

    def initial_latents(self, generators, height, width):
        """One generator per image, so image i of a batch equals the same seed run alone."""
        f = self.cfg.vae.downsample
        shape = (1, self.cfg.unet.in_channels, height // f, width // f)
        return torch.cat([torch.randn(shape, generator=g) for g in generators])

    def __call__(self, prompt, negative_prompt="", steps=None, guidance=None, seed=0, height=None, width=None,
                 n=1, sampler="dpmpp_2m", spacing="leading", latents=None, hooks=(), return_latents=False,
                 callback=None, progress=False, decode=True, grad=False, concepts=None, init_image=None, denoise=1.0,
                 **sampler_options):
        """`concepts`: Composable Diffusion's [(text, weight), ...] for the one prompt: the UNet then reads each
        concept instead of the prompt, each weighted by its own scale (guidance must be above 1). `init_image`
        (see init_images) and `denoise`: image-to-image, the last int(steps * denoise) steps from the image."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = steps or self.cfg.default_steps
        guidance = self.cfg.default_guidance if guidance is None else guidance
        b = len(prompts) * n
        images, height, width, start = self.image_to_image(init_image, denoise, b, height, width, steps)
        height, width = height or self.cfg.image_size, width or self.cfg.image_size
        f = size_unit(self.cfg)
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} for this model (VAE factor "
                             f"{self.cfg.vae.downsample} x {f // self.cfg.vae.downsample} for the UNet's "
                             f"downsamplings), got {height}x{width}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        if concepts is not None:
            check_concepts(concepts, prompts, guidance, hooks)
        seeds, generators, latents, init = self.start_noise(b, seed, latents, height, width, images)

        # the conditional texts, block after block of b rows, and the weight of each block
        texts, weights = [p for p in prompts for _ in range(n)], [guidance]
        if concepts is not None:
            texts, weights = [c for c, _ in concepts for _ in range(b)], [float(w) for _, w in concepts]
        cond, pooled = self.encode(texts)
        cfg_on = guidance > 1.0
        if cfg_on:
            neg = [negative_prompt] * b if isinstance(negative_prompt, str) else \
                [x for x in negative_prompt for _ in range(n)]
            neg_cond, neg_pooled = self.encode(neg)
            if self.cfg.zero_empty_negative:  # SDXL: an empty negative prompt is zeros, not the encoded ""
                empty = torch.tensor([not x for x in neg], device=self.device)
                neg_cond = neg_cond.masked_fill(empty[:, None, None], 0)
                neg_pooled = neg_pooled.masked_fill(empty[:, None], 0)
            context = torch.cat([neg_cond, cond])
            rows = slice(b, b + len(cond))
        else:
            context, rows, neg_pooled = cond, slice(None), None
        y = y_cond = None
        if pooled is not None:  # SDXL's micro-conditioning: original = target = the image size, crop at 0, 0
            sizes = [height, width, 0, 0, height, width]
            y_cond = self.model.vector(pooled, sizes)
            y = torch.cat([self.model.vector(neg_pooled, sizes), y_cond]) if cfg_on else y_cond
        unet, hooks = self.model.unet, list(hooks)
        for h in hooks:  # hooks that draw random numbers take one generator per image (see begin_run there)
            if hasattr(h, "begin_run"):
                h.begin_run(seeds)

        def model_fn(x, t, i):
            for h in hooks:
                h.begin_step(i, rows)
            x_in = torch.cat([x] * (1 + len(weights))) if cfg_on else x
            with torch.set_grad_enabled(grad):
                out = unet(x_in.to(self.dtype), self.timesteps(t, x_in), context,
                           y).float()
            if cfg_on:
                uncond, *conds = out.chunk(1 + len(weights))
                out = uncond + sum(w * (c - uncond) for w, c in zip(weights, conds))
            return out

        def cond_unet(x, t):
            return unet(x.to(self.dtype), self.timesteps(t, x), cond, y_cond).float()

        final = sample(self.model, hooks, SAMPLERS[sampler], model_fn, cond_unet, latents,
                       Schedule.for_model(self.cfg, spacing), steps, generators, progress, callback,
                       f"dtype {str(self.dtype).removeprefix('torch.')}, guidance {guidance}",
                       {**sampler_options, "init": init, "start": start})
        result = Result(images=[], seeds=seeds, latents=final if return_latents else None)
        if decode:
            pixels = self.decode(final)
            if not torch.isfinite(pixels).all():
                raise NonFiniteError(f"the decoder gave non-finite pixels from finite latents (dtype "
                                     f"{str(self.dtype).removeprefix('torch.')}): decode in float32 or bfloat16")
            result.images = to_pil(pixels)
        return result

