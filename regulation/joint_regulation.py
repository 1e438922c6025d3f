"""Attention Regulation (and Attend-and-Excite) on SD 3's joint attention: what changes there, chosen by the model.

This module holds what the methods share on joint attention: whether a model's attention is joint (is_joint), which
blocks (JointBlockSelector), targets in CLIP and T5 (choose_joint_targets) and the columns restored after the
softmax (special_columns). regulation.editors picks these by the model; the editors themselves live with their
methods (JointRegulation in regulation/attention_regulation.py, JointAttendExcite in regulation/attend_excite.py).

In an MMDiT there is no cross-attention layer: each joint block runs one softmax over [text keys, image keys] for
every query, text and image alike (minisd/mmdit.py). The part that plays the UNet's cross-attention map is the
image-to-text block: image queries (the h x w patch grid) x text keys (77 CLIP states, then T5's tokens). The
spec (shared/design/attention-regulation.md) carries over as follows; what changed, and why:

- Where: the image-query rows of the conditional half, in the joint blocks chosen (JointBlockSelector; default
  `ModelConfig.default_blocks`, a provisional rule stated in minisd/config.py: sd3_default_blocks). Text-query
  rows are never edited.
- Targets: each target word resolves in both tokenizers, CLIP (its position p, key p) and T5 (position q, key
  77 + q); every sub-token in either is a target column, so k counts both (tau = min(1, 0.2 k) as in the spec).
- The additive term: Delta, the spec's Gaussian bumps over the h x w patch grid, is added to the logits of the
  target text columns of the image-query rows only; the softmax then runs over all keys (text and image), so the
  edit can take mass from image keys as well as from the other words.
- The loss reads the maps renormalised over the text keys: A = softmax over the text columns only of the edited
  logits, i.e. each image query's attention to text, as a distribution over the text tokens. Why: the released
  loss (0.9-quantile near 0.9, mean near tau / k) is calibrated for a softmax over 77 text tokens. In joint
  attention a query's text mass is a fraction of 1 (thousands of image keys against 154 text keys), so the raw
  share of a word could seldom come near 0.9; the optimiser would inflate Delta until the target columns beat the
  image keys, changing how the image reads itself rather than which word it reads. Renormalised, the loss asks
  the paper's question ("of the text this patch reads, how much is the target?") whatever the text mass is, and
  it is the existing optimiser unchanged, run on the (N, h*w, text keys) block: the log-sum-exp that folds the
  other columns runs over the other text columns.
- After the softmax, the columns the released code restores (start of text and end of text) are restored in
  the image-query rows from the unedited joint softmax: CLIP's start (key 0), CLIP's end of text and T5's end of
  text (key 77 + its position).
- State per layer name (`model.diffusion_model.joint_blocks.N`), generators per image, float32, blend, decay and
  edit steps: as the spec and regulation/attention_regulation.py.

Attend-and-Excite reads the same image-to-text block (unrenormalised: its own softmax over the prompt's CLIP tokens,
x 100, renormalises it) during its conditional pass, with its targets at their CLIP positions.

What could not be measured here: no trained MMDiT is reachable from this machine, so neither the block rule nor
the effect of the edit on real images has been measured; the tests check the arithmetic against a float64
line-by-line reference (tests/reference_joint_regulation.py) and the plumbing on a tiny random SD 3.5.
"""
import re
from dataclasses import dataclass, field

from regulation.targets import TargetError, auto_targets, eot_position, parse_target, resolve_targets, token_table

CLIP_TOKENS = 77   # the CLIP states come first among the text keys; T5's follow


def is_joint(model_config):
    """Whether the model's attention is joint (an MMDiT: one softmax over text and image keys), not a UNet's."""
    return model_config.is_sd3


class JointBlockSelector:
    """`selector(layer) -> bool` for SD 3's joint attention: specs are block names (`joint_blocks.12`, with or
    without `model.diffusion_model.`) or block numbers; None: the model's default blocks."""

    def __init__(self, specs, model_config):
        if specs is None:
            specs = model_config.default_blocks()
        if isinstance(specs, (str, int)):
            specs = str(specs).replace(",", " ").split()
        depth = model_config.mmdit.depth
        self.specs, self.blocks = list(specs), set()
        for spec in map(str, specs):
            m = re.fullmatch(r"(?:model\.diffusion_model\.)?(?:joint_blocks\.)?(\d+)", spec)
            if not m or int(m.group(1)) >= depth:
                raise ValueError(f"{spec!r} names no joint block of this model: joint_blocks.0 to "
                                 f"joint_blocks.{depth - 1} (or their numbers)")
            self.blocks.add(int(m.group(1)))
        if not self.blocks:
            raise ValueError("no joint blocks given")

    def __call__(self, layer):
        return getattr(layer, "joint", False) and int(layer.name.rsplit(".", 1)[-1]) in self.blocks

    @property
    def names(self):
        """The chosen blocks by name, in order: what is recorded beside an image."""
        return [f"joint_blocks.{b}" for b in sorted(self.blocks)]

    def __repr__(self):
        return f"JointBlockSelector({self.specs})"


@dataclass
class JointTarget:
    word: str
    positions: list                  # text-key indices in the joint attention: CLIP's p, T5's 77 + q
    clip: list = field(default_factory=list)
    t5: list = field(default_factory=list)
    tokens: list = field(default_factory=list)


def t5_words(t5_tokenizer, prompt):
    """[(word, [its T5 positions])] for the words T5 reads of the prompt (the first 226 characters as Stability's
    reference, or the whole prompt with --t5-length), each word tokenized alone as the reference tokenizes (so every
    T5 token belongs to exactly one word). Positions past the T5 tokens the model reads (--t5-length cuts) are
    left out, with the words they belong to."""
    out, pos = [], 0
    kept = t5_tokenizer.length - 1 if t5_tokenizer.length is not None else None   # the last position is end-of-text
    for word in t5_tokenizer.read(prompt).split():
        ids = t5_tokenizer.sp.encode(word)
        if kept is not None and pos + len(ids) > kept:
            break
        out.append((word, list(range(pos, pos + len(ids)))))
        pos += len(ids)
    return out


def _norm(word):
    return re.sub(r"[^\w]", "", word.lower())


def t5_positions(t5_tokenizer, prompt, spec):
    """A target (a word or a phrase, `#n` for its n-th occurrence) -> its T5 positions, or [] where T5 does not read
    it n times. Words match whole and without punctuation or case ("Dog," is "dog"), a phrase word by word in a row:
    the rule CLIP's targets follow (regulation/targets.py), so both streams count the same occurrences."""
    phrase, nth = parse_target(spec)
    want = [_norm(w) for w in phrase.split()]
    words = t5_words(t5_tokenizer, prompt)
    hits = [sum((p for _, p in words[i:i + len(want)]), []) for i in range(len(words) - len(want) + 1)
            if [_norm(w) for w, _ in words[i:i + len(want)]] == want]
    if len(hits) < nth:
        return []
    # the word's own pieces, not the punctuation written onto it ("hill," is "hill" and ","), as CLIP's targets
    ids = t5_tokenizer.ids(prompt)
    return [p for p in hits[nth - 1] if _norm(t5_tokenizer.sp.decode([ids[p]]))]


def resolve_joint_targets(pipe, prompt, words, log=print):
    """Target words -> JointTargets, resolved with the CLIP tokenizers and with T5's; prints both tables. A target
    that only one stream reads (CLIP's 77 tokens cut it, or T5's length; or it is written so that the two read it
    differently) is regulated in that stream, and a line says so; one that neither reads is an error with CLIP's
    token table."""
    if isinstance(words, str):
        words = words.split()
    t5 = pipe.t5_tokenizer if pipe.model.text_encoders.has_t5 else None
    targets, notes, clip_found = [], [], []
    for spec in words:
        try:
            c = resolve_targets(pipe.tokenizers, prompt, [spec])[0]
            clip_found.append(c)
        except TargetError:
            if t5 is None or not t5_positions(t5, prompt, spec):
                raise
            c = None
        q = t5_positions(t5, prompt, spec) if t5 is not None else []
        if t5 is not None and not q:
            notes.append(f"target {spec!r} is not in T5's reading of the prompt: regulated in CLIP's columns only")
        if c is None:
            notes.append(f"target {spec!r} is not in CLIP's 77 tokens: regulated in T5's columns only")
        clip_positions = list(c.positions) if c else []
        targets.append(JointTarget(spec, clip_positions + [CLIP_TOKENS + p for p in q], clip_positions, q,
                                   list(c.tokens) if c else []))
    if log:
        log("CLIP tokens:\n" + token_table(pipe.tokenizers, prompt, clip_found))
        if t5 is not None:
            pieces = t5.pieces(prompt)
            rows = [f"{p:>8}  {pieces[p]:<16} {t.word}" for t in targets for p in t.t5]
            log("T5 tokens (key = 77 + position):\n position  token            word\n" + "\n".join(rows))
        for note in notes:
            log(note)
    return targets


def choose_joint_targets(pipe, prompt, words=None, log=print):
    """As regulation.editors.choose_targets, for SD 3: without words, the nouns of the prompt's noun phrases
    within the part CLIP reads; the CLIP and T5 tables printed."""
    if not words:
        words = auto_targets(pipe.tokenizer.kept(prompt)[0])
        if not words:
            raise ValueError(f"found no object words in {prompt!r}; name them with --targets")
        if log:
            log(f"targets chosen from the prompt: {' '.join(words)}")
    return resolve_joint_targets(pipe, prompt, words, log)


def special_columns(pipe, prompt):
    """Text keys whose probabilities the released code restores: CLIP's start and end of text, T5's end of text."""
    cols = [0, eot_position(pipe.tokenizers, prompt)]
    if pipe.model.text_encoders.has_t5:   # where the model reads it: --t5-length may cut the prompt before it
        cols.append(CLIP_TOKENS + pipe.t5_tokenizer([prompt])[0].tolist().index(1))
    return cols
