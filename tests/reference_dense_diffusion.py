"""A straightforward DenseDiffusion for the tests, in the order of operations of the authors' code
(github.com/naver-ai/DenseDiffusion: `mod_forward` and the "prep for sreg / creg" cells of inference.ipynb and
gradio_app.py), one layer at a time, one head at a time.

Written from the paper's formulas and that code, not from regulation/dense_diffusion.py. As in the authors' code:
  - the step is counted from attention calls: call number COUNT belongs to step COUNT // (attention layers per UNet
    call), and is modulated while COUNT / layers < num_steps * reg_part (minisd asks `wants` exactly once per
    attention call, so that is where the reference counts);
  - masks are binarised at 0.5, resized by nearest neighbour to the latent size, then to each layer's size;
  - the self-attention map is the sum over regions of the outer product of each region's mask with itself, the
    size term 1 - sizereg * (its row sums) / (queries), shared by self- and cross-attention;
  - the second half of the (heads in the batch) rows is modulated, in place, first the raise then the lowering,
    with the row's max and min taken before either.
"""
import torch
import torch.nn.functional as F

from minisd.attention import AttentionHook


def reference_resize(mask, hw, latent_hw=None):
    """The authors' preprocess_mask (binarise at 0.5, nearest to the latent size), then nearest to the layer's
    size. Without latent_hw, straight to the layer's size."""
    m = mask.float().clone()[None, None]
    m[m < 0.5] = 0
    m[m >= 0.5] = 1
    if latent_hw is not None:
        m = F.interpolate(m, size=tuple(latent_hw), mode="nearest")
    return F.interpolate(m, size=tuple(hw), mode="nearest")[0, 0]


def with_background(masks, positions):
    """The demo's layout: its canvas's white area, the pixels no phrase's segment painted, is a segment of its own
    whose prompt is empty (no tokens), listed first as the demo lists it. Nothing is added where every pixel is
    painted."""
    painted = torch.zeros_like(masks[0], dtype=torch.float32)
    for m in masks:
        painted = torch.maximum(painted, (m >= 0.5).float())
    if painted.min() == 1:
        return list(masks), list(positions)
    return [1 - painted, *masks], [[], *positions]


def reference_maps(masks, positions, hw, sizereg=1.0, num_tokens=77, latent_hw=None):
    """For an (h, w) layer: (sreg_map (q, q), creg_map (q, num_tokens), reg_size (q, 1))."""
    h, w = hw
    layouts = [reference_resize(m, hw, latent_hw).reshape(-1) for m in masks]
    q = h * w
    sreg_map = torch.zeros(q, q)
    for m in layouts:
        sreg_map = sreg_map + m.view(1, -1) * m.view(-1, 1)
    reg_size = 1 - sizereg * sreg_map.sum(-1, keepdim=True) / q
    pww = torch.zeros(num_tokens, q)
    for pos, m in zip(positions, layouts):
        for p in pos:
            pww[p] = m
    return sreg_map, pww.permute(1, 0), reg_size


def reference_modulate(sim, mask, size_reg, strength, treg, rows=None):
    """sim: (batch * heads, q, k) logits, already scaled. Modulates rows (default: the second half), one at a time."""
    sim = sim.clone()
    rows = range(int(sim.size(0) / 2), sim.size(0)) if rows is None else rows
    for r in rows:
        row = sim[r]
        max_value = row.max(-1)[0].unsqueeze(-1)
        min_value = row.min(-1)[0].unsqueeze(-1)
        row += (mask > 0) * size_reg * strength * treg * (max_value - row)
        row -= ~(mask > 0) * size_reg * strength * treg * (row - min_value)
    return sim


def reference_treg(t, power=5.0):
    """The authors' time weight: torch.pow(timesteps[step] / 1000, 5), in float32."""
    return torch.pow(torch.tensor(float(t)) / 1000, power)


class ReferenceDense(AttentionHook):
    """The authors' mod_forward as a minisd hook: counts attention calls, modulates every attention layer during
    the first steps, the second half of the batch."""

    def __init__(self, masks, positions, timesteps, layers_per_call, num_steps, creg=1.0, sreg=0.3, sizereg=1.0,
                 reg_part=0.3, latent_hw=None, rows=None):
        self.masks, self.positions, self.timesteps = masks, positions, list(timesteps)
        self.layers_per_call, self.num_steps = layers_per_call, num_steps
        self.creg, self.sreg, self.sizereg, self.reg_part = creg, sreg, sizereg, reg_part
        self.latent_hw, self.rows = latent_hw, rows
        self.count = 0
        self.modulated = []

    def wants(self, layer):
        self.current = self.count
        self.count += 1
        return self.current / self.layers_per_call < self.num_steps * self.reg_part

    def edit_logits(self, layer, logits):
        b, heads, q, k = logits.shape
        sim = logits.reshape(b * heads, q, k)     # diffusers' head_to_batch_dim: row = image * heads + head
        treg = reference_treg(self.timesteps[self.current // self.layers_per_call])
        sreg_map, creg_map, reg_size = reference_maps(self.masks, self.positions, layer.hw, self.sizereg,
                                                      num_tokens=k if layer.is_cross else 77,
                                                      latent_hw=self.latent_hw)
        if layer.is_cross:
            sim = reference_modulate(sim, creg_map, reg_size, self.creg, treg, self.rows)
        else:
            sim = reference_modulate(sim, sreg_map, reg_size, self.sreg, treg, self.rows)
        self.modulated.append(layer.name)
        return sim.reshape(b, heads, q, k)
