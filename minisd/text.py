"""The text encoder: `transformers.CLIPTextModel` under the official checkpoint's names.

SD 1.x reads the last layer of OpenAI's CLIP ViT-L/14 text tower. SD 2.x reads the layer before the last of
OpenCLIP's ViT-H/14 text tower and then applies the final LayerNorm (the original code stops the transformer one
block early). Its checkpoints store OpenCLIP's layout (`cond_stage_model.model.*`); checkpoint.py maps it onto this
module with one small transform."""
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel


class TextEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hf = CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads, hidden_act=cfg.hidden_act,
                            max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps)
        clip = CLIPTextModel(hf)
        if hasattr(clip, "text_model"):  # transformers 4.x nests the tower under `text_model`, as the checkpoints do
            self.transformer = clip
        else:                            # transformers 5.x does not: add the level so the names stay the keys
            self.transformer = nn.Module()
            self.transformer.text_model = clip
        self.clip = [clip]  # in a list so it is not registered twice

    @property
    def text_model(self):
        """The module whose names follow `cond_stage_model.transformer.text_model.`"""
        return self.transformer.text_model

    def forward(self, ids):
        """Token ids (b, 77) -> text embeddings (b, 77, hidden) that the UNet's cross-attention reads."""
        out = self.clip[0](input_ids=ids, output_hidden_states=self.cfg.penultimate)
        if self.cfg.penultimate:
            return self.text_model.final_layer_norm(out.hidden_states[-2])
        return out.last_hidden_state
