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

The joint attention takes the hook side door of minisd/attention.py: a hook sees the joint logits and probabilities
(float32, shaped (batch, heads, text + image, text + image)); `cross_block` cuts out the image-to-text block.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import hooked_attention
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


class SelfAttention(nn.Module):
    """The q, k, v projection of one stream (fused, `qkv`), its optional qk norm, and its output projection."""

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


class DismantledBlock(nn.Module):
    """One stream of a joint block: adaLN-Zero modulation (shift, scale, gate for the attention and for the MLP;
    a second shift, scale, gate for attn2 where there is one; shift and scale only when pre only), the attention's
    projections and the MLP. The attention itself runs in JointBlock, across both streams."""

    def __init__(self, dim, heads, mlp_ratio, pre_only=False, qk_norm=False, self_attn=False):
        super().__init__()
        self.pre_only, self.self_attn = pre_only, self_attn
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, pre_only, qk_norm)
        if self_attn:
            self.attn2 = SelfAttention(dim, heads, False, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mods = 2 if pre_only else 9 if self_attn else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, mods * dim))

    def pre_attention(self, x, c):
        """-> (q, k, v) of the joint attention, (q, k, v) of attn2 or None, and what post_attention needs."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 9 if self.self_attn else 6, dim=1)
        h = self.norm1(x)
        qkv = self.attn.split(modulate(h, mods[0], mods[1]))
        qkv2 = self.attn2.split(modulate(h, mods[6], mods[7])) if self.self_attn else None
        return qkv, qkv2, mods

    def post_attention(self, x, out, out2, mods):
        _, _, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate.unsqueeze(1) * self.attn.proj(out)
        if out2 is not None:
            x = x + mods[8].unsqueeze(1) * self.attn2.proj(out2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointAttention(nn.Module):
    """The hook side door of a joint block (no weights). Keys and queries are [text tokens, image tokens]: for a
    hook, `text_keys` and `image_queries` say where each part is, and `cross_block` (attention.py) cuts the
    image-to-text block that plays the part of a UNet's cross-attention map."""
    is_cross = True   # it reads the text: observers and editors of cross-attention look here
    joint = True

    def __init__(self, heads, dim_head):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.name = ""          # set by StableDiffusion3: `model.diffusion_model.joint_blocks.N`
        self.hooks = []
        self.hw = None          # (h, w) of the image tokens' patch grid at the current call
        self.text_keys = self.image_queries = None

    def forward(self, q, k, v, n_text, hw):
        self.hw, self.text_keys, self.image_queries = hw, slice(0, n_text), slice(n_text, None)
        return hooked_attention(self, q, k, v)


class JointBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, pre_only, qk_norm, self_attn):
        super().__init__()
        self.context_block = DismantledBlock(dim, heads, mlp_ratio, pre_only, qk_norm)
        self.x_block = DismantledBlock(dim, heads, mlp_ratio, False, qk_norm, self_attn)
        self.joint = JointAttention(heads, dim // heads)

    def forward(self, context, x, c, hw):
        (cq, ck, cv), _, cmods = self.context_block.pre_attention(context, c)
        (xq, xk, xv), qkv2, xmods = self.x_block.pre_attention(x, c)
        n = context.shape[1]
        out = self.joint(torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2), n, hw)
        out = out.transpose(1, 2).flatten(2)  # (b, heads, n, d) -> (b, n, heads * d)
        out2 = None
        if qkv2 is not None:  # SD 3.5 Medium: image-only attention, no hooks (it never reads the text)
            out2 = F.scaled_dot_product_attention(*qkv2).transpose(1, 2).flatten(2)
        context = None if self.context_block.pre_only else \
            self.context_block.post_attention(context, out[:, :n], None, cmods)
        return context, self.x_block.post_attention(x, out[:, n:], out2, xmods)


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

    def forward(self, x, t, context, y, skip_layers=()):
        """x: latents (b, 16, H, W); t: timesteps sigma * 1000, (b,) or a number; context: (b, tokens, 4096);
        y: pooled text (b, 2048). Returns the predicted velocity (noise - clean latent), shaped like x."""
        b, _, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent sides must be multiples of the patch size {p}, got {H}x{W}")
        h, w = H // p, W // p
        t = t.to(x.device) if torch.is_tensor(t) else torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        x = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)
        c = self.t_embedder(timestep_embedding(t, self.cfg.frequency_embedding_size).to(x.dtype))
        c = c + self.y_embedder(y.to(x.dtype))
        context = self.context_embedder(context.to(x.dtype))
        for i, block in enumerate(self.joint_blocks):
            if i not in skip_layers:   # skip-layer guidance's extra pass: both streams go past these blocks unchanged
                context, x = block(context, x, c, (h, w))
        x = self.final_layer(x, c)  # (b, h * w, p * p * channels)
        x = x.view(b, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, -1, H, W)
