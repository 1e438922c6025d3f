"""A tiny CLIP for the shapes world: the text encoder that minisd-shapes freezes, as Stable Diffusion freezes
OpenAI's CLIP ViT-L/14 (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision").

The text tower is minisd's own `TextEncoder` (transformers' CLIPTextModel, the real CLIP tokenizer); its pooled
output is the final-LayerNorm state at the first end-of-text token, as in CLIP. The image tower is a small CNN that
exists only for this training. Captions are matched to renders with the symmetric contrastive loss, and each image
also has to beat *hard negatives* of its own caption: the same objects with two colours swapped, one object
dropped, one shape changed, one colour changed. Without them a bag of words would do; with them the encoder has
to bind each colour to its shape, which is what regulation's targets need from the words.

Only training scenes are used (held-out pairs never appear together); `evaluate` measures retrieval on the
held-out pairs.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tools.testbed import shapes


class ImageTower(nn.Module):
    """64 px render -> embedding: four stride-2 convolutions and a global average."""

    def __init__(self, dim, width=32):
        super().__init__()
        chans, layers = [3, width, 2 * width, 4 * width, 4 * width], []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1], dim)

    def forward(self, x):
        return self.proj(self.net(x).mean((2, 3)))


class TinyCLIP(nn.Module):
    def __init__(self, text_encoder, eot_id, dim=64):
        super().__init__()
        self.text = text_encoder
        self.eot_id = eot_id
        self.text_projection = nn.Linear(text_encoder.config.hidden_size, dim, bias=False)
        self.image = ImageTower(dim)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def encode_text(self, ids):
        h = self.text(ids)                                   # (b, 77, hidden), final LayerNorm applied
        eot = (ids == self.eot_id).int().argmax(1)           # the first end-of-text token, as CLIP pools
        return F.normalize(self.text_projection(h[torch.arange(len(ids)), eot]), dim=-1)

    def encode_image(self, x):
        return F.normalize(self.image(x), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# hard negatives

def _fmt(keys, template):
    return template.format(*[shapes.phrase(c, s) for c, s in keys])


# The one-change rules, shared with tools/testbed/clipscore.py's check: (colour, shape) objects -> the same objects
# with one thing changed; a new shape or colour is one the scene does not have.

def colours_swapped(keys, i, j):
    out = list(keys)
    out[i], out[j] = (keys[j][0], keys[i][1]), (keys[i][0], keys[j][1])
    return out


def other_shapes(keys):
    return [s for s in shapes.SHAPES if s not in {s for _, s in keys}]


def other_colours(keys):
    return [c for c in shapes.COLOURS if c not in {c for c, _ in keys}]


def shape_changed(keys, k, shape):
    return [(keys[k][0], shape) if m == k else o for m, o in enumerate(keys)]


def colour_changed(keys, k, colour):
    return [(colour, keys[k][1]) if m == k else o for m, o in enumerate(keys)]


def hard_negatives(keys, template, rng):
    """Captions that differ from `keys` (in the same template where the count allows) in exactly one way:
    colours of two objects swapped, one object dropped, one shape changed, one colour changed."""
    keys, out = [tuple(k) for k in keys], []
    n = len(keys)
    if n >= 2:
        i, j = rng.choice(n, 2, replace=False)
        sw = colours_swapped(keys, i, j)
        if len(set(sw)) == n:
            out.append(_fmt(sw, template))
        gone = rng.integers(n)
        drop = [k for m, k in enumerate(keys) if m != gone]
        out.append(shapes.caption_for(drop, rng))
    k = int(rng.integers(n))
    out.append(_fmt(shape_changed(keys, k, str(rng.choice(other_shapes(keys)))), template))
    out.append(_fmt(colour_changed(keys, k, str(rng.choice(other_colours(keys)))), template))
    return out


def caption_and_negatives(keys, rng, n_neg=4):
    """(caption, [n_neg hard negatives]) for one scene; short lists are filled up by repeating."""
    order = [keys[i] for i in rng.permutation(len(keys))]
    template = shapes.TEMPLATES[len(order)][rng.integers(len(shapes.TEMPLATES[len(order)]))]
    negs = hard_negatives(order, template, rng)
    return _fmt(order, template), [negs[m % len(negs)] for m in range(n_neg)]


def contrastive_loss(model, images, ids, neg_ids):
    """Symmetric InfoNCE over the batch, plus each image against its own hard negatives.
    images (b, 3, 64, 64); ids (b, 77); neg_ids (b * k, 77)."""
    b = len(images)
    img, txt = model.encode_image(images), model.encode_text(ids)
    neg = model.encode_text(neg_ids).view(b, -1, txt.shape[-1])        # (b, k, d)
    scale = model.logit_scale.exp().clamp(max=100)
    i2t = torch.cat([img @ txt.T, (img[:, None] * neg).sum(-1)], 1) * scale  # (b, b + k)
    target = torch.arange(b)
    loss = (F.cross_entropy(i2t, target) + F.cross_entropy((txt @ img.T) * scale, target)) / 2
    return loss, (i2t.argmax(1) == target).float().mean()


@torch.no_grad()
def evaluate(model, tok, n=200, seed=4321, size=64):
    """Held-out retrieval: for scenes of held-out pairs, how often the true caption beats every one of its hard
    negatives (colour swap, object dropped, shape changed, colour changed), and each kind alone."""
    rng = np.random.default_rng(seed)
    wins, kinds = [], {"swap": [], "drop": [], "shape": [], "colour": []}
    model.eval()
    for item in shapes.benchmark_prompts(n, seed):
        keys = [tuple(k) for k in item["objects"]]
        scene = shapes.sample_scene(rng, keys=keys)
        image = torch.from_numpy(shapes.render(scene, size)).permute(2, 0, 1)[None].float() / 127.5 - 1
        template = shapes.TEMPLATES[2][rng.integers(len(shapes.TEMPLATES[2]))]
        a, b = keys
        cands = {"true": _fmt(keys, template),
                 "swap": _fmt([(b[0], a[1]), (a[0], b[1])], template),
                 "drop": shapes.caption_for([keys[rng.integers(2)]], rng),
                 "shape": _fmt([(a[0], next(s for s in shapes.SHAPES if s not in (a[1], b[1]))), b], template),
                 "colour": _fmt([a, (next(c for c in shapes.COLOURS if c not in (a[0], b[0])), b[1])], template)}
        sims = (model.encode_image(image) @ model.encode_text(tok(list(cands.values()))).T)[0]
        wins.append(bool((sims[0] > sims[1:]).all()))
        for m, k in enumerate(list(cands)[1:], 1):
            kinds[k].append(bool(sims[0] > sims[m]))
    model.train()
    return {"all": float(np.mean(wins)), **{k: float(np.mean(v)) for k, v in kinds.items()}}
