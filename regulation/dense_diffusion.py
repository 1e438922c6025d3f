"""DenseDiffusion: put each phrase of the prompt where a layout says, by modulating the attention logits.

Kim, Lee, Jung, Lee, Zhu, Sung, Kim, "Dense Text-to-Image Generation with Attention Modulation" (ICCV 2023,
arXiv 2308.12964). Training-free and without a backward pass: during the first `reg_part` of the steps every
attention layer of the UNet has its pre-softmax logits s (already scaled by 1/sqrt(d)) pushed, per head and per
query q, towards the row's own extremes:

    s'[q, k] = s[q, k] + lam[q] * (max_k' s[q, k'] - s[q, k])     where R[q, k] (the pair belongs together)
    s'[q, k] = s[q, k] - lam[q] * (s[q, k] - min_k' s[q, k'])     elsewhere
    lam[q]   = w * (t / T) ** 5 * (1 - sizereg * area[q])

  - cross-attention (w = creg): R[q, k] says that query pixel q lies in the region of the phrase that token k
    belongs to. Tokens of no phrase (the start token, the other words, the padding) are "elsewhere" everywhere.
  - self-attention (w = sreg): R[q, k] says that pixels q and k share a region, so a region attends to itself.
  - t is the timestep of the step (T = 1000 training timesteps), so the push fades quickly: (t / T) ** 5 is
    0.91 at t = 981 and 0.17 at t = 701, the last modulated timestep of the authors' 50 DDIM steps.
  - area[q]: the summed area, as a fraction of the map, of the regions that contain pixel q (0 outside every
    region), so small regions are pushed harder than large ones (the paper's size regulariser).
  - only the conditional half of the batch under classifier-free guidance is modulated, as in the authors' code.

The numbers and the order of operations follow the authors' code (github.com/naver-ai/DenseDiffusion,
inference.ipynb and gradio_app.py, on diffusers 0.20.2 with SD 1.5 and 50 DDIM steps): creg 1.0, sreg 0.3,
sizereg 1.0, reg_part 0.3, the fifth power of t / 1000, masks binarised at 0.5 and resized by nearest neighbour,
max and min taken over each row of the unmodified logits, every cross- and self-attention layer of the UNet.
Where this module differs, on purpose:
  - Which steps: the authors count attention calls and modulate while COUNT / 32 < 50 * reg_part (32 attention
    layers per UNet call in SD 1.x, 50 steps hard-coded). Here step i (the pipeline's step index) is modulated
    when i < num_steps * reg_part: the same steps for SD at 50 steps, and right for any step count and for
    SDXL's 140 attention layers. Where num_steps * reg_part is fractional their code modulates only the first
    layers (in call order) of the last step; here the whole of that step.
  - The timestep: the authors take it from their 50-step DDIM scheduler (981, 961, ...). The hook is not told t,
    so it takes the timesteps that the run's sampler visits (`step_timesteps`; make_dense asks for the sampler and
    spacing of the run; dpmpp_2m, the pipeline's default, visits 951, 932, ... for 50 leading steps).
  - Mask sizes: the authors resize each binarised mask to the latent size and from there to each layer's size,
    and key the layers by their number of queries (square images only). Here each mask goes straight to the
    layer's (h, w) by nearest neighbour. Where the sizes are whole multiples of each other (SD's layers at a
    multiple of 64 px, masks at the image size) nearest neighbour picks the same pixels either way; any aspect
    ratio works.
  - Precision: the logits are float32 (the attention's explicit path); the authors' are float16 for a float16
    model.
  - Rows: the authors modulate the second half of the batch whatever it holds; here the rows the pipeline calls
    conditional (`cond`): the same under classifier-free guidance, and every row without it.
  - Phrases to tokens: the authors take the first place where the segment's token sequence occurs in the prompt
    (even inside another word); here `regulation.targets.resolve_targets` (all sub-tokens of the phrase's words,
    at a word boundary, "phrase#2" for the second occurrence, an error that prints the token table otherwise).
    As in their code, a token shared by two phrases takes the region of the later one.
  - Text embeddings: the authors also replace the prompt's embeddings at each phrase's tokens by those of the
    phrase encoded alone (the notebook and the demo, always). That is not an attention edit, so the hook does not
    do it; `phrase_embeddings` does, around a pipeline call (`regulation.editors.set_up` always uses it, as the
    authors do, unless asked not to: the benchmark's ablation row).
  - Layouts: the authors read one colour-segment image whose segments cover the whole image: the demo makes the
    uncovered (white) area a segment of its own, the background, whose prompt is usually empty, so it has no
    tokens. Here a layout is one box or one mask image per phrase, and by default (`background="region"`) the
    pixels that no phrase covers form that background region: no tokens, its own size term, and its pixels
    attend to each other in self-attention, as in the demo. `background="none"` leaves them in no region (every
    logit of their rows pushed down at full strength, size term 1), a case the authors never run.
  - The time decay uses the model's number of training timesteps rather than a literal 1000 (the same for every
    SD family).

DenseDiffusion edits self-attention, which the compiled UNet (minisd/fast.py) keeps inside its graph and refuses
to hand to hooks: run it on the eager UNet (or with sreg = 0).
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minisd.attention import AttentionHook
from minisd.samplers import SAMPLERS, Schedule

from .layers import LayerSelector
from .registry import Knob, Method, Run, register
from .targets import TargetError, parse_target, resolve_targets

NEEDS_LAYOUT = ("DenseDiffusion needs a layout: --layout \"phrase:x0,y0,x1,y1;...\" (a box in fractions of the "
                "image) or --layout \"phrase=mask.png;...\" (white = inside)")
THRESHOLD = 0.5   # the authors' preprocess_mask: a pixel >= 0.5 is inside
BACKGROUNDS = ("region", "none")


@dataclass
class DenseDiffusionConfig:
    creg: float = 1.0          # w^c, cross-attention strength (demo slider default, notebook `creg = 1.`)
    sreg: float = 0.3          # w^s, self-attention strength (demo slider default, notebook `sreg = .3`)
    sizereg: float = 1.0       # mask-area adaptive adjustment (demo slider default; the notebook's literal `1.`)
    reg_part: float = 0.3      # the fraction of the steps modulated, from the first (`COUNT/32 < 50*reg_part`)
    decay_power: float = 5.0   # lam ~ (t / T) ** decay_power (`torch.pow(timesteps[COUNT//32]/1000, 5)`)
    layers: tuple | None = None  # None: every attention layer (the authors'); else regulation.layers specs
    background: str = "region"  # pixels no phrase covers: "region" (a tokenless region, the authors') or "none"

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"DenseDiffusion's background must be one of {', '.join(BACKGROUNDS)}, "
                             f"got {self.background!r}")
        for name in ("creg", "sreg", "sizereg", "decay_power"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"DenseDiffusion's {name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.reg_part <= 1.0:
            raise ValueError(f"reg_part is the fraction of steps modulated, in [0, 1]; got {self.reg_part!r}")


# ------------------------------------------------------------------------------------------------ layouts

@dataclass
class LayoutEntry:
    """One phrase of a layout and its region: a box (x0, y0, x1, y1 in fractions of the image) or a mask file."""
    phrase: str
    box: tuple | None = None
    path: str | None = None


def check_box(box, phrase="?"):
    """Four finite numbers x0, y0, x1, y1 in [0, 1] with x0 < x1 and y0 < y1; returns them as a tuple of floats."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"layout phrase {phrase!r}: a box is four numbers x0,y0,x1,y1, got {box!r}") from None
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise ValueError(f"layout phrase {phrase!r}: box {x0:g},{y0:g},{x1:g},{y1:g} is outside [0, 1] "
                         f"(x0,y0,x1,y1 are fractions of the image width and height)")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"layout phrase {phrase!r}: box {x0:g},{y0:g},{x1:g},{y1:g} is empty "
                         f"(need x0 < x1 and y0 < y1)")
    return x0, y0, x1, y1


def masks_from_boxes(boxes, height, width, phrases=None):
    """Boxes (x0, y0, x1, y1) in fractions of the image -> (n, height, width) float masks in {0, 1}. A pixel is
    inside when its centre is: x0 <= (col + 0.5) / width < x1 and likewise for rows, so boxes that meet at an
    edge do not overlap."""
    phrases = phrases or [f"#{i + 1}" for i in range(len(boxes))]
    cols = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    rows = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    masks = []
    for box, phrase in zip(boxes, phrases):
        x0, y0, x1, y1 = check_box(box, phrase)
        m = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
        if not m.any():
            raise ValueError(f"layout phrase {phrase!r}: box {x0:g},{y0:g},{x1:g},{y1:g} covers no pixel of a "
                             f"{height}x{width} image")
        masks.append(m.float())
    return torch.stack(masks) if masks else torch.zeros(0, height, width)


def masks_from_images(paths, height, width, phrases=None):
    """One mask image per phrase (white = inside; any size, read as greyscale) -> (n, height, width) float
    masks in {0, 1}: binarised at 0.5, then resized by nearest neighbour, in the order of the authors'
    preprocess_mask."""
    from PIL import Image, UnidentifiedImageError
    phrases = phrases or [f"#{i + 1}" for i in range(len(paths))]
    masks = []
    for path, phrase in zip(paths, phrases):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"layout phrase {phrase!r}: mask file {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                grey = torch.from_numpy(np.array(im.convert("L"), dtype=np.float32))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"layout phrase {phrase!r}: cannot read mask image {str(path)!r}: {e}") from None
        binary = (grey / 255.0 >= THRESHOLD).float()
        m = F.interpolate(binary[None, None], size=(height, width), mode="nearest")[0, 0]
        if not m.any():
            raise ValueError(f"layout phrase {phrase!r}: mask {str(path)!r} has no white pixel at {height}x{width}")
        masks.append(m)
    return torch.stack(masks) if masks else torch.zeros(0, height, width)


def parse_layout(spec):
    """A command-line layout -> a list of LayoutEntry.

        layout := entry (";" entry)*
        entry  := phrase ":" x0 "," y0 "," x1 "," y1      a box, in fractions of the image width and height
                | phrase "=" path                         a mask image, white = inside

    e.g. "red circle:0.1,0.1,0.5,0.5; blue square=square.png". A phrase is one or more words of the prompt
    ("dog#2": its second occurrence); spaces around the separators are ignored, empty entries skipped."""
    if spec is None or not str(spec).strip():
        raise ValueError(NEEDS_LAYOUT)
    entries = []
    for raw in str(spec).split(";"):
        entry = raw.strip()
        if not entry:
            continue
        if "=" in entry:   # tested first: a path may hold ':' (C:\...), a phrase holds neither
            phrase, _, path = (s.strip() for s in entry.partition("="))
            if not path:
                raise ValueError(f"layout entry {entry!r}: no mask file after '='")
            region = LayoutEntry(phrase, path=path)
        elif ":" in entry:
            phrase, _, box = (s.strip() for s in entry.rpartition(":"))
            numbers = [s.strip() for s in box.split(",")]
            try:
                values = [float(s) for s in numbers]
            except ValueError:
                values = []
            if len(values) != 4:
                raise ValueError(f"layout entry {entry!r}: after ':' a box is four numbers x0,y0,x1,y1 "
                                 f"(fractions of the image), got {box!r}")
            region = LayoutEntry(phrase, box=check_box(values, phrase))
        else:
            raise ValueError(f"layout entry {entry!r} has no region: write phrase:x0,y0,x1,y1 or phrase=mask.png")
        if not phrase:
            raise ValueError(f"layout entry {entry!r} has no phrase before its region")
        entries.append(region)
    if not entries:
        raise ValueError(NEEDS_LAYOUT)
    return entries


def _as_entry(item):
    """A LayoutEntry, or (phrase, region) with region a box, a mask file path or a mask tensor (H, W)."""
    if isinstance(item, LayoutEntry):
        return item, None
    try:
        phrase, region = item
    except (TypeError, ValueError):
        raise ValueError(f"a layout item is (phrase, box | mask path | mask tensor), got {item!r}") from None
    if torch.is_tensor(region):
        return LayoutEntry(str(phrase)), region
    if isinstance(region, (str, Path)):
        return LayoutEntry(str(phrase), path=str(region)), None
    return LayoutEntry(str(phrase), box=check_box(region, phrase)), None


def layout_masks(layout, height, width):
    """A layout (string, LayoutEntry list, or (phrase, region) pairs) -> (phrases, masks (n, height, width)).
    Mask tensors given directly are kept at their own size (the hook resizes them per layer)."""
    if not layout:
        raise ValueError(NEEDS_LAYOUT)
    items = parse_layout(layout) if isinstance(layout, str) else [_as_entry(x) for x in layout]
    items = [x if isinstance(x, tuple) else (x, None) for x in items]
    phrases, masks = [], []
    for entry, tensor in items:
        if tensor is not None:
            mask = tensor
        elif entry.path is not None:
            mask = masks_from_images([entry.path], height, width, [entry.phrase])[0]
        else:
            mask = masks_from_boxes([entry.box], height, width, [entry.phrase])[0]
        phrases.append(entry.phrase)
        masks.append(mask)
    return phrases, masks


# ------------------------------------------------------------------------------------------------ timesteps

def step_timesteps(schedule, steps, sampler="dpmpp_2m"):
    """The timestep at which `sampler` first calls the model in each of its `steps` steps (what the authors read
    from their scheduler), found by running the sampler on a 1-pixel latent with a model that predicts zeros."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    seen = {}

    def model(x, t, i):
        seen.setdefault(i, float(t))
        return torch.zeros_like(x)
    SAMPLERS[sampler](model, torch.zeros(1, 1, 1, 1), schedule, steps)
    return [seen[i] for i in range(steps)]


# ------------------------------------------------------------------------------------------------ the hook

def _check_layout(layout):
    """[(token positions, mask (H, W) in [0, 1])] -> (positions lists, binarised masks (n, H, W))."""
    if not layout:
        raise ValueError(NEEDS_LAYOUT)
    positions, masks = [], []
    for n, item in enumerate(layout, start=1):
        try:
            pos, mask = item
        except (TypeError, ValueError):
            raise ValueError(f"layout region {n}: expected (token positions, mask), got {item!r}") from None
        pos = [int(pos)] if isinstance(pos, int) else [int(p) for p in pos]
        if not pos or min(pos) < 1:
            raise ValueError(f"layout region {n}: token positions must be >= 1 (0 is the start token), got {pos}")
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.dim() != 2 or mask.numel() == 0:
            raise ValueError(f"layout region {n}: a mask is (H, W), got shape {tuple(mask.shape)}")
        if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"layout region {n}: mask values must be in [0, 1]")
        binary = (mask >= THRESHOLD).float()
        if not binary.any():
            raise ValueError(f"layout region {n}: the mask is empty (no value >= {THRESHOLD})")
        positions.append(pos)
        masks.append(binary)
    if len({m.shape for m in masks}) > 1:
        # one stack, resized per layer in one call: bring every mask to the largest size by nearest neighbour
        h = max(m.shape[0] for m in masks)
        w = max(m.shape[1] for m in masks)
        masks = [F.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0] for m in masks]
    return positions, torch.stack(masks)


class DenseDiffusion(AttentionHook):
    """The DenseDiffusion hook (module docstring). Give it to `Pipeline.__call__(..., hooks=[hook])`.

    layout: [(token positions of a phrase, mask (H, W) in [0, 1] at any size)], one item per phrase.
    num_steps: the run's number of sampling steps. timesteps: the timestep of each step (see `step_timesteps`;
    None: the "leading" timesteps of SD's schedule, which DDIM and PLMS visit).
    model_config: needed only for config.layers. `edited` collects the names of the layers modulated.
    """

    def __init__(self, layout, num_steps, config=None, timesteps=None, num_train_timesteps=1000,
                 model_config=None):
        config = self.config = config or DenseDiffusionConfig()
        self.positions, self.masks = _check_layout(layout)
        uncovered = self.masks.amax(0) == 0
        if config.background == "region" and uncovered.any():
            self.positions.append([])   # the background: a region of no token
            self.masks = torch.cat([self.masks, uncovered[None].float()])
        self.num_steps = int(num_steps)
        if timesteps is None:
            timesteps = Schedule(num_train_timesteps).timesteps(self.num_steps)
        self.timesteps = [float(t) for t in timesteps]
        if len(self.timesteps) != self.num_steps:
            raise ValueError(f"got {len(self.timesteps)} timesteps for {self.num_steps} steps")
        self.decay = [(t / num_train_timesteps) ** config.decay_power for t in self.timesteps]
        # the authors' test, COUNT / 32 < 50 * reg_part, at the first layer of each step
        self.edit_steps = sum(i < self.num_steps * config.reg_part for i in range(self.num_steps))
        if config.layers is None:
            self.select = lambda layer: True
        else:
            if model_config is None:
                raise ValueError("config.layers needs the model config (model_config=) to name layers")
            from .layers import LayerSelector
            self.select = LayerSelector(config.layers, model_config)
        self._regions = {}
        self.edited = set()

    def wants(self, layer):
        if self.step >= self.edit_steps or layer.hw is None:
            return False
        strength = self.config.creg if layer.is_cross else self.config.sreg
        return strength != 0 and self.select(layer)

    def regions(self, hw, is_cross, num_keys, device=None):
        """For a layer whose queries form an (h, w) map: R (queries, keys) bool, and 1 - sizereg * area
        (queries, 1); cached per size and kind."""
        key = (tuple(hw), bool(is_cross), int(num_keys), device)
        if key not in self._regions:
            h, w = hw
            m = F.interpolate(self.masks[None], size=(h, w), mode="nearest")[0].flatten(1)   # (regions, q)
            area = m.sum(-1, keepdim=True)                                                  # pixels per region
            size = 1 - self.config.sizereg * (m * area).sum(0)[:, None] / (h * w)
            if is_cross:
                bad = [p for pos in self.positions for p in pos if p >= num_keys]
                if bad:
                    raise ValueError(f"layout token positions {bad} are beyond the {num_keys} text tokens")
                tokens = torch.zeros(num_keys, h * w)
                for pos, region in zip(self.positions, m):
                    if pos:
                        tokens[pos] = region      # a later phrase overwrites a shared token, as in the authors' code
                inside = tokens.T > 0
            else:
                if num_keys != h * w:
                    raise ValueError(f"self-attention with {num_keys} keys on a {h}x{w} map")
                inside = (m.T @ m) > 0
            self._regions[key] = (inside, size) if device is None else (inside.to(device), size.to(device))
        return self._regions[key]

    def edit_logits(self, layer, logits):
        strength = self.config.creg if layer.is_cross else self.config.sreg
        inside, size = self.regions(layer.hw, layer.is_cross, logits.shape[-1], logits.device)
        if inside.shape[0] != logits.shape[-2]:
            raise ValueError(f"layer {layer.name}: {logits.shape[-2]} queries for a {layer.hw} map")
        lam = size * (strength * self.decay[self.step])                  # (queries, 1)
        out = logits.clone()
        s = out[self.cond]                                               # a view for the pipeline's slices
        # s + lam (max - s) inside, s - lam (s - min) outside, i.e. (1 - lam) s + lam * (max or min), written in
        # place: self-attention logits at 64x64 maps are 4096 x 4096 per head, so every temporary counts
        extreme = torch.where(inside, s.amax(-1, keepdim=True), s.amin(-1, keepdim=True))
        s.mul_(1 - lam).add_(extreme.mul_(lam))
        if not isinstance(self.cond, slice):
            out[self.cond] = s
        self.edited.add(layer.name)
        return out


# ------------------------------------------------------------------------------------------------ from a prompt

def _tokenizers(pipe):
    return pipe.tokenizers if len(getattr(pipe, "tokenizers", [])) > 1 else pipe.tokenizer


def resolve_phrases(pipe, prompt, phrases):
    """Each layout phrase -> its Target (all sub-token positions), with an error that names the phrase."""
    try:
        return resolve_targets(_tokenizers(pipe), prompt, list(phrases))
    except TargetError as e:
        raise TargetError(f"layout: {e}") from None


def make_dense(pipe, prompt, steps, layout, config=None, *, height=None, width=None, sampler="dpmpp_2m",
               spacing="leading", start=0):
    """The DenseDiffusion hook for `prompt` run with `steps` steps of `sampler` under `spacing` (these give the
    timesteps of the time decay: pass those of the run). Image-to-image: `steps` are the steps that run, the last of
    a schedule of start + steps (its first `start` skipped), whose timesteps they keep.

    layout: a command-line string (parse_layout), or a list of LayoutEntry or (phrase, region) pairs, region a
    box, a mask file or a mask tensor (H, W). Boxes and mask files become masks at height x width (default: the
    model's image size). Raises ValueError for a missing layout, a phrase not in the prompt, a bad box or file."""
    if config is not None and not isinstance(config, DenseDiffusionConfig):
        raise TypeError(f"dense-diffusion takes a DenseDiffusionConfig, got {type(config).__name__}")
    if not layout:
        raise ValueError(NEEDS_LAYOUT)
    height, width = height or pipe.cfg.image_size, width or pipe.cfg.image_size
    phrases, masks = layout_masks(layout, height, width)
    targets = resolve_phrases(pipe, prompt, phrases)
    timesteps = step_timesteps(Schedule.for_model(pipe.cfg, spacing), start + steps, sampler)[start:]
    return DenseDiffusion([(t.positions, m) for t, m in zip(targets, masks)], steps, config, timesteps=timesteps,
                          num_train_timesteps=pipe.cfg.num_train_timesteps, model_config=pipe.cfg)


@contextmanager
def phrase_embeddings(pipe, prompt, phrases):
    """Inside this block `pipe` encodes `prompt` with the embeddings at each phrase's tokens replaced by those of
    the phrase encoded alone (its tokens 1..n), as the authors' code does before sampling. Other prompts (the
    negative one) are encoded as usual; SDXL's pooled vector stays that of the whole prompt.

        with phrase_embeddings(pipe, prompt, ["red circle", "blue square"]):
            pipe(prompt, hooks=[make_dense(pipe, prompt, steps, layout)], steps=steps)
    """
    targets = resolve_phrases(pipe, prompt, phrases)
    own = pipe.__dict__.get("encode")
    plain = pipe.encode
    alone = [plain([parse_target(t.word)[0]])[0][0] for t in targets]   # (77, d) each

    def encode(prompts):
        cond, pooled = plain(prompts)
        rows = [r for r, p in enumerate(prompts) if p == prompt]
        if rows:
            cond = cond.clone()
            for t, emb in zip(targets, alone):
                n = len(t.positions)
                cond[rows, t.positions[0]:t.positions[0] + n] = emb[1:1 + n].to(cond)
        return cond, pooled
    pipe.encode = encode
    try:
        yield pipe
    finally:
        if own is None:
            del pipe.encode
        else:
            pipe.encode = own


def set_up(pipe, prompt, steps, layout=None, layers=None, strength=None, layout_background=None, phrase_swap=None,
           height=None, width=None, sampler="dpmpp_2m", spacing="leading", start=0, **run):
    """regulation.editors.set_up's Run of DenseDiffusion: layout (see make_dense), layout_background ("region", the
    default, or "none"), phrase_swap (the phrases' own embeddings, default True); strength scales creg and sreg."""
    if not layout:
        raise ValueError(NEEDS_LAYOUT)
    # boxes and mask files become masks once, here; make_dense takes the (phrase, mask) pairs as they are
    phrases, masks = layout_masks(layout, height or pipe.cfg.image_size, width or pipe.cfg.image_size)
    config = DenseDiffusionConfig(layers=layers, background=layout_background or "region")
    if strength is not None:
        config = replace(config, creg=config.creg * strength, sreg=config.sreg * strength)
    hook = make_dense(pipe, prompt, steps, list(zip(phrases, masks)), config,
                      height=height, width=width, sampler=sampler, spacing=spacing, start=start)
    settings = {"Regulation layout": "; ".join(phrases), "Regulation layers": layers or "all",
                "Regulation edit steps": hook.edit_steps}
    if config.background != "region":
        settings["Regulation layout background"] = config.background
    swap = phrase_swap is None or phrase_swap
    if not swap:
        settings["Regulation phrase swap"] = "off"
    # it modulates every layer (config.layers: some); its maps are shown where regulation's would be
    return Run(hooks=[hook], context=phrase_embeddings(pipe, prompt, phrases) if swap else nullcontext(),
               select=LayerSelector(layers, pipe.cfg), shown=resolve_phrases(pipe, prompt, phrases),
               settings=settings)


# The authors' demo: the sliders w^c and w^s (1.0 and 0.3), scaled together, are the knob.
METHOD = register(Method(
    "dense", "DenseDiffusion", Knob("strength", "creg/sreg scale", 1.0, "a scale of its creg and sreg"),
    takes={"layout", "layers", "strength", "layout_background", "phrase_swap"}, set_up=set_up,
    about="DenseDiffusion (Kim et al. 2023), needs --layout", needs=("layout",), self_attention=True,
    not_joint="DenseDiffusion's layer rule is the UNet's"))
