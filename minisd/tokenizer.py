"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"), written out so a reader can follow a prompt to the 77 integers the text encoder sees.

    prompt -> cleanup (NFC, whitespace, lowercase) -> pieces (words, single digits, punctuation runs)
           -> UTF-8 bytes shown as printable characters -> BPE merges -> ids
           -> <|startoftext|> ids <|endoftext|> padding   (always 77 positions)

The vocabulary ships with the package (assets/bpe_simple_vocab_16e6.txt.gz, OpenAI's file, MIT), so this works
offline. A diffusers tokenizer folder (vocab.json + merges.txt) loads with `Tokenizer.from_folder`.
The ids equal those of transformers' CLIPTokenizer (checked in tests/test_tokenizer.py). As that tokenizer does,
we do not run ftfy's mojibake repair; prompts are only NFC-normalised, whitespace-collapsed and lowercased.
Known differences, all rare: the literal text "<|endoftext|>" in a prompt is tokenized as text (transformers
turns it into the special token); characters newer than Python's Unicode tables (unicodedata) count as
punctuation; and transformers with pad_token "!" (SD 2.x folders) makes "!" special, so "!!!" differs
(OpenCLIP, which SD 2.x was trained with, tokenizes it as text, as here).
"""
import gzip
import json
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_VOCAB = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file: 256 bytes x2 + merges + 2 specials = 49408
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode White_Space, the set the reference tokenizer's regex engine calls \s. Python's str.isspace() would
# also count the separators U+001C..U+001F, which the reference keeps as punctuation.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                       "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def folder_pad_token(path):
    """The pad token a tokenizer folder declares (special_tokens_map.json, else tokenizer_config.json);
    end-of-text when it declares none."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = Path(path) / name
        if f.is_file():
            pad = json.loads(f.read_text(encoding="utf-8")).get("pad_token")
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad
    return EOS


class PromptTruncatedWarning(UserWarning):
    """The prompt had more tokens than the text encoder's 77 positions; the tail was dropped."""


@lru_cache()
def bytes_to_unicode():
    """Map every byte 0..255 to a printable character, so BPE can work on strings instead of bytes.
    Bytes that are already visible Latin-1 characters stand for themselves; the others (control codes, space,
    ...) are moved to code points 256+ in order. Byte-level BPE (GPT-2) uses this to avoid an <unk> token."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in visible:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # The vocabulary's first 256 ids follow this order: visible bytes first, then the shifted ones.
    return {b: table[b] for b in visible + [b for b in range(256) if b not in visible]}


def clean(text):
    """NFC-normalise, collapse runs of whitespace to one space, lowercase character by character
    (char-wise, so a final capital sigma lowers to the same letter as any other sigma, as in the reference)."""
    text = unicodedata.normalize("NFC", text)
    out, prev_space = [], False
    for c in text:
        if c in WHITESPACE:
            if not prev_space:
                out.append(" ")
            prev_space = True
        else:
            out.append(c.lower())
            prev_space = False
    return "".join(out)


def char_class(c):
    if c in WHITESPACE:
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"  # L = letter, N = number, P = anything else (punctuation, symbols, emoji)


def pre_tokenize(text):
    """Split cleaned text into the pieces BPE works on, as CLIP's regex does:
    's|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+  (each digit is its own piece)."""
    pieces, i = [], 0
    while i < len(text):
        kind = char_class(text[i])
        if kind == " ":
            i += 1
            continue
        contraction = next((s for s in CONTRACTIONS if text.startswith(s, i)), None)
        if contraction:
            j = i + len(contraction)
        elif kind == "N":
            j = i + 1
        else:
            j = i + 1
            while j < len(text) and char_class(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


class Tokenizer:
    """CLIP BPE. `tokenizer(prompts)` -> LongTensor (B, 77), ready for the text encoder.

    pad_with_eot=True pads with <|endoftext|> (SD 1.x, OpenAI CLIP). pad_with_eot=False pads with id 0, the
    token "!" (SD 2.x, OpenCLIP): after the first <|endoftext|> every position is 0."""

    def __init__(self, vocab_path=None, pad_with_eot=True, max_length=77):
        with gzip.open(vocab_path or DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
        byte_tokens = list(bytes_to_unicode().values())
        vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges] + [BOS, EOS]
        self._setup({t: i for i, t in enumerate(vocab)}, merges, pad_with_eot, max_length)

    @classmethod
    def from_folder(cls, path, pad_with_eot=None, max_length=77):
        """A diffusers/transformers tokenizer folder: vocab.json + merges.txt (the Hub's layout) or tokenizer.json
        (what transformers 5 writes); the pad token ("!" = SD 2.x, <|endoftext|> = SD 1.x, see folder_pad_token)
        says how to pad unless pad_with_eot is given."""
        path = Path(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            merges = [tuple(line.split()) for line in (path / "merges.txt").read_text(encoding="utf-8").split("\n")
                      if line and not line.startswith("#version")]
        elif (path / "tokenizer.json").is_file():
            model = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"tokenizer folder {path} has neither vocab.json + merges.txt nor tokenizer.json")
        pad = folder_pad_token(path)
        if pad not in (EOS, "!"):
            raise ValueError(f"unsupported pad token {pad!r} in {path}: expected {EOS!r} or '!'")
        tok = cls.__new__(cls)
        tok._setup(vocab, merges, pad == EOS if pad_with_eot is None else pad_with_eot, max_length)
        return tok

    def _setup(self, vocab, merges, pad_with_eot, max_length):
        self.encoder = vocab                                  # token string -> id
        self.decoder = {i: t for t, i in vocab.items()}       # id -> token string
        self.merge_rank = {m: r for r, m in enumerate(merges)}  # lower rank = merged earlier
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad_with_eot = pad_with_eot
        self.pad_id = self.eos_id if pad_with_eot else 0
        self.max_length = max_length
        self.cache = {}
        self.encoded = {}

    def __len__(self):
        return len(self.encoder)

    def bpe(self, piece):
        """Merge the characters of one piece, lowest-ranked pair first, until no known merge is left.
        The last character carries </w>, so a word's final sub-token differs from the same letters mid-word."""
        if piece in self.cache:
            return self.cache[piece]
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[piece] = word
        return word

    def encode(self, text):
        """Text -> ids, without start/end tokens and without truncation. A prompt is read by several steps on its
        way to an image (targets, the token table, the text encoder): the last few prompts' ids are kept."""
        if text not in self.encoded:
            ids = []
            for piece in pre_tokenize(clean(text)):
                chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder[t] for t in self.bpe(chars))
            if len(self.encoded) >= 64:
                self.encoded.pop(next(iter(self.encoded)))
            self.encoded[text] = tuple(ids)
        return list(self.encoded[text])

    # SD 3 (Stability's reference, other_impls.py: SDTokenizer) puts words, split at spaces, whole into 77-token
    # chunks, and its text encoders read the first chunk only: a long prompt is cut before the first word that does
    # not fit, not inside it (a word of 8 tokens or more is split there), and padding fills the rest
    whole_words = False

    def room(self, prompt, ids):
        """How many of `ids` (the encoding of `prompt`) the text encoder reads."""
        room = self.max_length - 2
        if len(ids) <= room or not self.whole_words:
            return min(len(ids), room)
        n = 0
        for word in prompt.replace("\n", " ").split(" "):
            k = len(self.encode(word))
            if n + k > room:
                return room if k >= 8 else n
            n += k
        return n

    def kept(self, prompt):
        """(the part of `prompt` the text encoder reads, the cut-off tail or None): its tokens up to the
        max_length positions, without a word cut in two."""
        ids = self.encode(prompt)
        room = self.room(prompt, ids)
        if len(ids) <= room:
            return prompt, None
        kept = ids[:room]
        while kept and not self.decoder[kept[-1]].endswith("</w>"):
            kept.pop()
        return self.decode(kept), self.decode(ids[len(kept):])

    def token_text(self, i):
        """One id as readable text: bytes decoded (a piece of a multi-byte character shows as U+FFFD),
        the end-of-word marker </w> kept, so a table shows where each word ends."""
        t = self.decoder[i]
        if t in (BOS, EOS):
            return t
        end = t.endswith("</w>")
        t = t[:-4] if end else t
        return bytes(self.byte_decoder[c] for c in t).decode("utf-8", errors="replace") + ("</w>" if end else "")

    def decode(self, ids):
        """Ids -> text. Start tokens are skipped and decoding stops at the first end-of-text token, since all
        that follows it is padding (in SD 2.x mode the padding id 0 is a real token, "!")."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        out = bytearray()
        for t in (self.decoder[i] for i in ids if i != self.bos_id):
            end = t.endswith("</w>")
            out += bytes(self.byte_decoder[c] for c in (t[:-4] if end else t)) + (b" " if end else b"")
        return out.decode("utf-8", errors="replace").strip()

    def ids(self, prompt):
        """One prompt -> the max_length ids the model sees (a list), cut with a warning if too long."""
        ids = self.encode(prompt)
        room = self.room(prompt, ids)
        if len(ids) > room:
            warnings.warn(f"prompt is longer than {self.max_length} tokens; cut: \"{self.decode(ids[room:])}\"",
                          PromptTruncatedWarning, stacklevel=3)
            ids = ids[:room]
        ids = [self.bos_id] + ids + [self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def __call__(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        return torch.tensor([self.ids(p) for p in prompts], dtype=torch.long)  # (B, max_length)

    def tokens(self, prompt):
        """[(position, token text)] over all max_length positions fed to the model, padding included."""
        return [(pos, self.token_text(i)) for pos, i in enumerate(self.ids(prompt))]
