"""Attend-and-Excite: move the latents until every target token is attended somewhere.

Chefer, Alaluf, Vinker, Wolf, Cohen-Or, "Attend-and-Excite: Attention-Based Semantic Guidance for Text-to-Image
Diffusion Models" (SIGGRAPH 2023, arXiv 2301.13826). The comparison baseline of Attention Regulation: where
Attention Regulation edits the attention logits and never differentiates through the UNet, Attend-and-Excite
differentiates a loss on the cross-attention maps through the conditional UNet pass, back to the latents.

At each of the first `max_iter_to_alter` steps, before the usual (guided) model call:
  1. run the UNet on the conditional text alone, with gradient, and keep the cross-attention probabilities of the
     chosen layers, averaged over heads and layers: A (h, w, L);
  2. drop the start token, multiply by a temperature (100) and take a softmax over the remaining text tokens, so
     that the targets compete with the other words rather than with the start token, which takes most attention;
  3. smooth each target's map with a small Gaussian and take its maximum m_k;
     loss = max over targets of max(0, 1 - m_k): the most neglected target;
  4. x <- x - step_size[i] * dloss/dx, with step_size[i] = scale_factor * sqrt(linspace(1, 0.5, steps)[i]);
  5. at the "threshold" steps (0, 10, 20) first refine: step as in 4 until the loss is at most 1 - threshold,
     or give up after `max_refinement_steps` steps.

The numbers and the order of operations are those of diffusers' StableDiffusionAttendAndExcitePipeline (0.42),
which follows the authors' code for SD 1.4. Where this module differs, on purpose:
  - `max_iter_to_alter` and the threshold steps are step indices, not scaled for runs of fewer than 50 steps
    (diffusers does not scale them either: with 25 steps and the default 25, every step is altered).
  - Diffusers runs the conditional pass with gradient at every step and only skips the update after
    `max_iter_to_alter`; here those steps are plain (no extra pass), so a threshold step at or after
    `max_iter_to_alter` does not refine. With the defaults (thresholds at 0, 10, 20 < 25) nothing changes.
  - Diffusers' refinement recomputes, in its first try, the loss it already has, and measures the loss once more
    after its last try; both passes give numbers it already has, so they are skipped here. Its loop tests the
    loss from *before* each update, so it makes one update more after the threshold is reached; that is kept, so
    the latents equal diffusers'.
  - A batch is edited in one pass: each image's loss is its own, and the gradient of their sum is each image's own
    gradient (no UNet layer mixes images). Images that finish refining early keep their latents while the
    others go on.
  - Diffusers takes one token per target. A target here may have several sub-tokens (`regulation.targets`);
    `subtokens="max"` (default) takes the largest smoothed maximum of its sub-tokens (the word is attended if any
    piece of it is, and the gradient excites that piece), `"sum"` smooths the summed map of its sub-tokens.
    With one sub-token both equal diffusers.
  - Which layers: the authors' `attention_res = 16` (diffusers' default too), the maps they found most semantic,
    written as a rule for any model: `default_layers`, the down and up blocks of the UNet level whose maps are
    closest to 16x16 at the model's default size (SD 1.x/2.x: input_blocks.7/8, output_blocks.3/4/5, the same
    five layers as diffusers at 512 px, where the middle block's 8x8 maps are left out there too; SDXL at 1024
    px: its 32x32 level; the shipped shapes model: its 16x16 maps). Attention Regulation takes the deepest level
    instead (ModelConfig.default_blocks); on SD the two rules give the same layers. `config.layers` overrides.
  - The maps go into the loss in float32 whatever the model's dtype (the attention's explicit path gives
    float32 probabilities).
  - The softmax runs over positions 1..L-2 as in diffusers (it slices `[1:-1]`, so with SD 1.x's end-of-text
    padding it includes the end-of-text and padding columns); `softmax_span="prompt"` takes 1..eot-1 instead,
    the authors' `normalize_eot` option that they used for SD 2.1.
  - The smoothing kernel is diffusers' (and the authors'): exp(-((x - mu) / (2 sigma))^2), normalised, which is a
    Gaussian of standard deviation sigma * sqrt(2), not sigma. Kept, so that the numbers match.
"""
from dataclasses import dataclass, field, replace
import math

import numpy as np
import torch
import torch.nn.functional as F

from minisd.attention import AttentionHook, cross_block
from regulation.joint_regulation import JointBlockSelector, is_joint
from regulation.registry import Knob, Method, editor_run, register
from regulation.targets import TargetError, eot_position


@dataclass
class AttendExciteConfig:
    max_iter_to_alter: int = 25     # steps 0..max_iter_to_alter-1 are altered (a step index: not scaled by steps)
    thresholds: dict = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8})  # step -> min max-attention
    scale_factor: float = 20.0      # step size = scale_factor * sqrt(linspace(*scale_range, steps)[i])
    scale_range: tuple = (1.0, 0.5)
    max_refinement_steps: int = 20  # per threshold step; then it gives up (recorded in `history`)
    sigma: float = 0.5              # the smoothing kernel's sigma (see the module docstring) ...
    kernel_size: int = 3            # ... and its side
    temperature: float = 100.0      # the averaged maps are multiplied by this before the softmax over text tokens
    softmax_span: str = "all"       # "all": positions 1..L-2 (diffusers); "prompt": 1..eot-1 (needs the eot)
    subtokens: str = "max"          # how a target's sub-tokens combine: "max" or "sum" (module docstring)
    layers: tuple | None = None     # regulation.layers.LayerSelector specs; None = default_layers(model config)
    measure_after: bool = False     # also measure the loss after each step's update (one more conditional pass)
    # On joint attention (SD 3), which maps the temperature and softmax read: "joint", the joint softmax's own
    # probabilities of the text keys (each row's text share below 1, so the x100 acts as a smaller temperature where
    # the image keys take more); "text", renormalised over the text keys, as a UNet's cross-attention map
    joint_maps: str = "joint"

    def __post_init__(self):
        if self.joint_maps not in ("joint", "text"):
            raise ValueError(f"joint_maps must be 'joint' or 'text', got {self.joint_maps!r}")
        if self.softmax_span not in ("all", "prompt"):
            raise ValueError(f"softmax_span must be 'all' or 'prompt', got {self.softmax_span!r}")
        if self.subtokens not in ("max", "sum"):
            raise ValueError(f"subtokens must be 'max' or 'sum', got {self.subtokens!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.max_refinement_steps < 1:
            raise ValueError(f"max_refinement_steps must be >= 1, got {self.max_refinement_steps}")
        bad = {k: v for k, v in self.thresholds.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"thresholds are maximum attentions in [0, 1], got {bad}")


def default_layers(model_config):
    """The blocks of the attention level whose maps are closest to 16x16 at the model's default image size (ties:
    the larger maps): the authors' attention_res = 16 as a rule (module docstring)."""
    from minisd.blocks import attention_levels, level_blocks
    side = model_config.image_size // model_config.vae.downsample
    level = min(attention_levels(model_config.unet), key=lambda d: (abs(side / 2 ** d - 16), d))
    return level_blocks(model_config.unet, level)


def step_sizes(num_steps, config=None):
    """step_size[i] = scale_factor * sqrt(linspace(scale_range[0], scale_range[1], num_steps)[i]): larger while
    the image is mostly noise, sqrt(0.5) of that by the last step."""
    config = config or AttendExciteConfig()
    return [config.scale_factor * math.sqrt(s) for s in np.linspace(*config.scale_range, num_steps)]


def smoothing_kernel(size=3, sigma=0.5):
    """The (size, size) kernel of diffusers' GaussianSmoothing: a product of exp(-((x - mu) / (2 sigma))^2) over
    the two axes (note the 2 sigma inside the square), normalised to sum 1."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x / (2 * sigma)) ** 2)
    k = g[:, None] * g[None, :]
    return k / k.sum()


def smooth(maps, kernel):
    """Smooth maps (..., h, w) with `kernel`, reflecting at the borders so that the output keeps the size."""
    *lead, h, w = maps.shape
    pad = kernel.shape[-1] // 2
    if h <= pad or w <= pad:
        raise ValueError(f"a {h}x{w} map is too small to smooth with a {kernel.shape[-1]}x{kernel.shape[-1]} "
                         f"kernel (reflection needs a side > {pad}); choose larger layers or kernel_size=1")
    x = F.pad(maps.reshape(-1, 1, h, w), (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, kernel.to(maps)[None, None]).view(*lead, h, w)


def target_maxima(attn, targets, config=None, eot=None):
    """The maximum attention of each target. attn: (b, h, w, L) cross-attention averaged over heads and layers.
    targets: a list with, per target, a list of its token positions. Returns (b, k) in float32.

    The softmax with temperature runs over positions 1..L-2 (or 1..eot-1), then each target's map is smoothed;
    several sub-tokens combine as config.subtokens says."""
    config = config or AttendExciteConfig()
    end = attn.shape[-1] - 1
    if config.softmax_span == "prompt":
        if eot is None:
            raise ValueError("softmax_span='prompt' needs the end-of-text position (eot=)")
        end = eot
    bad = [p for t in targets for p in t if not 1 <= p < end]
    if bad:
        raise ValueError(f"target positions must be in 1..{end - 1} (the softmax's token span), got {bad}")
    text = (attn.float()[..., 1:end] * config.temperature).softmax(-1)   # column j is token j + 1
    kernel = smoothing_kernel(config.kernel_size, config.sigma)
    maxima = []
    for positions in targets:
        maps = text[..., [p - 1 for p in positions]].permute(0, 3, 1, 2)   # (b, h, w, n) -> (b, n, h, w)
        if config.subtokens == "sum":
            maps = maps.sum(1, keepdim=True)
        maxima.append(smooth(maps, kernel).amax(dim=(-2, -1)).amax(-1))
    return torch.stack(maxima, -1)


def excite_loss(attn, targets, config=None, eot=None):
    """Per image: max over targets of max(0, 1 - its maximum attention): the most neglected target.
    Returns (loss (b,), maxima (b, k))."""
    maxima = target_maxima(attn, targets, config, eot)
    return (1 - maxima).clamp(min=0).amax(-1), maxima


def _check_targets(targets):
    """Ints (one token per target, as diffusers takes them) or lists of ints (a target's sub-tokens)."""
    out = [[int(p)] if isinstance(p, (int, np.integer)) else [int(q) for q in p] for p in targets]
    if not out or any(not t for t in out):
        raise ValueError(f"Attend-and-Excite needs at least one target, each with at least one position: {targets}")
    flat = [p for t in out for p in t]
    if len(set(flat)) != len(flat):
        raise ValueError(f"target positions must be distinct, got {out}")
    if min(flat) < 1:
        raise ValueError(f"target positions must be >= 1 (0 is the start-of-text token), got {out}")
    return out


class ConditionalPassMaps(AttentionHook):
    """The maps a method that moves the latents reads (Attend-and-Excite, and SynGen, which its authors built on it):
    during the method's own conditional pass, with gradient, the cross-attention probabilities of the chosen layers
    (`self.select`), averaged over every head of every layer, (b, h, w, L), as diffusers averages them. The guided
    model call takes the fast path: only inside that pass does the hook want any layer."""
    method = "this method"   # for the messages
    _collecting = False

    def _set_up(self, config, num_steps, select, model_config):
        """The run's length and the layers: `select`, else config.layers, else the authors' attention_res = 16
        rule (default_layers)."""
        self.config, self.num_steps = config, int(num_steps)
        if select is None:
            if model_config is None:
                raise ValueError("give a layer selector (select=) or the model config to use its default layers")
            from regulation.layers import LayerSelector
            select = LayerSelector(config.layers or default_layers(model_config), model_config)
        self.select = select
        self.reset()

    @property
    def edit_steps(self):
        """How many steps of this run are altered (for reports; the same name as AttentionRegulation's)."""
        return min(self.config.max_iter_to_alter, self.num_steps)

    def reset(self):
        """Forget the history, e.g. before sampling another image with the same hook."""
        self.history = {}
        self._sum, self._heads, self._layers = None, 0, []

    def wants(self, layer):
        return self._collecting and layer.is_cross and self.select(layer)

    def edit_probs(self, layer, logits, probs):
        b, heads, _, num_tokens = probs.shape
        h, w = layer.hw
        maps = probs[self.cond].sum(1).view(-1, h, w, num_tokens)   # summed over heads, with gradient
        if self._sum is not None and self._sum.shape != maps.shape:
            raise ValueError(f"{self.method} averages maps of one size, but layer {layer.name} gives {h}x{w} "
                             f"and {self._layers[0]} gave {tuple(self._sum.shape[1:3])}: choose layers of one size")
        self._sum = maps if self._sum is None else self._sum + maps
        self._heads += heads
        self._layers.append(layer.name)
        return probs

    def _attention(self, x, t, cond_unet):
        """Run the conditional pass on x and return the maps averaged over every head of every chosen layer."""
        self._sum, self._heads, self._layers = None, 0, []
        self.cond = slice(None)   # every row of the conditional pass is conditional
        self._collecting = True
        try:
            cond_unet(x, t)
        finally:
            self._collecting = False
        if self._sum is None:
            raise ValueError(f"no cross-attention layer was selected by {self.select!r} during the pass")
        attn, self._sum = self._sum / self._heads, None
        return attn


class AttendExcite(ConditionalPassMaps):
    """The Attend-and-Excite hook. Give it to `Pipeline.__call__(..., hooks=[hook])`: the pipeline calls
    `edit_latents` at the start of each step; only inside that call, while its own conditional UNet pass runs,
    does the hook want the chosen cross-attention layers (the guided model call takes the fast path).

    targets: one token position per target, or per target a list of its sub-token positions.
    num_steps: the run's number of sampling steps (for the step sizes).
    eot: the end-of-text position, needed for softmax_span="prompt".
    `history[step]` holds, per image, the loss at the step's start, after refinement, and (with
    config.measure_after) after the update, the refinement's number of tries and whether it gave up.
    """
    method = "Attend-and-Excite"

    def __init__(self, targets, num_steps, config=None, select=None, model_config=None, eot=None):
        self._set_up(config or AttendExciteConfig(), num_steps, select, model_config)
        self.targets = _check_targets(targets)
        self.eot = eot
        self.step_size = step_sizes(self.num_steps, self.config)

    def loss_and_grad(self, x, t, cond_unet):
        """The loss of each image at latents x and its gradient with respect to x (zero where the loss is 0)."""
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(True)
            loss, _ = excite_loss(self._attention(x, t, cond_unet), self.targets, self.config, self.eot)
            live = loss > 0   # diffusers skips the update of a zero loss
            grad = torch.autograd.grad(loss.sum(), x)[0] if live.any() else torch.zeros_like(x)
        return loss.detach(), grad * live.view(-1, *[1] * (x.dim() - 1))

    def refine(self, x, t, cond_unet, loss, grad, threshold, size):
        """Iterative refinement (the paper's section 3.3) at a threshold step: step until each image's loss is at
        most 1 - threshold, as diffusers' loop does (it tests the loss from before each update, so one more
        update follows the one that reached the goal), at most max_refinement_steps updates.
        Returns x, its loss and gradient, the number of updates and, per image, whether it gave up (hit the cap
        with its loss still above 1 - threshold)."""
        goal = max(0.0, 1.0 - threshold)
        active = loss > goal            # images still refining
        tries = 0
        while active.any() and tries < self.config.max_refinement_steps:
            tries += 1
            reached = loss <= goal      # tested on the loss from before this update
            x = x - size * grad * active.view(-1, *[1] * (x.dim() - 1))
            loss, grad = self.loss_and_grad(x, t, cond_unet)
            active = active & ~reached
        return x, loss, grad, tries, active & (loss > goal)   # gave up: capped, and still short of the goal

    def edit_latents(self, x, t, i, cond_unet):
        config = self.config
        if i >= config.max_iter_to_alter:
            return x
        if i >= len(self.step_size):
            raise ValueError(f"step {i} of a run the hook was built for {self.num_steps} steps of")
        size = self.step_size[i]
        loss, grad = self.loss_and_grad(x, t, cond_unet)
        record = dict(loss_before=loss.tolist(), loss_refined=None, loss_after=None, tries=0,
                      gave_up=[False] * len(loss), step_size=size)
        x = x.detach().float()
        if i in config.thresholds and (loss > 1.0 - config.thresholds[i]).any():
            x, loss, grad, tries, gave_up = self.refine(x, t, cond_unet, loss, grad, config.thresholds[i], size)
            record.update(loss_refined=loss.tolist(), tries=tries, gave_up=gave_up.tolist())
        x = x - size * grad
        if config.measure_after:
            with torch.no_grad():
                loss_after, _ = excite_loss(self._attention(x, t, cond_unet), self.targets, config, self.eot)
            record["loss_after"] = loss_after.tolist()
        self.history[i] = record
        return x


class JointAttendExcite(AttendExcite):
    """Attend-and-Excite reading the image-to-text block of the chosen joint blocks (its targets at their CLIP
    positions; regulation/joint_regulation.py)."""

    @property
    def understands_joint(self):
        # "joint": the joint softmax's own probabilities; "text": renormalised over the text keys (AttentionHook)
        return self.config.joint_maps == "joint"

    def wants(self, layer):
        return getattr(layer, "joint", False) and super().wants(layer)

    def edit_probs(self, layer, logits, probs):
        super().edit_probs(layer, logits, cross_block(layer, probs))
        return probs


# --- from a prompt to the hook ---------------------------------------------------------------------------------

def make_editor(pipe, prompt, targets, steps, seed=0, layers=None, edit_steps=None, config=None):
    """The hook exciting `targets` (from regulation.editors.pick_targets) of `prompt` for a run of `steps` steps, on a
    UNet or on joint attention (JointAttendExcite). Each target keeps all its sub-tokens. edit_steps is A&E's
    max_iter_to_alter (a step index, not scaled by `steps`: see the module docstring); A&E draws no random numbers,
    so `seed` is unused."""
    if config is not None and not isinstance(config, AttendExciteConfig):
        raise TypeError(f"attend-excite takes an AttendExciteConfig, got {type(config).__name__}")
    config = config or AttendExciteConfig()
    config = replace(config, layers=layers or config.layers,
                     max_iter_to_alter=config.max_iter_to_alter if edit_steps is None else edit_steps)
    if is_joint(pipe.cfg):
        outside = [t.word for t in targets if not t.clip]
        if outside:
            raise TargetError(f"Attend-and-Excite reads its targets at their CLIP positions, and "
                              f"{', '.join(map(repr, outside))} is not in CLIP's 77 tokens")
        return JointAttendExcite([t.clip for t in targets], steps, config, JointBlockSelector(config.layers, pipe.cfg),
                                 eot=eot_position(pipe.tokenizers, prompt))
    return AttendExcite([t.positions for t in targets], steps, config=config, model_config=pipe.cfg,
                        eot=eot_position(pipe.tokenizer, prompt))


def set_up(pipe, prompt, steps, targets=None, layers=None, edit_steps=None, strength=None, config=None, **run):
    """regulation.editors.set_up's Run of Attend-and-Excite; strength: the latent step size (scale_factor)."""
    if not targets:
        raise ValueError("Attend-and-Excite needs target words")
    if strength is not None:
        config = replace(config or AttendExciteConfig(), scale_factor=float(strength))
    hook = make_editor(pipe, prompt, targets, steps, layers=layers, edit_steps=edit_steps, config=config)
    return editor_run(hook, targets, is_joint(pipe.cfg))


# The authors' config: the latent step size (scale_factor) is the knob.
METHOD = register(Method(
    "attend-excite", "Attend-and-Excite", Knob("strength", "step size", 20.0, "the latent step size"),
    takes={"targets", "layers", "edit_steps", "strength", "config"},
    about="Attend-and-Excite (Chefer et al. 2023)", set_up=set_up, make_editor=make_editor))
