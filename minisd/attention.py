"""Attention: the one attention class, the spatial transformer around it, and the side door (hooks).

Every attention layer knows its name (its checkpoint path, e.g.
`model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2`) and, at each call, the height and width of
the image-shaped map its queries come from. When no hook wants a layer it takes the fast path
(`scaled_dot_product_attention`). When a hook wants it, it takes the explicit path: logits in float32, softmax in
float32, then `probs @ v`, and the hooks see (and may change) the logits and the probabilities on the way.

SD 3's joint attention (minisd/mmdit.py) takes the same side door in O(image x text) memory: hooked_joint_attention.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class AttentionHook:
    """Base of attention observers and editors.

    The pipeline calls `begin_step` before each UNet call; `cond` says which rows of the batch are the
    conditional half under classifier-free guidance (editors must leave the other rows alone).
    Tensors given to the hooks are float32 (at least) and shaped (batch, heads, queries, keys).

    SD 3's joint attention (`layer.joint`) runs one softmax over [text keys, image keys] for text and image queries
    alike. A hook sees only the image queries' rows there (the text queries' rows are never hooked), in one of two
    views:
    - by default, as a UNet's cross-attention map: the image-query x text-key logits, and probabilities renormalised
      over the text keys; the probabilities a hook returns are scaled back by each row's share of text, so the
      share the image keys take stays as it was. A hook written for the UNet reads what it expects.
    - with `understands_joint = True`, the joint rows themselves: keys are [text keys, one column standing for all
      the image keys], whose logit is the log-sum-exp of the image keys' logits and whose probability is their
      total. So the text columns hold the joint softmax's own probabilities, each row's normaliser runs over every
      key, and an edit of the last column is an edit of every image key alike. `cross_block` cuts the text columns.
    The (text + image)^2 square is never made.
    """
    step = 0
    cond = slice(None)
    understands_joint = False

    def begin_step(self, step, cond=slice(None)):
        self.step, self.cond = step, cond

    def wants(self, layer):
        """Whether `layer` must take the explicit path at this call."""
        return False

    def edit_logits(self, layer, logits):
        """Change the pre-softmax logits; return the tensor to take the softmax of."""
        return logits

    def edit_probs(self, layer, logits, probs):
        """See the probabilities (softmax of the edited logits) and return those to multiply V with.
        `logits` are the unedited ones."""
        return probs


class Attention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.name = ""          # set by StableDiffusion: the checkpoint path of this module
        self.hooks = []         # shared list, set by StableDiffusion.set_hooks
        self.hw = None          # (h, w) of the query map at the current call

    def forward(self, x, context=None, hw=None):
        self.hw = hw
        context = x if context is None else context
        b, n, _ = x.shape
        # (b, n, heads*d) -> (b, heads, n, d)
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = self.attend(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))

    def attend(self, q, k, v):
        """softmax(q k^T * scale) v, (b, heads, n, d) each; the hooks' side door. minisd/fast.py routes this call
        around torch.compile, so the hooks' Python state never becomes part of a compiled graph."""
        return hooked_attention(self, q, k, v)


def at_least_float32(t):
    """Logits and softmax in float32 whatever the model's dtype; float64 stays float64 (the exactness tests')."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def hooked_attention(layer, q, k, v):
    """softmax(q k^T * layer.scale) v for any layer with `hooks`: SDPA unless a hook wants the layer, else the
    explicit path in float32 with the hooks' edits."""
    active = [h for h in layer.hooks if h.wants(layer)]
    if not active:
        return F.scaled_dot_product_attention(q, k, v)
    logits = (at_least_float32(q) @ at_least_float32(k).transpose(-1, -2)) * layer.scale
    edited = logits
    for h in active:
        edited = h.edit_logits(layer, edited)
    probs = edited.softmax(-1)
    for h in active:
        probs = h.edit_probs(layer, logits, probs)
    return probs.to(v.dtype) @ v


def hooked_joint_attention(layer, q, k, v):
    """Joint attention over [text, image] queries and keys (layer.text_keys: the text's), SDPA unless a hook wants
    the layer. Then the text queries' rows go through SDPA untouched, and each image query's softmax over all keys is
    computed in two parts merged by their log-sum-exps (the split-key merge of FlashAttention): the text keys'
    logits explicitly in float32, where the hooks see them (AttentionHook), and the image keys folded into one
    column (fold_keys) whose logit is their log-sum-exp and whose value is their own attention's output. Memory
    grows as image tokens x (text tokens + a chunk of rows), not as (text + image)^2."""
    active = [h for h in layer.hooks if h.wants(layer)]
    if not active:
        return F.scaled_dot_product_attention(q, k, v)
    text, image = layer.text_keys, slice(layer.text_keys.stop, None)
    text_rows = F.scaled_dot_product_attention(q[:, :, text], k, v)
    qi = at_least_float32(q[:, :, image])
    image_lse, image_out = fold_keys(qi, at_least_float32(k[:, :, image]), v[:, :, image], layer.scale)
    # (b, heads, image tokens, text tokens + 1): the last column stands for every image key
    logits = torch.cat([(qi @ at_least_float32(k[:, :, text]).transpose(-1, -2)).mul_(layer.scale), image_lse], -1)
    edited = logits
    for h in active:
        if h.understands_joint:
            edited = h.edit_logits(layer, edited)
        else:
            edited = torch.cat([h.edit_logits(layer, edited[..., :-1]), edited[..., -1:]], -1)
    probs = edited.softmax(-1)
    del edited   # at the peak: the logits, the probabilities and a hook's edited copy of them
    for h in active:
        if h.understands_joint:
            probs = h.edit_probs(layer, logits, probs)
        else:
            share = probs[..., :-1].sum(-1, keepdim=True)
            shown = h.edit_probs(layer, logits[..., :-1], probs[..., :-1] / share)
            probs = torch.cat([shown * share, probs[..., -1:]], -1)
    probs = probs.to(v.dtype)
    image_rows = probs[..., :-1] @ v[:, :, text] + probs[..., -1:] * image_out
    return torch.cat([text_rows, image_rows], 2)


FOLD_CHUNK = 1 << 23   # logits per chunk of fold_keys: 32 MB in float32


def fold_keys(q, k, v, scale):
    """Each query's attention over these keys alone, folded to what a merge with other keys needs: the log-sum-exp
    of its logits (..., queries, 1) and its output normalised over these keys (..., queries, d). Computed in chunks
    of query rows, at most FOLD_CHUNK logits at a time, written into tensors made beforehand (chunks kept in a list
    fragment the CPU heap, which then grows by a chunk's temporaries at each chunk); under autograd each chunk is
    recomputed in the backward pass instead of kept, so the gradient needs no more memory."""
    rows = max(1, FOLD_CHUNK // (k.shape[-2] * q.shape[:-2].numel()))

    def chunk(qc):
        s = (qc @ k.transpose(-1, -2)) * scale
        lse = s.logsumexp(-1, keepdim=True)
        return lse, (s - lse).exp().to(v.dtype) @ v

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    lse, out = q.new_empty(*q.shape[:-1], 1), v.new_empty(*q.shape[:-1], v.shape[-1])
    for start in range(0, q.shape[-2], rows):
        qc = q[..., start:start + rows, :]
        lse[..., start:start + rows, :], out[..., start:start + rows, :] = \
            checkpoint(chunk, qc, use_reentrant=False) if grad else chunk(qc)
    return lse, out


def cross_block(layer, t):
    """The part of a hook's (batch, heads, queries, keys) tensor that is a cross-attention map, image queries x text
    keys: all of a UNet cross-attention layer's; the text columns of a joint layer's rows (AttentionHook)."""
    if getattr(layer, "joint", False):
        return t[..., layer.text_keys]
    return t


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head)          # self-attention over the image
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head)   # cross-attention to the text
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, hw):
        x = self.attn1(self.norm1(x), hw=hw) + x
        x = self.attn2(self.norm2(x), context, hw=hw) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Image features -> tokens -> transformer blocks -> image features, with a residual around it all.
    SD 1.x projects in and out with 1x1 convolutions, SD 2.x with Linear layers."""

    def __init__(self, channels, heads, dim_head, depth, context_dim, use_linear, groups=32):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # (b, c, h, w) -> (b, h*w, c)
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context, (h, w))
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            y = self.proj_out(y)
        return x + y
