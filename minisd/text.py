"""The text encoder: `transformers.CLIPTextModel` under the official checkpoint's names.

SD 1.x reads the last layer of OpenAI's CLIP ViT-L/14 text tower. SD 2.x reads the layer before the last of
OpenCLIP's ViT-H/14 text tower and then applies the final LayerNorm (the original code stops the transformer one
block early). Its checkpoints store OpenCLIP's layout (`cond_stage_model.model.*`); checkpoint.py maps it onto this
module with one small transform.

SDXL has two (`conditioner.embedders.0` = CLIP ViT-L, `.1` = OpenCLIP ViT-bigG), both read at the penultimate
layer *without* the final LayerNorm, their outputs concatenated to 2048 channels. bigG also gives the pooled text:
the final-LayerNorm'd last layer at the end-of-text token, times `text_projection` (OpenCLIP's `x @ P`).

SD 3 has three (`text_encoders.clip_l`, `.clip_g`, `.t5xxl`), each under transformers' own names: the two CLIPs
read as SDXL reads them, side by side and zero-padded to T5's width, then T5's tokens after them (SD3Text)."""
import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel


class TextEncoder(nn.Module):
    def __init__(self, text):
        super().__init__()
        self.config = text
        hf = CLIPTextConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                            intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                            num_attention_heads=text.num_attention_heads, hidden_act=text.hidden_act,
                            max_position_embeddings=text.max_position_embeddings, layer_norm_eps=text.layer_norm_eps)
        clip = CLIPTextModel(hf)
        if hasattr(clip, "text_model"):  # transformers 4.x nests the tower under `text_model`, as the checkpoints do
            self.transformer = clip
        else:                            # transformers 5.x does not: add the level so the names stay the keys
            self.transformer = nn.Module()
            self.transformer.text_model = clip
        self.clip = [clip]  # in a list so it is not registered twice
        if text.key_layout == "sd3":
            # SD 3 stores transformers' CLIPTextModelWithProjection: the projection is a Linear beside text_model
            if text.projection_dim:
                self.transformer.text_projection = nn.Linear(text.hidden_size, text.projection_dim, bias=False)
        elif text.projection_dim:
            # OpenCLIP's initialisation; a checkpoint overwrites it, but a model built from scratch must not start
            # from uninitialised memory
            init = torch.randn(text.hidden_size, text.projection_dim) * text.hidden_size ** -0.5
            self.text_projection = nn.Parameter(init)

    @property
    def text_model(self):
        """The module whose names follow `cond_stage_model.transformer.text_model.`"""
        return self.transformer.text_model

    def encode(self, ids):
        """Token ids (b, 77) -> (text embeddings (b, 77, hidden), pooled (b, projection_dim) or None)."""
        out = self.clip[0](input_ids=ids, output_hidden_states=self.config.penultimate)
        if not self.config.penultimate:
            hidden = out.last_hidden_state
        elif self.config.final_norm:
            hidden = self.text_model.final_layer_norm(out.hidden_states[-2])
        else:
            hidden = out.hidden_states[-2]
        # the final-LayerNorm'd end-of-text state, at ids.argmax(): end-of-text has the largest id, so that is its
        # first occurrence (OpenCLIP's and SD 3's rule)
        eot = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), ids.argmax(-1)]
        if self.config.key_layout == "sd3":
            # SD 3 pools both CLIPs, projected where there is a projection (bigG). CLIP-L's is used unprojected, as
            # Stability's reference does (its official projection is the identity, which diffusers fills in).
            return hidden, self.transformer.text_projection(eot) if self.config.projection_dim else eot
        return hidden, eot @ self.text_projection if self.config.projection_dim else None

    def forward(self, ids):
        """Token ids (b, 77) -> text embeddings (b, 77, hidden) that the UNet's cross-attention reads."""
        return self.encode(ids)[0]


class Conditioner(nn.Module):
    """SDXL's text conditioning, named as sgm names it: `conditioner.embedders.{0,1}`. (sgm's embedders 2-4, the
    micro-conditioning numbers, have no weights: model.py embeds them.)"""

    def __init__(self, texts):
        super().__init__()
        self.embedders = nn.ModuleList([TextEncoder(c) for c in texts])

    def forward(self, ids):
        """One ids tensor per embedder (each tokenizer pads its own way) -> (context (b, 77, sum of widths),
        pooled text of the last embedder that has a projection)."""
        hidden, pooled = zip(*(e.encode(i) for e, i in zip(self.embedders, ids)))
        return torch.cat(hidden, dim=-1), next(p for p in reversed(pooled) if p is not None)


class SD3Text(nn.Module):
    """SD 3's text conditioning under the official names: `text_encoders.{clip_l, clip_g, t5xxl}`. T5 may be
    absent (t5 config None): zeros then stand in for its tokens, as diffusers allows."""

    def __init__(self, clip_l, clip_g, t5, context_dim, t5_tokens=77):
        super().__init__()
        from .t5 import T5Encoder
        self.clip_l, self.clip_g = TextEncoder(clip_l), TextEncoder(clip_g)
        if t5 is not None:
            self.t5xxl = T5Encoder(t5)
        self.context_dim, self.t5_tokens = context_dim, t5_tokens

    @property
    def has_t5(self):
        return hasattr(self, "t5xxl")

    def forward(self, ids):
        """(CLIP-L ids, CLIP-G ids, T5 ids or None), each (b, tokens) -> (context (b, 77 + T5 tokens, 4096),
        pooled (b, 768 + 1280))."""
        (l, l_pooled), (g, g_pooled) = self.clip_l.encode(ids[0]), self.clip_g.encode(ids[1])
        clip = torch.cat([l, g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.context_dim - clip.shape[-1]))
        if self.has_t5:
            t5 = self.t5xxl(ids[2]).to(clip.dtype)
        else:
            t5 = clip.new_zeros(clip.shape[0], self.t5_tokens, self.context_dim)
        return torch.cat([clip, t5], dim=1), torch.cat([l_pooled, g_pooled], dim=-1)
