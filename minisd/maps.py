"""Cross-attention maps you can see: an observer on the attention hook, and a PNG grid that overlays each word's
map on the image. Works with or without an editor: the observer sees the probabilities after any edit."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .attention import AttentionHook, cross_block
from .blocks import block_of


class AttentionMaps(AttentionHook):
    """Records, at the chosen steps, the cross-attention of the chosen token positions (conditional rows only),
    averaged over heads and over the chosen layers. `maps[step]` is (images, positions, h, w), summed over layers
    as they come and divided at the end of the step, so nothing per layer is kept.

    blocks: block names (`input_blocks.7`, ...), or a function layer -> bool such as an editor's `select`, so that
    the maps come from exactly the layers an editor regulates. `blocks_seen` says which blocks were observed.
    On SD 3's joint attention the maps are the joint softmax's own probabilities of the text keys."""
    understands_joint = True

    def __init__(self, positions, steps, blocks):
        self.positions, self.steps = list(positions), set(steps)
        self.select = blocks if callable(blocks) else (lambda layer, names=set(blocks): block_of(layer.name) in names)
        self.maps, self._count, self.layers_seen = {}, {}, set()

    @property
    def blocks_seen(self):
        return {block_of(name) for name in self.layers_seen}

    def wants(self, layer):
        # passes with gradient are an editor's own (Attend-and-Excite's conditional pass), not the sampling step
        return (layer.is_cross and self.step in self.steps and not torch.is_grad_enabled() and self.select(layer))

    def edit_probs(self, layer, logits, probs):
        h, w = layer.hw
        self.layers_seen.add(layer.name)
        # SD 3: the text columns of the joint rows; positions are text-key indices
        p = cross_block(layer, probs)[self.cond][..., self.positions].mean(dim=1)  # (b, heads, hw, k) -> (b, hw, k)
        m = p.transpose(1, 2).reshape(p.shape[0], len(self.positions), h, w).detach().float().cpu()
        if self.step in self.maps and self.maps[self.step].shape[-2:] != m.shape[-2:]:
            m = F.interpolate(m, size=self.maps[self.step].shape[-2:], mode="bilinear", align_corners=False)
        self.maps[self.step] = self.maps.get(self.step, 0) + m
        self._count[self.step] = self._count.get(self.step, 0) + 1
        return probs

    def result(self):
        """{step: (images, positions, h, w)} averaged over the layers seen."""
        return {s: m / self._count[s] for s, m in sorted(self.maps.items())}


def word_maps(maps, groups):
    """Sum the maps of each word's sub-token positions: groups = [(word, [indices into positions])]."""
    return {s: torch.stack([m[:, idx].sum(1) for _, idx in groups], dim=1) for s, m in maps.items()}


def _ramp(m):
    """[0, 1] -> RGB in [0, 1]: dark blue -> red -> yellow."""
    return np.stack([np.clip(2 * m, 0, 1), np.clip(2 * m - 1, 0, 1), np.clip(1 - 2 * m, 0, 1) * 0.6], -1)


def heat(m, size):
    """A map (h, w) -> RGB in [0, 1] of `size`, scaled to its own min..max."""
    m = (m - m.min()) / (m.max() - m.min() + 1e-8)
    m = np.asarray(Image.fromarray((m.numpy() * 255).astype(np.uint8)).resize(size, Image.BILINEAR)) / 255.0
    return _ramp(m)


def overlay(base, m):
    """The map m (h, w) as heat over the image `base` (PIL, RGB), at the image's size."""
    over = 0.45 * np.asarray(base) / 255.0 + 0.55 * heat(m, base.size)
    return Image.fromarray((over * 255).astype(np.uint8))


def grid(runs, words, cell=128, over=True):
    """A PNG-ready grid for one image. `runs` = [(title, final image, {step: (words, h, w)})] (e.g. plain and
    regulated side by side). Each run is a block of columns: its final image
    (top row only), then one column per word; rows are steps. Each map is overlaid on its run's final image (or
    alone, over=False), scaled to its own min..max (the colour scale at the bottom) and labelled with its largest
    attention."""
    steps = sorted(set().union(*[set(m) for _, _, m in runs]))
    cols = sum(1 + len(words) for _ in runs)
    pad, head, label, scale = 4, 16, 26, 34
    rows = len(steps) or 1
    W, H = cols * (cell + pad) + pad, head + rows * (cell + label) + pad + scale
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    x0 = pad
    for title, img, maps in runs:
        base = img.convert("RGB").resize((cell, cell))
        draw.text((x0, 2), title, fill="black")
        draw.line([(x0, head - 2), (x0 + (1 + len(words)) * (cell + pad) - pad, head - 2)], fill="black")
        draw.text((x0, head + 1), "final image", fill="black")
        canvas.paste(base, (x0, head + label))
        for r, step in enumerate(steps):
            y = head + r * (cell + label)
            if r > 0:   # the row's step, in the image column under the final image (not over an image)
                draw.text((x0 + 2, y + label + cell // 2 - 6), f"step {step} ->", fill="black")
            for c, word in enumerate(words):
                x = x0 + (c + 1) * (cell + pad)
                if step in maps and maps[step] is not None:
                    m = maps[step][c]
                    draw.text((x, y + 1), f"{word}, step {step}\nmax {float(m.max()):.4f}", fill="black")
                    if over:
                        shown = overlay(base, m)
                    else:
                        shown = Image.fromarray((heat(m, base.size) * 255).astype(np.uint8))
                    canvas.paste(shown, (x, y + label))
                else:
                    draw.text((x, y + 1), f"{word}, step {step}", fill="black")
        x0 += (1 + len(words)) * (cell + pad)
    # the colour scale: each map runs from its own minimum (left) to its own maximum (right)
    y, bar_w = H - scale + 4, min(W - 2 * pad, 256)
    ramp = _ramp(np.linspace(0, 1, bar_w))[None].repeat(10, 0)
    canvas.paste(Image.fromarray((ramp * 255).astype(np.uint8)), (pad, y))
    draw.text((pad, y + 12), "map min", fill="black")
    draw.text((pad + bar_w - 42, y + 12), "map max", fill="black")
    return canvas
