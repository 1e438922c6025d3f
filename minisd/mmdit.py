"""The MMDiT of Stable Diffusion 3 and 3.5 (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis", ICML 2024; SD 3.5 Medium's MMDiT-X). Module names equal the keys under `model.diffusion_model.`
in the official single files, so `joint_blocks.3.x_block.attn.qkv.weight` is the module path and the key alike.

The image is cut into 2 x 2 latent patches (x_embedder), each given the learned position of its place in a
max x max table cropped to the image's centre (pos_embed). The text (context: CLIP and T5 states, 4096 wide) is
projected to the model's width (context_embedder). Each joint block keeps two streams, the image's (x_block) and
the text's (context_block), each with its own weights and its own adaLN-Zero modulation from the conditioning
vector c = embedded timestep + embedded pooled text (t_embedder, y_embedder). The two streams meet in one
attention: their queries, keys and values are concatenated (text first, as Stability's reference does) and one
softmax runs over all keys, so an image token reads text and image alike and a text token reads both too. The last
block's text stream is "pre only": it only contributes keys and values. SD 3.5 Medium's first blocks add an
image-only attention (x_block.attn2) beside the joint one. A final adaLN layer and a linear map give each patch's
velocity, put back into the latent's shape (unpatchify).

The joint attention takes the hook side door of minisd/attention.py (hooked_joint_attention): a hook sees the image
queries' rows, as a UNet cross-attention map or, if it says it understands joint attention, with the image keys
folded into one column (AttentionHook); the (text + image)^2 square is never made.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import hooked_joint_attention
from .unet import timestep_embedding


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """Per-head RMSNorm of q and k (SD 3.5), computed in float32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)


class QKVProjection(nn.Module):
    """One stream's side of an attention: the fused q, k, v projection (`qkv`), the optional per-head norm of q and
    k (`ln_q`, `ln_k`) and the output projection (`proj`). The attention itself runs across both streams, in
    JointAttention (Stability's reference calls this class SelfAttention)."""

    def __init__(self, dim, heads, pre_only=False, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        if qk_norm:
            self.ln_q, self.ln_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        else:
            self.ln_q = self.ln_k = None

    def split(self, x):
        """(b, n, dim) -> q, k, v each (b, heads, n, dim // heads), q and k normed."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Modulation(NamedTuple):
    """adaLN-Zero's vectors for one stream, (b, dim) each, in the order `adaLN_modulation` makes them: shift, scale
    and gate of the attention's input and output (msa), of the MLP (mlp), and of attn2 where the block has one
    (msa2). A pre-only stream makes the first two alone: it has no attention output and no MLP."""
    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor = None
    shift_mlp: torch.Tensor = None
    scale_mlp: torch.Tensor = None
    gate_mlp: torch.Tensor = None
    shift_msa2: torch.Tensor = None
    scale_msa2: torch.Tensor = None
    gate_msa2: torch.Tensor = None

    @staticmethod
    def count(pre_only, with_attn2):
        return 2 if pre_only else 9 if with_attn2 else 6


class StreamBlock(nn.Module):
    """One stream's half of a joint block (Stability's DismantledBlock): its adaLN-Zero modulation, its attention
    projections (attn, and attn2 where it has one) and its MLP. `pre_attention` gives the q, k, v this stream adds
    to the joint attention; `post_attention` takes its share of the result back."""

    def __init__(self, dim, heads, mlp_ratio, pre_only=False, qk_norm=False, with_attn2=False):
        super().__init__()
        self.pre_only, self.with_attn2 = pre_only, with_attn2
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = QKVProjection(dim, heads, pre_only, qk_norm)
        if with_attn2:
            self.attn2 = QKVProjection(dim, heads, False, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.n_modulations = Modulation.count(pre_only, with_attn2)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_modulations * dim))

    def pre_attention(self, x, c):
        """-> (q, k, v) for the joint attention, (q, k, v) for attn2 or None, and the Modulation."""
        mod = Modulation(*self.adaLN_modulation(c).chunk(self.n_modulations, dim=1))
        h = self.norm1(x)
        qkv = self.attn.split(modulate(h, mod.shift_msa, mod.scale_msa))
        qkv2 = self.attn2.split(modulate(h, mod.shift_msa2, mod.scale_msa2)) if self.with_attn2 else None
        return qkv, qkv2, mod

    def post_attention(self, x, out, out2, mod):
        """out: this stream's rows of the joint attention's output, (b, n, dim); out2: attn2's or None."""
        x = x + mod.gate_msa.unsqueeze(1) * self.attn.proj(out)
        if out2 is not None:
            x = x + mod.gate_msa2.unsqueeze(1) * self.attn2.proj(out2)
        return x + mod.gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), mod.shift_mlp, mod.scale_mlp))


class JointAttention(nn.Module):
    """The attention of a joint block (no weights) and its hook side door. Queries and keys are [text tokens, image
    tokens]: `text_keys` says where the text is. A hook that does not say it understands joint attention sees it as
    a UNet's cross-attention layer (AttentionHook in minisd/attention.py)."""
    is_cross = True   # it reads the text: observers and editors of cross-attention look here
    joint = True

    def __init__(self, dim_head):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.name = ""          # set by StableDiffusion3: `model.diffusion_model.joint_blocks.N`
        self.hooks = []
        self.hw = None          # (h, w) of the image tokens' patch grid at the current call
        self.text_keys = None   # slice(0, text tokens) at the current call

    def forward(self, q, k, v, n_text, hw):
        self.hw, self.text_keys = hw, slice(0, n_text)
        return hooked_joint_attention(self, q, k, v)


def heads_to_width(t):
    """(b, heads, n, d) -> (b, n, heads * d)."""
    return t.transpose(1, 2).flatten(2)


class JointBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, pre_only, qk_norm, with_attn2):
        super().__init__()
        self.context_block = StreamBlock(dim, heads, mlp_ratio, pre_only, qk_norm)
        self.x_block = StreamBlock(dim, heads, mlp_ratio, False, qk_norm, with_attn2)
        self.joint = JointAttention(dim // heads)

    def forward(self, context, x, c, hw):
        (cq, ck, cv), _, context_mod = self.context_block.pre_attention(context, c)
        (xq, xk, xv), qkv2, x_mod = self.x_block.pre_attention(x, c)
        n_text = context.shape[1]
        # text first, as Stability's reference concatenates
        out = self.joint(torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2), n_text, hw)
        text_out, image_out = heads_to_width(out).split([n_text, x.shape[1]], dim=1)
        # SD 3.5 Medium's image-only attention: no hooks (it never reads the text)
        out2 = None if qkv2 is None else heads_to_width(F.scaled_dot_product_attention(*qkv2))
        x = self.x_block.post_attention(x, image_out, out2, x_mod)
        if self.context_block.pre_only:   # the last block: the text only lent its keys and values
            return None, x
        return self.context_block.post_attention(context, text_out, None, context_mod), x


class PatchEmbed(nn.Module):
    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Embedder(nn.Module):
    """A two-layer MLP (`mlp.0`, `mlp.2`): the timestep's sinusoids or the pooled text -> the model's width."""

    def __init__(self, dim_in, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.mlp(x)


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Prepared(NamedTuple):
    """The MMDiT's inputs that do not change between the steps of a run (MMDiT.prepare)."""
    pooled: torch.Tensor    # y_embedder(pooled text), (b, dim): added to the timestep's embedding
    context: torch.Tensor   # context_embedder(text states), (b, tokens, dim): the text stream's input
    pos: torch.Tensor       # the position table cropped to the image, (1, patches, dim)
    size: tuple             # the latent's (H, W) it was cropped for


class MMDiT(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.cfg = m
        dim = m.hidden_size
        self.x_embedder = PatchEmbed(m.in_channels, dim, m.patch_size)
        # a buffer in Stability's code (learned in training, fixed since): the official files store it
        self.register_buffer("pos_embed", torch.zeros(1, m.pos_embed_max_size ** 2, dim))
        self.t_embedder = Embedder(m.frequency_embedding_size, dim)
        self.y_embedder = Embedder(m.adm_in_channels, dim)
        self.context_embedder = nn.Linear(m.context_dim, dim)
        self.joint_blocks = nn.ModuleList([
            JointBlock(dim, m.num_heads, m.mlp_ratio, i == m.depth - 1, m.qk_norm, i in m.x_block_self_attn_layers)
            for i in range(m.depth)])
        self.final_layer = FinalLayer(dim, m.patch_size, m.in_channels)

    def cropped_pos_embed(self, h, w):
        """The centre h x w of the max x max position table (h, w in patches)."""
        big = self.cfg.pos_embed_max_size
        if h > big or w > big:
            raise ValueError(f"the image is {h} x {w} patches; this model's position table has {big} x {big} "
                             f"(at most {big * self.cfg.patch_size * 8} px a side)")
        top, left = (big - h) // 2, (big - w) // 2
        return self.pos_embed.view(1, big, big, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)

    def prepare(self, y, context, size):
        """What stays the same through the steps of one run, for `forward(..., prepared=)`: y, the pooled text, and
        context, the text states, embedded; the position table cropped to a latent of `size` (H, W)."""
        H, W = size
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent sides must be multiples of the patch size {p}, got {H}x{W}")
        dtype = self.context_embedder.weight.dtype
        return Prepared(self.y_embedder(y.to(dtype)), self.context_embedder(context.to(dtype)),
                        self.cropped_pos_embed(H // p, W // p).to(dtype), (H, W))

    def forward(self, x, t, y=None, context=None, prepared=None, skip_layers=()):
        """x: latents (b, 16, H, W); t: timesteps sigma * 1000, (b,) or a number; y: pooled text (b, 2048); context:
        text states (b, tokens, 4096): the arguments of Stability's MMDiTX.forward, in its order. Or, instead of y
        and context, `prepared` (MMDiT.prepare), made once per run. Returns the predicted velocity (noise - clean
        latent), shaped like x."""
        b, _, H, W = x.shape
        if prepared is None:
            prepared = self.prepare(y, context, (H, W))
        elif prepared.size != (H, W):
            raise ValueError(f"prepared for a {prepared.size[0]}x{prepared.size[1]} latent, given one of {H}x{W}")
        p = self.cfg.patch_size
        h, w = H // p, W // p
        t = t.to(x.device) if torch.is_tensor(t) else torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        x = self.x_embedder(x) + prepared.pos
        c = self.t_embedder(timestep_embedding(t, self.cfg.frequency_embedding_size).to(x.dtype)) + prepared.pooled
        context = prepared.context
        for i, block in enumerate(self.joint_blocks):
            if i not in skip_layers:   # skip-layer guidance's extra pass: both streams go past these blocks unchanged
                context, x = block(context, x, c, (h, w))
        return unpatchify(self.final_layer(x, c), h, w, p)


def unpatchify(x, h, w, p):
    """(b, h * w, p * p * channels) patch tokens -> (b, channels, h * p, w * p) latents. Token i * w + j holds the
    p x p pixels of patch (i, j), row r and column s of it at latent pixel (i * p + r, j * p + s)."""
    b = x.shape[0]
    x = x.view(b, h, w, p, p, -1)          # (b, i, j, r, s, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)        # (b, channels, i, r, j, s)
    return x.reshape(b, -1, h * p, w * p)  # row i * p + r, column j * p + s
