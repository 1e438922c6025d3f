"""A straightforward SynGen for the tests: the authors' loss (compute_loss.py and SynGenDiffusionPipeline of
RoyiRa/Linguistic-Binding-in-Diffusion-Models) one image at a time, with plain loops, in their order of operations.

Written from their formulas, not from regulation/syngen.py. Their data layout is kept: a "subtree" is a list whose
items are modifiers then the noun (last), each item a token position (a one-piece word) or a list of positions
(a word of several pieces); the maps are a list of per-token (h, w) maps, the averaged attention times 100; the
distance is torch.distributions' KL between Categorical distributions. Two things differ from their code, as they
do in the module under test: each image's updated latent is kept (theirs keeps the last image's only), and the
cross-attention layers are chosen by a `select(layer)` function (theirs: every layer at the `attn_res` size).
"""
import torch
import torch.distributions as dist

from minisd.attention import AttentionHook


def to_subtrees(pairs):
    """[(per modifier its positions, the noun's positions)] -> their subtrees: [mod, ..., noun], one-piece words
    as ints, words of several pieces as lists."""
    def item(positions):
        return positions[0] if len(positions) == 1 else list(positions)
    return [[item(m) for m in mods] + [item(noun)] for mods, noun in pairs]


def sym_kl(map1, map2):
    """Average of the two KL divergences between the maps, each read as a Categorical over its cells."""
    p = dist.Categorical(probs=map1.reshape(-1))
    q = dist.Categorical(probs=map2.reshape(-1))
    return (dist.kl_divergence(p, q) + dist.kl_divergence(q, p)) / 2


def as_list(x):
    return x if isinstance(x, list) else [x]


def positive_term(maps, modifier, noun):
    """The largest distance over (modifier piece, noun piece) pairs."""
    values = [sym_kl(maps[s], maps[d]) for s in as_list(modifier) for d in as_list(noun)]
    best = values[0]
    for v in values[1:]:
        if v > best:
            best = v
    return best


def outside_terms(maps, src, outside):
    """Per outside position, the largest distance from a piece of src."""
    terms = []
    for o in outside:
        values = [sym_kl(maps[t], maps[o]) for t in as_list(src)]
        best = values[0]
        for v in values[1:]:
            if v > best:
                best = v
        terms.append(best)
    return terms


def negative_term(maps, modifier, noun, subtree, prompt_positions):
    flat = []
    for item in subtree:
        flat.extend(as_list(item))
    outside = [p for p in prompt_positions if p not in flat]
    noun_part = -sum(outside_terms(maps, noun, outside)) / len(outside) if outside else 0
    if not modifier:
        return noun_part
    modifier_part = -sum(outside_terms(maps, modifier, outside)) / len(outside) if outside else 0
    return (modifier_part + noun_part) / 2


def reference_loss(attention, subtrees, eot):
    """One image's loss. attention: (h, w, L) averaged over heads and layers; eot: the end-of-text position."""
    maps = attention * 100
    maps = [maps[:, :, i] for i in range(maps.shape[2])]
    prompt_positions = list(range(1, eot))
    loss = 0
    for subtree in subtrees:
        noun, modifiers = subtree[-1], subtree[:-1]
        if not modifiers:
            loss += negative_term(maps, [], noun, subtree, prompt_positions)
            continue
        positives, negatives = [], []
        for modifier in modifiers:
            positives.append(positive_term(maps, modifier, noun))
            negatives.append(negative_term(maps, modifier, noun, subtree, prompt_positions))
        loss += sum(positives)
        loss += sum(negatives)
    return loss


class ReferenceSynGen(AttentionHook):
    """SynGen as their pipeline runs it: at each step i < max_iter_to_alter, image by image, a conditional pass
    (unet_one(latent, t): one image, one row of text), the maps of every selected cross-attention layer stored
    (diffusers' AttentionStore: all heads of all layers, then the mean), the loss, and, if it is not 0,
    latent - step_size * grad. Put it in the pipeline's hooks: it collects from its own passes only."""

    def __init__(self, unet_one, pairs, eot, select, step_size=20.0, max_iter_to_alter=25):
        self.unet_one, self.subtrees, self.eot, self.select = unet_one, to_subtrees(pairs), eot, select
        self.step_size, self.max_iter_to_alter = step_size, max_iter_to_alter
        self.store, self.losses = None, {}

    def wants(self, layer):
        return self.store is not None and layer.is_cross and self.select(layer)

    def edit_probs(self, layer, logits, probs):
        h, w = layer.hw
        self.layers.append(layer.name)
        for head in probs[0]:          # batch of one
            self.store.append(head.reshape(h, w, -1))
        return probs

    def aggregate(self, latent, t):
        self.store, self.layers = [], []
        try:
            self.unet_one(latent, t)
        finally:
            stored, self.store = self.store, None
        total = stored[0]
        for m in stored[1:]:
            total = total + m
        return total / len(stored)

    def edit_latents(self, x, t, i, cond_unet):
        if i >= self.max_iter_to_alter:
            return x
        updated, losses = [], []
        with torch.enable_grad():
            for r in range(x.shape[0]):
                latent = x[r:r + 1].detach().clone().requires_grad_(True)
                loss = reference_loss(self.aggregate(latent, t), self.subtrees, self.eot)
                if loss != 0:
                    grad = torch.autograd.grad(loss, [latent])[0]
                    latent = latent - self.step_size * grad
                updated.append(latent.detach())
                losses.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))
        self.losses[i] = losses
        return torch.cat(updated)
