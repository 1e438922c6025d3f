"""Cross-attention maps you can see: an observer on the attention hook, and a PNG grid that overlays each word's
map on the image. Works with or without an editor: the observer sees the probabilities after any edit."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .attention import AttentionHook


def block_of(name):
    """`model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2` -> `input_blocks.7`."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in ("input_blocks", "output_blocks"):
            return f"{p}.{parts[i + 1]}"
        if p == "middle_block":
            return p
    return name


class AttentionMaps(AttentionHook):
    """Records, at the chosen steps, the cross-attention of the chosen token positions (conditional rows only),
    averaged over heads and over the chosen layers. `maps[step]` is (images, positions, h, w), summed over layers
    as they come and divided at the end of the step, so nothing per layer is kept."""

    def __init__(self, positions, steps, blocks):
        self.positions, self.steps, self.blocks = list(positions), set(steps), set(blocks)
        self.maps, self._count = {}, {}

    def wants(self, layer):
        # passes with gradient are an editor's own (Attend-and-Excite's conditional pass), not the sampling step
        return (layer.is_cross and self.step in self.steps and block_of(layer.name) in self.blocks
                and not torch.is_grad_enabled())

    def edit_probs(self, layer, logits, probs):
        h, w = layer.hw
        p = probs[self.cond][..., self.positions].mean(dim=1)  # (b, heads, hw, k) -> (b, hw, k)
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


def _heat(m, size):
    m = (m - m.min()) / (m.max() - m.min() + 1e-8)
    m = np.asarray(Image.fromarray((m.numpy() * 255).astype(np.uint8)).resize(size, Image.BILINEAR)) / 255.0
    # a small colour ramp: dark blue -> red -> yellow
    return np.stack([np.clip(2 * m, 0, 1), np.clip(2 * m - 1, 0, 1), np.clip(1 - 2 * m, 0, 1) * 0.6], -1)


def grid(image, runs, words, cell=128):
    """A PNG-ready grid for one image. `runs` = [(title, image, {step: (words, h, w)})] (e.g. plain and
    regulated side by side); rows are steps, each run adds its image column plus one column per word."""
    steps = sorted(set().union(*[set(m) for _, _, m in runs]))
    cols = sum(1 + len(words) for _ in runs)
    pad, head = 4, 18
    W, H = cols * (cell + pad) + pad, head + (len(steps) or 1) * (cell + head) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    x0 = pad
    for title, img, maps in runs:
        base = img.convert("RGB").resize((cell, cell))
        draw.text((x0, 2), title, fill="black")
        for r, step in enumerate(steps):
            y = head + r * (cell + head)
            canvas.paste(base, (x0, y + head))
            draw.text((x0, y + 2), f"step {step}", fill="black")
            for c, word in enumerate(words):
                x = x0 + (c + 1) * (cell + pad)
                draw.text((x, y + 2), word, fill="black")
                if step in maps:
                    over = 0.45 * np.asarray(base) / 255.0 + 0.55 * _heat(maps[step][c], (cell, cell))
                    canvas.paste(Image.fromarray((over * 255).astype(np.uint8)), (x, y + head))
        x0 += (1 + len(words)) * (cell + pad)
    return canvas
