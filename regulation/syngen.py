"""SynGen: move the latents until each modifier's attention map lies on its noun's, and apart from the other words'.

Rassin, Hirsch, Glickman, Ravfogel, Goldberg, Chechik, "Linguistic Binding in Diffusion Models: Enhancing Attribute
Correspondence through Attention Map Alignment" (NeurIPS 2023, arXiv 2306.08877). A prompt such as "a pink sunflower
and a yellow flamingo" is parsed into nouns and their modifiers, (pink, sunflower) and (yellow, flamingo); the loss
asks the cross-attention map of each modifier to match its noun's, and both to differ from the maps of the words
outside their pair, so the colour lands on the right object. The released code is built on diffusers'
Attend-and-Excite pipeline, and so is this module on regulation/attend_excite.py: the same conditional pass with
gradient, the same maps, the same kind of latent update, no refinement.

At each of the first `max_iter_to_alter` steps, before the usual (guided) model call:
  1. run the UNet on the conditional text alone, with gradient, and keep the cross-attention probabilities of the
     chosen layers, averaged over heads and layers: A (h, w, L) (softmax over all L tokens, start token included);
  2. per token j, the map as a distribution over the h*w cells: P_j = A[..., j] / sum(A[..., j]);
     D(i, j) = (KL(P_i || P_j) + KL(P_j || P_i)) / 2, the symmetric KL divergence;
  3. for each noun n with modifiers m_1..m_k (a "pair" here; the authors' "subtree"), with O = the prompt's
     token positions 1..eot-1 outside {n, m_1..m_k} (articles, conjunctions, other nouns and their modifiers):
       positive = sum_i D(m_i, n)
       negative = sum_i -(mean_{o in O} D(m_i, o) + mean_{o in O} D(n, o)) / 2
     a noun without modifiers (kept only with include_entities) adds -mean_{o in O} D(n, o);
     loss = the sum over pairs of positive + negative;
  4. x <- x - step_size[i] * dloss/dx (no update where the loss is exactly 0, as the authors).

A word of several sub-tokens (regulation.targets gives all its positions): as the authors' code, a distance
involving it is the largest over its sub-tokens (over sub-token pairs for D(m, n)); each sub-token of a word
outside the pair is an outside token of its own.

The numbers and the order of operations are those of the authors' SynGenDiffusionPipeline and compute_loss.py
(RoyiRa/Linguistic-Binding-in-Diffusion-Models, for diffusers 0.21). Where the paper's formulas and their code
differ, this module follows the code. Where it differs from the code, on purpose:
  - The step size. The released code moves every altered step by the constant `syngen_step_size` (20), not by
    Attend-and-Excite's scale_factor * sqrt(linspace(1, 0.5, steps)[i]); so does this module by default
    (scale_range=(1.0, 1.0)). scale_range=(1.0, 0.5) gives Attend-and-Excite's decay.
  - Batches. Their loop runs the pass image by image, and appends the updated latent after the loop (an
    indentation slip), so a batch of several images comes back as its last image alone. Here one batched pass:
    each image's loss is its own, and the gradient of their sum is each image's own gradient.
  - The parse. They parse with spaCy's en_core_web_trf and three extraction rules whose groups are merged where
    they share a word, and take a group's last word as its noun (after a merge, or in their copula rule's
    [car, red] for "the car is red", that can be a modifier; the third rule returns inside its loop, so it
    reads the first noun only). Here the pairs come from regulation.targets.modifier_noun_pairs: rules by
    default (no language model needed), or spaCy with their first rule and their copula rule, the noun always
    the noun. Or give the pairs yourself.
  - Words to positions. They match spaCy tokens to word pieces by text (a word's first unused occurrence); here
    regulation.targets.resolve_targets gives each word all its sub-token positions ("red#2": the second "red").
  - They multiply the averaged maps by 100 before torch.distributions.Categorical normalises them; the factor
    cancels in that normalisation and is left out. Categorical's KL is infinite where a map has an exact zero;
    the same clamp of the logarithm to [eps, 1 - eps] is kept here but the infinity is not (the maps are
    averages of softmax outputs, so a zero only comes from underflow, where the authors' loss and gradient are
    inf and NaN).
  - They average every cross-attention layer whose map is `attn_res` (16x16 at 512 px: side / 32) from the down,
    mid and up blocks; here the layers are `regulation.layers.LayerSelector(config.layers)`, by default
    Attend-and-Excite's rule for the same attn_res = 16 (attend_excite.default_layers: for SD at 512 px the same
    five 16x16 layers; on the shipped shapes model its 16x16 maps).
  - The maps go into the loss in float32 (float64 if given float64) whatever the model's dtype.
`max_iter_to_alter` is a step index, as their num_intervention_steps: with fewer than 50 steps it is not scaled.
"""
from dataclasses import dataclass, replace
import math

import numpy as np
import torch

from regulation.attend_excite import ConditionalPassMaps
from regulation.registry import Knob, Method, Run, register
from regulation.targets import Target, TargetError, eot_position, modifier_noun_pairs, resolve_targets


@dataclass
class SynGenConfig:
    max_iter_to_alter: int = 25     # steps 0..max_iter_to_alter-1 are altered (their num_intervention_steps=25)
    scale_factor: float = 20.0      # their syngen_step_size=20.0 (run.py --step_size)
    scale_range: tuple = (1.0, 1.0)   # step = scale_factor * sqrt(linspace(*scale_range, steps)[i]); theirs: constant
    include_entities: bool = False  # nouns without modifiers add a negative-only term (their run.py default: off)
    parser: str = "rules"           # how make_syngen finds the pairs: "rules" or "spacy" (targets.modifier_noun_pairs)
    layers: tuple | None = None     # LayerSelector specs; None = attend_excite.default_layers (attn_res 16)

    def __post_init__(self):
        if self.parser not in ("rules", "spacy"):
            raise ValueError(f"parser must be 'rules' or 'spacy', got {self.parser!r}")
        if self.max_iter_to_alter < 0:
            raise ValueError(f"max_iter_to_alter must be >= 0, got {self.max_iter_to_alter}")
        if len(self.scale_range) != 2 or min(self.scale_range) < 0:
            raise ValueError(f"scale_range must be two numbers >= 0, got {self.scale_range}")


def step_sizes(num_steps, config=None):
    """step_size[i] = scale_factor * sqrt(linspace(scale_range[0], scale_range[1], num_steps)[i]); with the
    authors' scale_range (1, 1), scale_factor at every step."""
    config = config or SynGenConfig()
    return [config.scale_factor * math.sqrt(s) for s in np.linspace(*config.scale_range, num_steps)]


def symmetric_kl(attn, rows, cols):
    """attn (b, h, w, L) -> (b, len(rows), len(cols)): per image, (KL(P_r || P_c) + KL(P_c || P_r)) / 2 between
    token r's and token c's maps, each normalised to a distribution over the h*w cells. The logarithms are
    clamped to [eps, 1 - eps] as torch.distributions.Categorical does (the authors' KL)."""
    x = (attn if attn.dtype == torch.float64 else attn.float()).flatten(1, 2)   # (b, hw, L)
    p, q = x[..., list(rows)], x[..., list(cols)]
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    eps = torch.finfo(x.dtype).eps
    d = p.clamp(eps, 1 - eps).log()[..., :, None] - q.clamp(eps, 1 - eps).log()[..., None, :]   # (b, hw, R, C)
    return ((p[..., :, None] * d).sum(1) - (q[..., None, :] * d).sum(1)) / 2


def syngen_loss(attn, pairs, eot):
    """Per image, SynGen's loss on maps attn (b, h, w, L) averaged over heads and layers (module docstring).
    pairs: [(modifiers, noun)], modifiers a list with per modifier word its positions, noun its positions (all in
    1..eot-1); eot: the end-of-text position. Returns (loss, positive, negative), each (b,), loss = their sum."""
    pairs = _check_pairs(pairs, eot)
    tokens = list(range(1, eot))
    rows = sorted({p for mods, noun in pairs for p in noun + [q for m in mods for q in m]})
    dist = symmetric_kl(attn, rows, tokens)
    row = {p: k for k, p in enumerate(rows)}

    def block(src, dst):
        return dist[:, [row[p] for p in src]][:, :, [q - 1 for q in dst]]

    def apart(src, outside):
        # per outside token, the sub-token of src farthest from it; then the mean over outside tokens
        return block(src, outside).amax(1).mean(-1) if outside else dist.new_zeros(len(dist))

    positive, negative = dist.new_zeros(len(dist)), dist.new_zeros(len(dist))
    for mods, noun in pairs:
        inside = set(noun) | {p for m in mods for p in m}
        outside = [q for q in tokens if q not in inside]
        noun_apart = apart(noun, outside)
        if not mods:
            negative = negative - noun_apart
        for m in mods:
            positive = positive + block(m, noun).amax((1, 2))
            negative = negative - (apart(m, outside) + noun_apart) / 2
    return positive + negative, positive, negative


def _positions(p):
    out = [int(p)] if isinstance(p, (int, np.integer)) else [int(q) for q in p]
    if not out:
        raise ValueError("a SynGen word needs at least one token position")
    return out


def _check_pairs(pairs, eot):
    """[(modifiers, noun)] with ints or lists of ints -> [(list of position lists, position list)], checked."""
    out = []
    for pair in pairs:
        try:
            mods, noun = pair
        except (TypeError, ValueError):
            raise ValueError(f"a SynGen pair is (modifier positions, noun positions), got {pair!r}") from None
        mods = [_positions(m) for m in ([mods] if isinstance(mods, (int, np.integer)) else mods)]
        out.append((mods, _positions(noun)))
    if not out:
        raise ValueError("SynGen needs at least one (modifiers, noun) pair")
    for mods, noun in out:
        flat = noun + [p for m in mods for p in m]
        if len(set(flat)) != len(flat):
            raise ValueError(f"a pair's words must be different tokens, got modifiers {mods} and noun {noun}")
        bad = [p for p in flat if not 1 <= p < eot]
        if bad:
            raise ValueError(f"positions must be the prompt's tokens, 1..{eot - 1} (eot={eot}), got {bad}")
    return out


class SynGen(ConditionalPassMaps):
    """The SynGen hook. Give it to `Pipeline.__call__(..., hooks=[hook])`: the pipeline calls `edit_latents` at the
    start of each step; only inside that call, while its own conditional UNet pass runs, does the hook want the
    chosen cross-attention layers (the guided model call takes the fast path).

    pairs: [(modifiers, noun)]: per modifier word its token positions, and the noun's (an int stands for one
    position); a pair with no modifiers is a noun's negative-only term. `self.pairs` keeps them as lists.
    eot: the end-of-text position (the outside tokens are 1..eot-1). num_steps: the run's number of steps.
    `history[step]` holds, per image, the loss, its positive and negative parts, and the step size.
    `select` is the LayerSelector of the maps the loss reads (for observers that show them).
    """

    method = "SynGen"

    def __init__(self, pairs, eot, num_steps, config=None, select=None, model_config=None):
        self._set_up(config or SynGenConfig(), num_steps, select, model_config)
        self.eot = int(eot)
        self.pairs = _check_pairs(pairs, self.eot)
        self.step_size = step_sizes(self.num_steps, self.config)

    def loss_and_grad(self, x, t, cond_unet):
        """Each image's (loss, positive, negative) at latents x, and the gradient of its loss with respect to x
        (zero where the loss is exactly 0)."""
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(True)
            loss, positive, negative = syngen_loss(self._attention(x, t, cond_unet), self.pairs, self.eot)
            live = loss != 0
            grad = torch.autograd.grad(loss.sum(), x)[0] if live.any() else torch.zeros_like(x)
        parts = (loss.detach(), positive.detach(), negative.detach())
        return parts, grad * live.view(-1, *[1] * (x.dim() - 1))

    def edit_latents(self, x, t, i, cond_unet):
        if i >= self.config.max_iter_to_alter:
            return x
        if i >= len(self.step_size):
            raise ValueError(f"step {i} of a run the hook was built for {self.num_steps} steps of")
        size = self.step_size[i]
        (loss, positive, negative), grad = self.loss_and_grad(x, t, cond_unet)
        self.history[i] = dict(loss=loss.tolist(), positive=positive.tolist(), negative=negative.tolist(),
                               step_size=size)
        return x.detach().float() - size * grad


# --- from a prompt to the hook -----------------------------------------------------------------------------

class NoPairsError(ValueError):
    """A prompt in which SynGen finds no modifier to bind to a noun."""


def parse_pairs(spec):
    """"small fluffy cat; wooden table" -> [(["small", "fluffy"], "cat"), (["wooden"], "table")]: groups split by
    ";", each group's last word is the noun ("red#2 cube": the second "red", see resolve_targets)."""
    out = []
    for group in spec.split(";"):
        words = group.replace(",", " ").split()
        if words:
            out.append((words[:-1], words[-1]))
    if not out:
        raise ValueError(f"no pairs in {spec!r}; write them like 'small fluffy cat; wooden table'")
    return out


def resolve_pairs(tokenizer, prompt, pairs=None, parser="rules", include_entities=False):
    """Word pairs -> token positions: [(per modifier its positions, the noun's positions)].
    pairs: [(modifier words, noun word)] (modifier words may be one string), a string for parse_pairs, or None:
    regulation.targets.modifier_noun_pairs(prompt, parser). Nouns without modifiers are dropped unless
    include_entities. A ValueError (TargetError) names a word that is not in the prompt; a ValueError says so
    when no pair with a modifier is left."""
    given = pairs is not None
    if pairs is None:
        pairs = modifier_noun_pairs(prompt, parser)
    elif isinstance(pairs, str):
        pairs = parse_pairs(pairs)
    words = [(m.split() if isinstance(m, str) else list(m), n) for m, n in pairs]
    kept = [(mods, noun) for mods, noun in words if mods or include_entities]
    if not any(mods for mods, _ in kept):
        found = "; ".join(" ".join(m + [n]) for m, n in words) or "no nouns"
        raise NoPairsError(f"SynGen found no modifier-noun pair in {prompt!r} ({'given' if given else 'parsed'}: "
                           f"{found}); name them, e.g. pairs='red circle; blue square'")
    out = []
    for mods, noun in kept:
        try:
            resolved = resolve_targets(tokenizer, prompt, mods + [noun])
        except TargetError as e:
            raise TargetError(f"SynGen pair {' '.join(mods + [noun])!r}: {e}") from None
        out.append(([t.positions for t in resolved[:-1]], resolved[-1].positions))
    return out


def token_text(tokenizer, prompt):
    """positions -> the prompt's text at those token positions (a word of several sub-tokens whole)."""
    ids = tokenizer.ids(prompt)
    return lambda ps: "".join(tokenizer.token_text(ids[p]) for p in ps).replace("</w>", " ").strip()


def make_syngen(pipe, prompt, steps, layers=None, pairs=None, config=None, log=None):
    """The SynGen hook for `prompt` on `pipe`, for a run of `steps` steps. pairs: see resolve_pairs (None: parse
    the prompt with config.parser). layers: LayerSelector specs (None: config.layers, else the model's default).
    log (e.g. print) is told the pairs and their tokens. SynGen draws no random numbers: there is no seed."""
    if config is not None and not isinstance(config, SynGenConfig):
        raise TypeError(f"syngen takes a SynGenConfig, got {type(config).__name__}")
    config = config or SynGenConfig()
    config = replace(config, layers=layers or config.layers)
    tokenizer = pipe.tokenizers if len(getattr(pipe, "tokenizers", [])) > 1 else pipe.tokenizer
    positions = resolve_pairs(tokenizer, prompt, pairs, config.parser, config.include_entities)
    if log:
        text = token_text(tokenizer[0] if isinstance(tokenizer, list) else tokenizer, prompt)
        for mods, noun in positions:
            log(f"SynGen pair: {' '.join(text(m) for m in mods) or '(no modifier)'} -> {text(noun)}   "
                f"positions {mods} -> {noun}")
    return SynGen(positions, eot_position(tokenizer, prompt), steps, config=config, model_config=pipe.cfg)


def set_up(pipe, prompt, steps, targets=None, layers=None, edit_steps=None, strength=None, log=None, **run):
    """regulation.editors.set_up's Run of SynGen. targets: its pairs ("red circle; blue square"; None: parsed from
    the prompt); strength: the latent step size (scale_factor)."""
    config = SynGenConfig()
    if edit_steps is not None:
        config = replace(config, max_iter_to_alter=edit_steps)
    if strength is not None:
        config = replace(config, scale_factor=float(strength))
    hook = make_syngen(pipe, prompt, steps, layers=layers, pairs=targets, config=config, log=log)
    word = token_text(pipe.tokenizer, prompt)
    # each modifier beside its noun: the maps the loss pulls together
    shown = [Target(word(ps), ps, []) for mods, noun in hook.pairs for ps in [*mods, noun]]
    return Run(hooks=[hook], select=hook.select, shown=shown, settings={
        "Regulation targets": "; ".join(" ".join(word(ps) for ps in [*m, n]) for m, n in hook.pairs),
        "Regulation layers": " ".join(hook.select.specs), "Regulation edit steps": hook.edit_steps})


# The authors' run.py: the latent step size (--step_size) is the knob.
METHOD = register(Method("syngen", "SynGen", Knob("strength", "step size", 20.0, "the latent step size"),
                         takes={"targets", "layers", "edit_steps", "strength"}, set_up=set_up, target_words=False,
                         about="SynGen (Rassin et al. 2023), modifiers bound to their nouns",
                         not_joint="SynGen's layer rule is the UNet's"))
