"""T5-XXL, SD 3's third text encoder: `transformers.T5EncoderModel` under the official names
(`text_encoders.t5xxl.transformer.*`), and its SentencePiece tokenizer.

The tokenizer is in no checkpoint file: it is read from a SentencePiece model (`spiece.model`, as in a diffusers
folder's `tokenizer_3/`, or a path). Stability's reference (sd3_impls / other_impls) tokenizes the first 226
characters of the prompt, appends end-of-text (id 1) and pads with 0 to at least 77 tokens, never cutting; the
model has no attention mask, so the padding is read and its length changes the image. diffusers' pipeline pads and
cuts to 256 (`max_sequence_length`): `length=256` gives that.
"""
import torch
import torch.nn as nn
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel

PAD, EOS = 0, 1


class T5Encoder(nn.Module):
    def __init__(self, t5):
        super().__init__()
        self.transformer = T5EncoderModel(HFT5Config(
            vocab_size=t5.vocab_size, d_model=t5.d_model, d_kv=t5.d_kv, d_ff=t5.d_ff, num_layers=t5.num_layers,
            num_heads=t5.num_heads, relative_attention_num_buckets=t5.relative_attention_num_buckets,
            relative_attention_max_distance=t5.relative_attention_max_distance, feed_forward_proj="gated-gelu",
            dropout_rate=0.0, is_encoder_decoder=False, use_cache=False))

    def forward(self, ids):
        """Token ids (b, n) -> the last layer's states (b, n, d_model), final RMSNorm applied."""
        return self.transformer(input_ids=ids).last_hidden_state


class T5Tokenizer:
    """Prompts -> T5 token ids, as Stability's reference makes them (or padded and cut to `length`)."""

    def __init__(self, model_file, min_length=77, length=None):
        try:
            import sentencepiece
        except ModuleNotFoundError:
            raise ModuleNotFoundError("SD 3's T5 tokenizer needs the sentencepiece package: "
                                      "pip install sentencepiece") from None
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.min_length, self.length = min_length, length

    def ids(self, prompt):
        """A prompt's token ids with end-of-text, no padding."""
        text = prompt[:226] if self.length is None else prompt
        return self.sp.encode(" ".join(text.split())) + [EOS]

    def pieces(self, prompt):
        return [self.sp.id_to_piece(i) for i in self.ids(prompt)[:-1]] + ["</s>"]

    def __call__(self, prompts):
        """(b, n) ids. Reference: n = max(77, the longest prompt's tokens), padded with 0. With `length`: every
        prompt padded or cut to it, end-of-text kept last, as transformers' tokenizer does."""
        rows = [self.ids(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        if self.length is not None:
            rows = [r if len(r) <= self.length else r[:self.length - 1] + [EOS] for r in rows]
            n = self.length
        else:
            n = max(self.min_length, max(len(r) for r in rows))
        return torch.tensor([r + [PAD] * (n - len(r)) for r in rows])
