"""SD 3 / 3.5: prompts -> three tokenizers -> CLIP-L, CLIP-G and T5 states -> (noise -> MMDiT x steps on the
rectified flow, with classifier-free guidance) -> latents -> 16-channel VAE -> images.

The same hook contract as pipeline.py: hooks get `begin_run(seeds)` where they have it, `begin_step(i, rows)`
before each MMDiT call (rows: the conditional half), and are removed after. Hooks with `edit_latents` (Attend-and-
Excite) get a conditional MMDiT pass they can differentiate through at the start of each step.
"""
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .loading import load_model
from .pipeline import BasePipeline, Result, sample, size_unit, to_pil
from .samplers import FLOW_SAMPLERS, FlowSchedule
from .t5 import T5Tokenizer
from .tokenizer import Tokenizer


class SD3Pipeline(BasePipeline):
    def __init__(self, model, t5_tokenizer=None, t5_length=None, shift=None):
        self.model, self.cfg = model, model.cfg
        # CLIP-L pads with end-of-text, CLIP-G with "!" (id 0), as Stability's reference and diffusers' tokenizers
        self.tokenizers = [Tokenizer(pad_with_eot=c.pad_with_eot) for c in (self.cfg.text, self.cfg.text2)]
        self.tokenizer = self.tokenizers[0]
        if model.text_encoders.has_t5 and t5_tokenizer is None:
            raise CheckpointError("this model has T5-XXL but no T5 tokenizer was given: pass --t5-tokenizer "
                                  "(spiece.model, as in a diffusers folder's tokenizer_3/)")
        self.t5_tokenizer = t5_tokenizer if isinstance(t5_tokenizer, (T5Tokenizer, type(None))) else \
            T5Tokenizer(t5_tokenizer)
        if self.t5_tokenizer is not None and t5_length is not None:
            self.t5_tokenizer.length = t5_length
        # without T5, its zeros are as long as its tokens would be
        model.text_encoders.t5_tokens = t5_length or (self.cfg.t5.min_length if self.cfg.t5 else 77)
        self.schedule = FlowSchedule(self.cfg.shift if shift is None else shift)
        self.decoder = None

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32, text_files=None, t5_tokenizer=None,
                        t5_length=None):
        return cls.from_model(load_model(path, device=device, dtype=dtype, text_files=text_files), path,
                              t5_tokenizer, t5_length)

    @classmethod
    def from_model(cls, model, path, t5_tokenizer=None, t5_length=None):
        """T5's tokenizer: the one given, else a diffusers folder's `tokenizer_3/spiece.model` (the folder's own,
        or one beside the checkpoint file)."""
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        beside = folder / "tokenizer_3" / "spiece.model"
        if t5_tokenizer is None and model.text_encoders.has_t5:
            if beside.is_file():
                t5_tokenizer = beside
            elif Path(path).is_dir():
                # transformers 5 saves T5's tokenizer as tokenizer.json only; the SentencePiece model is what we read
                raise CheckpointError(f"{beside} is missing (T5's SentencePiece model, in the official folders): "
                                      f"put it there or pass --t5-tokenizer")
        return cls(model, t5_tokenizer, t5_length)

    def compile(self, backend="eager"):
        if backend != "eager":
            raise ValueError("SD 3 runs eager only: the compiled fast path (minisd/fast.py) is the UNet's")
        return self

    def ids(self, prompts):
        t5 = self.t5_tokenizer(prompts).to(self.device) if self.model.text_encoders.has_t5 else None
        return [tok(prompts).to(self.device) for tok in self.tokenizers] + [t5]

    @torch.no_grad()
    def encode(self, prompts):
        """Prompts -> (context (b, 77 + T5 tokens, 4096), pooled (b, 2048))."""
        return self.model.encode_text(self.ids(prompts))

    def initial_latents(self, generators, height, width):
        f = self.cfg.vae.downsample
        shape = (1, self.cfg.mmdit.in_channels, height // f, width // f)
        return torch.cat([torch.randn(shape, generator=g) for g in generators])

    def __call__(self, prompt, negative_prompt="", steps=None, guidance=None, seed=0, height=None, width=None,
                 n=1, sampler=None, latents=None, hooks=(), return_latents=False, callback=None, progress=False,
                 decode=True, grad=False, spacing=None, concepts=None, **sampler_options):
        if concepts is not None:
            raise ValueError("composable concepts are not implemented for SD 3")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = steps or self.cfg.default_steps
        guidance = self.cfg.default_guidance if guidance is None else guidance
        sampler = sampler or self.cfg.default_sampler
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"SD 3 samples with {', '.join(FLOW_SAMPLERS)}; got {sampler!r}")
        height, width = height or self.cfg.image_size, width or self.cfg.image_size
        f = size_unit(self.cfg)
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} for SD 3 (VAE factor "
                             f"{self.cfg.vae.downsample} x patch {self.cfg.mmdit.patch_size}), got {height}x{width}")
        b = len(prompts) * n
        seeds, generators, latents = self.start_noise(b, seed, latents, height, width)

        cond, pooled = self.encode([p for p in prompts for _ in range(n)])
        cfg_on = guidance > 1.0
        if cfg_on:
            neg = [negative_prompt] * b if isinstance(negative_prompt, str) else \
                [x for x in negative_prompt for _ in range(n)]
            neg_cond, neg_pooled = self.encode(neg)  # SD 3 encodes the empty prompt; it is not zeros
            context, y, rows = torch.cat([neg_cond, cond]), torch.cat([neg_pooled, pooled]), slice(b, 2 * b)
        else:
            context, y, rows = cond, pooled, slice(None)
        mmdit, hooks = self.model.mmdit, list(hooks)
        for h in hooks:
            if hasattr(h, "begin_run"):
                h.begin_run(seeds)

        def model_fn(x, t, i):
            for h in hooks:
                h.begin_step(i, rows)
            x_in = torch.cat([x, x]) if cfg_on else x
            with torch.set_grad_enabled(grad):
                out = mmdit(x_in.to(self.dtype), self.timesteps(t, x_in), y=y, context=context).float()
            if cfg_on:
                uncond, c = out.chunk(2)
                out = uncond + guidance * (c - uncond)
            return out

        def cond_model(x, t):
            return mmdit(x.to(self.dtype), self.timesteps(t, x), y=pooled, context=cond).float()

        final = sample(self.model, hooks, FLOW_SAMPLERS[sampler], model_fn, cond_model, latents, self.schedule, steps,
                       generators, progress, callback,
                       f"dtype {str(self.dtype).removeprefix('torch.')}, guidance {guidance}", sampler_options)
        result = Result(images=[], seeds=seeds, latents=final if return_latents else None)
        if decode:
            result.images = to_pil(self.decode(final))
        return result
