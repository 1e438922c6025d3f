"""T5-XXL, SD 3's third text encoder: `transformers.T5EncoderModel` under the official names
(`text_encoders.t5xxl.transformer.*`), and its SentencePiece tokenizer.

The tokenizer is in no checkpoint file: it is read from a SentencePiece model (`spiece.model`, as in a diffusers
folder's `tokenizer_3/`, or a path). Stability's reference (other_impls.py: `SD3Tokenizer` passes T5 `text[:226]`;
`T5XXLTokenizer` is an `SDTokenizer` with max_length 99999999, min_length 77, pad_to_max_length False) tokenizes
the first 226 characters of the prompt, appends end-of-text (id 1) and pads with 0 to at least 77 tokens: one
sequence, never cut and never split into 77-token chunks. The model has no attention mask, so the padding is read
and its length changes the image. Several prompts (a batch, and guidance's two halves) are padded to one length,
the longest of them (at least 77). diffusers' pipeline pads and cuts to 256 (`max_sequence_length`): `length=256`
gives that.
"""
from pathlib import Path

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
    """Prompts -> T5 token ids, as Stability's reference makes them (or padded and cut to `length`).
    `model_file`: a SentencePiece model (spiece.model) or a folder holding one (a diffusers tokenizer_3/)."""

    def __init__(self, model_file, min_length=77, length=None):
        try:
            import sentencepiece
        except ModuleNotFoundError:
            raise ModuleNotFoundError("SD 3's T5 tokenizer needs the sentencepiece package: "
                                      "pip install sentencepiece") from None
        if length is not None and length < 1:
            raise ValueError(f"--t5-length must be at least 1 (T5's end-of-text token), got {length}")
        self.sp = sentencepiece.SentencePieceProcessor()
        if isinstance(model_file, bytes):   # a model file's own tokenizer (minisd's tiny SD 3.5 carries it)
            path = "the checkpoint's T5 tokenizer"
            self.sp.LoadFromSerializedProto(model_file)
        else:
            path = self._load(model_file)
        # T5's ids: padding 0 and end-of-text 1, which the model's weights were trained with; another
        # SentencePiece model (LLaMA's: <unk> 0, <s> 1) would give ids of other meanings without any error
        if (self.sp.pad_id(), self.sp.eos_id()) != (PAD, EOS):
            raise ValueError(f"--t5-tokenizer {path} is not T5's tokenizer: its padding and end-of-text ids are "
                             f"{self.sp.pad_id()} and {self.sp.eos_id()}, T5's are {PAD} and {EOS}")
        self.path, self.min_length, self.length = path, min_length, length

    def _load(self, model_file):
        path = Path(model_file)
        if path.is_dir():
            if not (path / "spiece.model").is_file():
                raise ValueError(f"--t5-tokenizer {path} is a folder without spiece.model (T5's SentencePiece "
                                 f"model, as in a diffusers folder's tokenizer_3/)")
            path = path / "spiece.model"
        if not path.is_file():
            raise ValueError(f"--t5-tokenizer {path}: no such file (T5's SentencePiece model, spiece.model)")
        try:
            self.sp.Load(str(path))
        except (RuntimeError, OSError):   # sentencepiece says "could not parse ModelProto" and the like
            raise ValueError(f"--t5-tokenizer {path} is not a SentencePiece model (T5's spiece.model)") from None
        return path

    def check_vocabulary(self, rows):
        """Every id this tokenizer makes must have a row in T5's embedding (`rows`; T5-XXL's 32128 hold
        spiece.model's 32000 pieces and room to spare): else the tokenizer is another model's."""
        if self.sp.get_piece_size() > rows:
            raise ValueError(f"--t5-tokenizer {self.path} has {self.sp.get_piece_size()} pieces but the T5 weights "
                             f"embed {rows} tokens: the tokenizer is not these weights' (T5-XXL: spiece.model of "
                             f"google/t5-v1_1-xxl, 32000 pieces)")

    def cut(self, prompt):
        """What of `prompt` T5 does not read (past the reference's 226 characters), or None."""
        return (prompt[226:].strip() or None) if self.length is None else None

    def read(self, prompt):
        """The part of the prompt T5 reads: Stability's reference its first 226 characters, `length` all of it."""
        return prompt[:226] if self.length is None else prompt

    def ids(self, prompt):
        """A prompt's token ids with end-of-text, no padding."""
        text = self.read(prompt)
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
