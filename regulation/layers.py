"""Which cross-attention layers Attention Regulation edits.

A layer can be named three ways:
  - by its checkpoint path: `input_blocks.7`, `model.diffusion_model.output_blocks.3`, one transformer block in it
    (`input_blocks.7.1.transformer_blocks.3`: SDXL has 10 per block) or a full attention path such as
    `input_blocks.7.1.transformer_blocks.0.attn2` (every layer under that path);
  - by diffusers' block names: `down_blocks.2`, `up_blocks.1`, `mid_block` (also `down_blocks.2.attentions.1`);
  - by the size of its query map: `16x16` (height x width) or `16`.
How the two namings meet is minisd/blocks.py.

The paper regulates the layers at 1/32 of the image side (16x16 maps at 512 px): in SD, input_blocks.7/8 and
output_blocks.3/4/5, the deepest level of the UNet's down and up paths that has cross-attention. That is the
default for every family, `ModelConfig.default_blocks` (SDXL: input_blocks.7/8 and output_blocks.0/1/2, ten
transformer blocks each; the shipped shapes model: its 8x8 maps).
"""
import re

from minisd.blocks import PREFIX, attention_blocks, diffusers_to_checkpoint, split_block

class LayerSelector:
    """`selector(layer) -> bool` for layers with `.name` (checkpoint path) and `.hw` (query map size).

    specs: a list of names (see the module docstring), a comma/space separated string, or None for the model's
    default. A name that selects no attention layer of this model is a ValueError listing the ones that exist.
    """

    def __init__(self, specs, model_config):
        unet = model_config.unet
        if specs is None:
            specs = model_config.default_blocks()
        if isinstance(specs, (str, int)):
            specs = str(specs).replace(",", " ").split()
        specs = [str(s) for s in specs]
        if not specs:
            raise ValueError("no layers given to regulate")
        blocks = attention_blocks(unet)
        self.specs, self.prefixes, self.sizes = list(specs), [], set()
        for spec in specs:
            size = re.fullmatch(r"(\d+)(?:x(\d+))?", spec)
            if size:
                h = int(size.group(1))
                self.sizes.add((h, int(size.group(2) or h)))
                continue
            path = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
            names = diffusers_to_checkpoint(path, unet) or [path]
            for name in names:
                block, inside = split_block(name)
                if block not in blocks or inside[:1] not in ([], ["1"]):   # a block's transformer is its module 1
                    raise ValueError(f"{spec!r} names no attention layer of this model; blocks with attention: "
                                     f"{', '.join(blocks)} (or diffusers names down_blocks.i, up_blocks.i, "
                                     f"mid_block, or a map size like 16x16)")
                if name.split(".")[-1] == "attn1":
                    raise ValueError(f"{spec!r} is a self-attention layer; Attention Regulation edits cross-attention")
                depth = unet.depth_at(-1 if block == "middle_block" else blocks[block])
                if inside[1:2] and (inside[1] != "transformer_blocks" or len(inside) < 3 or not inside[2].isdigit()
                                    or int(inside[2]) >= depth or inside[3:] not in ([], ["attn2"])):
                    raise ValueError(f"{spec!r} names no cross-attention layer: {block}.1 has transformer_blocks.0 "
                                     f"to transformer_blocks.{depth - 1}, each with one cross-attention (attn2)")
                self.prefixes.append(name)

    def __call__(self, layer):
        name = layer.name[len(PREFIX):] if layer.name.startswith(PREFIX) else layer.name
        if any(name == p or name.startswith(p + ".") for p in self.prefixes):
            return True
        return layer.hw is not None and tuple(layer.hw) in self.sizes

    def __repr__(self):
        return f"LayerSelector({self.specs})"
