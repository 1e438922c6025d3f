"""SD 3 / 3.5: prompts -> three tokenizers -> CLIP-L, CLIP-G and T5 states -> (noise -> MMDiT x steps on the
rectified flow, with classifier-free guidance) -> latents -> 16-channel VAE -> images.

The same hook contract as pipeline.py: hooks get `begin_run(seeds)` where they have it, `begin_step(i, rows)`
before each MMDiT call (rows: the conditional half), and are removed after. Hooks with `edit_latents` (Attend-and-
Excite) get a conditional MMDiT pass they can differentiate through at the start of each step. Skip-layer
guidance's extra pass is conditional throughout: hooks are told so (rows: all) and edit or observe it as any other.
"""
import base64
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .loading import load_model
from .pipeline import BasePipeline, Result, sample, size_unit, to_pil
from .samplers import FLOW_SAMPLERS, FlowSchedule
from .t5 import T5Tokenizer
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (SLG), as Stability's reference samples it (SkipLayerCFGDenoiser in sd3_impls.py): at
    the steps i with start * steps < i < end * steps, one more conditional MMDiT pass leaves the joint blocks
    `layers` out, and the guided prediction moves away from it by `scale` times (conditional - skipped). Stability
    writes it on the denoised latents, diffusers (skip_guidance_layers) on the velocity: the same, since the two are
    affine in each other at one x and sigma. i counts the steps that run (image-to-image: from the first that
    runs) and steps is the run's full count, as in the reference."""
    layers: tuple = (7, 8, 9)
    scale: float = 2.5
    start: float = 0.01
    end: float = 0.2

    def check(self, depth):
        if not self.layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth
                                  for i in self.layers):
            raise ValueError(f"skip-layer guidance's layers must be joint block numbers 0..{depth - 1} of this "
                             f"model; got {', '.join(map(str, self.layers)) or 'none'}")
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"skip-layer guidance's scale must be a finite number >= 0, got {self.scale}")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"skip-layer guidance's start and end are fractions of the steps, 0 <= start < end <= 1;"
                             f" got start {self.start}, end {self.end}")

    def active(self, i, steps):
        return self.scale > 0 and self.start * steps < i < self.end * steps


# SD 3.5 Medium's setting in Stability's reference (sd3_infer.py's CONFIGS, run with --skip_layer_cfg), and the
# guidance that setting names
SLG_MEDIUM = SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, end=0.2)
SLG_MEDIUM_GUIDANCE = 4.0


class SD3Pipeline(BasePipeline):
    def __init__(self, model, t5_tokenizer=None, t5_length=None, shift=None):
        self.model, self.cfg = model, model.cfg
        # CLIP-L pads with end-of-text, CLIP-G with "!" (id 0), as Stability's reference and diffusers' tokenizers
        self.tokenizers = [Tokenizer(pad_with_eot=c.pad_with_eot) for c in (self.cfg.text, self.cfg.text2)]
        self.tokenizer = self.tokenizers[0]
        for tok in self.tokenizers:   # a long prompt cut as the reference cuts it: before a word, not inside it
            tok.whole_words = True
        if model.text_encoders.has_t5 and t5_tokenizer is None:
            raise CheckpointError("this model has T5-XXL but no T5 tokenizer was given: pass --t5-tokenizer "
                                  "(spiece.model, as in a diffusers folder's tokenizer_3/)")
        if t5_length is not None and t5_length < 1:
            raise ValueError(f"--t5-length must be at least 1 (T5's end-of-text token), got {t5_length}")
        self.t5_tokenizer = t5_tokenizer if isinstance(t5_tokenizer, (T5Tokenizer, type(None))) else \
            T5Tokenizer(t5_tokenizer)
        if self.t5_tokenizer is not None:
            # the reference's 77, or what the file's config says its T5 was trained with (the tiny SD 3.5)
            self.t5_tokenizer.min_length = self.cfg.t5.min_length if self.cfg.t5 else 77
        if self.t5_tokenizer is not None and t5_length is not None:
            self.t5_tokenizer.length = t5_length
        if self.t5_tokenizer is not None and model.text_encoders.has_t5:
            self.t5_tokenizer.check_vocabulary(self.cfg.t5.vocab_size)
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
        """T5's tokenizer: the one given, else the one the file carries in its metadata (minisd's tiny SD 3.5:
        `minisd_t5_spiece`), else a diffusers folder's `tokenizer_3/spiece.model` (the folder's own, or one beside
        the checkpoint file)."""
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        beside = folder / "tokenizer_3" / "spiece.model"
        carried = (getattr(model, "metadata", None) or {}).get("minisd_t5_spiece")
        if t5_tokenizer is None and model.text_encoders.has_t5:
            if carried:
                t5_tokenizer = base64.b64decode(carried)
            elif beside.is_file():
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

    @staticmethod
    def start_step(steps, denoise):
        """The step image-to-image starts at, as Stability's reference chooses it: the sigmas from
        int(steps * (1 - denoise)) on (sd3_infer.py, do_sampling). diffusers' SD 3 img2img takes
        int(steps - steps * denoise), which float rounding can make one less."""
        return int(steps * (1 - denoise))

    def initial_latents(self, generators, height, width):
        f = self.cfg.vae.downsample
        shape = (1, self.cfg.mmdit.in_channels, height // f, width // f)
        return torch.cat([torch.randn(shape, generator=g) for g in generators])

    def __call__(self, prompt, negative_prompt="", steps=None, guidance=None, seed=0, height=None, width=None,
                 n=1, sampler=None, latents=None, hooks=(), return_latents=False, callback=None, progress=False,
                 decode=True, grad=False, spacing=None, concepts=None, shift=None, init_image=None, denoise=1.0,
                 slg=None, **sampler_options):
        """`shift`: the rectified flow's (None: the model's, `cfg.shift`). `init_image` and `denoise`: image-to-image
        (pipeline.py), from step int(steps * (1 - denoise)). `slg`: a SkipLayerGuidance, or None (the reference's
        default: none)."""
        if concepts is not None:
            raise ValueError("composable concepts are not implemented for SD 3")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = steps or self.cfg.default_steps
        guidance = self.cfg.default_guidance if guidance is None else guidance
        sampler = sampler or self.cfg.default_sampler
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"SD 3 samples with {', '.join(FLOW_SAMPLERS)}; got {sampler!r}")
        if slg is not None:
            slg.check(self.cfg.mmdit.depth)
        b = len(prompts) * n
        images, height, width, start = self.image_to_image(init_image, denoise, b, height, width, steps)
        height, width = height or self.cfg.image_size, width or self.cfg.image_size
        f = size_unit(self.cfg)
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} for SD 3 (VAE factor "
                             f"{self.cfg.vae.downsample} x patch {self.cfg.mmdit.patch_size}), got {height}x{width}")
        if shift is not None and not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift}")
        schedule = self.schedule if shift is None else FlowSchedule(shift)
        seeds, generators, latents, init = self.start_noise(b, seed, latents, height, width, images)

        texts = [p for p in prompts for _ in range(n)]
        cfg_on = guidance > 1.0
        if cfg_on:   # SD 3 encodes the empty negative prompt; it is not zeros
            texts = ([negative_prompt] * b if isinstance(negative_prompt, str) else
                     [x for x in negative_prompt for _ in range(n)]) + texts
        # both halves of guidance in one encoding: T5's tokens padded to one length, the longest text's (at least
        # 77), so a prompt longer than its negative prompt fits beside it (docs/sd3.md: long prompts)
        context, y = self.encode(texts)
        cond, pooled, rows = context[-b:], y[-b:], (slice(b, 2 * b) if cfg_on else slice(None))
        mmdit, hooks = self.model.mmdit, list(hooks)
        with torch.set_grad_enabled(grad):   # the text's embeddings and the position table, once per run
            guided = mmdit.prepare(y, context, latents.shape[-2:])
            conditional = mmdit.prepare(pooled, cond, latents.shape[-2:])
        for h in hooks:
            if hasattr(h, "begin_run"):
                h.begin_run(seeds)

        def model_fn(x, t, i):
            for h in hooks:
                h.begin_step(i, rows)
            x_in = torch.cat([x, x]) if cfg_on else x
            with torch.set_grad_enabled(grad):
                out = mmdit(x_in.to(self.dtype), self.timesteps(t, x_in), prepared=guided).float()
            c = out
            if cfg_on:
                uncond, c = out.chunk(2)
                out = uncond + guidance * (c - uncond)
            if slg is not None and slg.active(i, steps):
                for h in hooks:
                    h.begin_step(i, slice(None))
                with torch.set_grad_enabled(grad):
                    skipped = mmdit(x.to(self.dtype), self.timesteps(t, x), prepared=conditional,
                                    skip_layers=slg.layers).float()
                out = out + slg.scale * (c - skipped)
            return out

        def cond_model(x, t):
            return mmdit(x.to(self.dtype), self.timesteps(t, x), prepared=conditional).float()

        final = sample(self.model, hooks, FLOW_SAMPLERS[sampler], model_fn, cond_model, latents, schedule, steps,
                       generators, progress, callback,
                       f"dtype {str(self.dtype).removeprefix('torch.')}, guidance {guidance}",
                       {**sampler_options, "init": init, "start": start})
        result = Result(images=[], seeds=seeds, latents=final if return_latents else None)
        if decode:
            result.images = to_pil(self.decode(final))
        return result
