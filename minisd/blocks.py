"""The UNet's block numbering, in one place: official checkpoint names, diffusers' names, and the levels.

The official checkpoints (and minisd's modules, unet.py) number the UNet's blocks in one run per path. With
nrb = num_res_blocks and L levels (level 0 = the full latent resolution):
  input_blocks.0                       the first convolution
  input_blocks.{1 + d*(nrb+1) + j}     level d, ResBlock j (+ its spatial transformer, module 1), j < nrb
  input_blocks.{(d+1)*(nrb+1)}         level d's downsampler, d < L - 1
  middle_block                         ResBlock, transformer, ResBlock at the deepest level
  output_blocks.{u*(nrb+1) + j}        going up, u = L - 1 - d: level d, ResBlock j (+ transformer), j <= nrb
diffusers counts the same blocks per level: down_blocks.d.{resnets,attentions}.j, up_blocks.u.{...}.j, mid_block.
"""
import re

PREFIX = "model.diffusion_model."


def input_block(unet, d, j):
    return 1 + d * (unet.num_res_blocks + 1) + j


def output_block(unet, d, j):
    """Output block j of level d (up_blocks are counted from the deepest level)."""
    return (len(unet.channel_mult) - 1 - d) * (unet.num_res_blocks + 1) + j


def attention_levels(unet):
    """The UNet levels d (0 = full latent resolution) that hold a spatial transformer."""
    levels = [d for d in range(len(unet.channel_mult)) if 2 ** d in unet.attention_resolutions]
    if not levels:
        raise ValueError("this UNet has no attention level")
    return levels


def level_blocks(unet, d):
    """The input and output blocks of UNet level d."""
    nrb = unet.num_res_blocks
    return tuple([f"input_blocks.{input_block(unet, d, j)}" for j in range(nrb)] +
                 [f"output_blocks.{output_block(unet, d, j)}" for j in range(nrb + 1)])


def attention_blocks(unet):
    """{checkpoint block name: UNet level} for every block that holds a spatial transformer."""
    blocks = {name: d for d in attention_levels(unet) for name in level_blocks(unet, d)}
    blocks["middle_block"] = len(unet.channel_mult) - 1
    return blocks


def block_of(name):
    """`model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2` -> `input_blocks.7`."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in ("input_blocks", "output_blocks"):
            return f"{p}.{parts[i + 1]}"
        if p == "middle_block":
            return p
    return name


def split_block(path):
    """`input_blocks.7.1.transformer_blocks.0.attn2` -> (`input_blocks.7`, [`1`, `transformer_blocks`, ...]);
    (None, []) when the path is not inside a UNet block."""
    parts = path.split(".")
    if parts[0] == "middle_block":
        return "middle_block", parts[1:]
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2]), parts[2:]
    return None, []


def diffusers_to_checkpoint(spec, unet):
    """`down_blocks.i[.attentions.j]`, `up_blocks.i[.attentions.j]`, `mid_block[.attentions.0]` -> a list of
    checkpoint block names; None when `spec` is not a diffusers name."""
    nrb, levels = unet.num_res_blocks, len(unet.channel_mult)
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)(?:\.attentions\.(\d+))?", spec)
    if m:
        kind, i, j = m.group(1), int(m.group(2)), m.group(3)
        if i >= levels:
            raise ValueError(f"{spec!r}: this UNet has {kind}.0 to {kind}.{levels - 1}")
        count = nrb if kind == "down_blocks" else nrb + 1
        if j is not None and int(j) >= count:
            raise ValueError(f"{spec!r}: {kind}.{i} has attentions.0 to attentions.{count - 1}")
        js = range(count) if j is None else [int(j)]
        if kind == "down_blocks":
            return [f"input_blocks.{input_block(unet, i, jj)}" for jj in js]
        return [f"output_blocks.{output_block(unet, levels - 1 - i, jj)}" for jj in js]
    if re.fullmatch(r"mid_block(?:\.attentions\.0)?", spec):
        return ["middle_block"]
    return None


def unet_renames(unet):
    """(official prefix, diffusers prefix) pairs for a UNet's keys, and the renames inside a ResBlock."""
    nrb, levels = unet.num_res_blocks, len(unet.channel_mult)
    r = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
         ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
         ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
         ("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
         ("middle_block.2.", "mid_block.resnets.1.")]
    for d in range(levels):
        for j in range(nrb):
            n = input_block(unet, d, j)
            r += [(f"input_blocks.{n}.0.", f"down_blocks.{d}.resnets.{j}."),
                  (f"input_blocks.{n}.1.", f"down_blocks.{d}.attentions.{j}.")]
        if d < levels - 1:
            r.append((f"input_blocks.{(d + 1) * (nrb + 1)}.0.op.", f"down_blocks.{d}.downsamplers.0.conv."))
        u = levels - 1 - d   # the level of up_blocks.d: diffusers counts them from the deepest level
        for j in range(nrb + 1):
            n = output_block(unet, u, j)
            r += [(f"output_blocks.{n}.0.", f"up_blocks.{d}.resnets.{j}."),
                  (f"output_blocks.{n}.1.conv.", f"up_blocks.{d}.upsamplers.0.conv."),
                  (f"output_blocks.{n}.2.conv.", f"up_blocks.{d}.upsamplers.0.conv."),
                  (f"output_blocks.{n}.1.", f"up_blocks.{d}.attentions.{j}.")]
    inner = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
             ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
    return r, inner
