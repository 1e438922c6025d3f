"""minisd's CLIP tokenizer against transformers' CLIPTokenizer built from the same vocabulary file."""
import os
import random
import warnings
from pathlib import Path

import pytest
import torch

from minisd.tokenizer import PromptTruncatedWarning, Tokenizer
from tools.parity import write_clip_vocab

transformers = pytest.importorskip("transformers", reason="transformers' CLIPTokenizer is the reference")
SHARED = Path(os.environ.get("MINISD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

HAND_WRITTEN = [
    "a photo of a cat", "A Photo Of A CAT", "a   red\tcircle\n\nand  a blue square  ", "  leading and trailing  ",
    "", " ", "!!!", "a cat... and a dog!!! (maybe?)", "hello, world; foo: bar - baz / qux", "it's a dog's life",
    "they're here, we've gone, I'm done, you'll see, he'd go, don't", "IT'S LOUD", "rock'n'roll", "'s 's's",
    "café crème brûlée", "naïve coöperation", "Ærøskøbing fjord", "São Paulo at night", "Straße und Fluß",
    "ΣΊΣΥΦΟΣ and σίσυφος", "Москва зимой", "東京タワー at dusk",
    "서울의 밤", "مرحبا بالعالم", "हिन्दी पाठ",
    "a cat 😀 and a dog 🐶", "👍🏽👍🏽 thumbs", "🏳️‍🌈 flag",
    "family 👨‍👩‍👧‍👦", "e\u0301 composed vs é",
    "1234567890", "3.14159 and 2,718", "version 2.0-beta", "4k 8k uhd 1080p", "$100 & 50% off #hashtag @user",
    "a <b>bold</b> tag", "C++ and C# code", "snake_case and kebab-case", "email me@example.com", "http://x.y/z?q=1",
    "tabs\tand\u00a0nbsp\u2003emspace", "zero\u200bwidth", "soft\u00adhyphen", "ﬁne ligature", "full-width ＡＢＣ",
    "hummingbird hummingbirds firetruck capybara axolotl", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious", "The Quick Brown Fox Jumps Over The Lazy Dog", "tHiS iS wEiRd CaSiNg",
]
PIECES = ["a", "the", "cat", "dog", "red", "circle", "Blue", "SQUARE", "hummingbird", "naïve", "café", "über",
          "😀", "🐶🐱", "東京", "123", "7", "3.5", "!", "?", ",", ".", "...", "'s", "'re", "-", "(", ")",
          "\"", "&", "next to", "on top of", "don't", "ÉCOLE", "Σ", "straße", "\t", "  ", "\n", "#2", "x" * 30]


def generated_prompts(n=300, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 40)
        out.append("".join(rng.choice(PIECES) + rng.choice(["", " ", " ", "  "]) for _ in range(k)))
    return out


def long_prompts():
    """Prompts beyond 75 tokens: the reference truncates to 75 + start + end, as we do."""
    return ["a photo of a cat " * 20, " ".join(f"object{i}" for i in range(60)), "🐶" * 100]


def all_prompts():
    prompts = HAND_WRITTEN + generated_prompts() + long_prompts()
    parti = SHARED / "benchmarks" / "parti" / "PartiPrompts.tsv"
    if parti.is_file():  # real prompts, when the shared data is there
        prompts += [line.split("\t")[0] for line in parti.read_text(encoding="utf-8").split("\n")[1:] if line]
    return prompts


def reference(folder, **kw):
    # transformers >= 5: CLIPTokenizer is the tokenizers-backed class. In 4.x the Python CLIPTokenizer (without
    # ftfy) splits CJK differently; its CLIPTokenizerFast is the same class as 5.x's CLIPTokenizer.
    major = int(transformers.__version__.split(".")[0])
    cls = transformers.CLIPTokenizer if major >= 5 else transformers.CLIPTokenizerFast
    return cls.from_pretrained(str(folder), **kw)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("clip_tokenizer"))


def ours(prompts, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return Tokenizer(**kw)(prompts)


def compare(mine, ref, prompts):
    bad = [i for i in range(len(prompts)) if not torch.equal(mine[i], ref[i])]
    detail = "; ".join(f"{prompts[i]!r}: {mine[i][:12].tolist()} vs {ref[i][:12].tolist()}" for i in bad[:3])
    return bad, detail


def test_ids_equal_transformers(clip_folder):
    prompts = all_prompts()
    assert len(prompts) >= 350
    ref = reference(clip_folder)(prompts, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
    mine = ours(prompts)
    bad, detail = compare(mine, ref, prompts)
    print(f"tokenizer agreement: {len(prompts) - len(bad)}/{len(prompts)} prompts")
    assert not bad, f"{len(bad)}/{len(prompts)} prompts differ, e.g. {detail}"


def test_sd2_padding_equals_transformers_with_bang_pad(clip_folder):
    # With pad_token "!" transformers makes "!" a special token, so "!!!" in a prompt becomes three id-0
    # tokens there; OpenCLIP, which SD 2.x was trained with, and minisd tokenize it as text ("!!!" = 995).
    # So only prompts without "!" are compared here: the point is the padding.
    prompts = [p for p in HAND_WRITTEN + long_prompts() if "!" not in p]
    ref = reference(clip_folder, pad_token="!")(prompts, padding="max_length", max_length=77, truncation=True,
                                                return_tensors="pt").input_ids
    bad, detail = compare(ours(prompts, pad_with_eot=False), ref, prompts)
    assert not bad, detail


@pytest.mark.parametrize("pad_with_eot", [True, False])
def test_layout_of_the_77_positions(pad_with_eot):
    tok = Tokenizer(pad_with_eot=pad_with_eot)
    ids = tok(["a cat and a dog", "a hummingbird"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    n = len(tok.encode("a cat and a dog"))
    assert n == 5
    row = ids[0].tolist()
    assert row[0] == 49406 and row[n + 1] == 49407
    assert row[n + 2:] == [49407 if pad_with_eot else 0] * (77 - n - 2)
    assert 49407 not in row[:n + 1]


def test_truncation_warns_with_the_cut_text():
    tok = Tokenizer()
    prompt = "cat " * 75 + "and a green star on the left"
    with pytest.warns(PromptTruncatedWarning, match='cut: "and a green star on the left"') as rec:
        ids = tok(prompt)[0].tolist()
    assert issubclass(PromptTruncatedWarning, UserWarning)
    assert "longer than 77 tokens" in str(rec[0].message)
    assert ids[1:76] == [tok.encode("cat")[0]] * 75 and ids[76] == 49407
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("cat " * 75)  # exactly 75 tokens fit: no warning


def test_decode_and_tokens():
    tok = Tokenizer()
    assert len(tok) == 49408
    for p in ["a photo of a cat", "Café naïve 😀 coöperation", "a capybara next to a firetruck"]:
        assert tok.decode(tok.encode(p)) == p.lower()
    assert tok.decode(tok("a cat")[0]) == "a cat"  # start token skipped, padding ignored
    assert tok.decode(Tokenizer(pad_with_eot=False)("a cat")[0]) == "a cat"  # the "!" padding too
    table = tok.tokens("a capybara")
    assert len(table) == 77 and [p for p, _ in table] == list(range(77))
    assert table[:6] == [(0, "<|startoftext|>"), (1, "a</w>"), (2, "cap"), (3, "y"), (4, "bara</w>"),
                         (5, "<|endoftext|>")]
    assert tok.tokens("naïve")[2][1] == "ï"  # bytes shown as text, not as byte-level symbols


def test_from_folder_matches_the_shipped_vocabulary(tmp_path):
    prompts = HAND_WRITTEN[:20] + long_prompts()
    sd1 = write_clip_vocab(tmp_path / "sd1")
    sd2 = write_clip_vocab(tmp_path / "sd2", pad_token="!")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        assert torch.equal(Tokenizer.from_folder(sd1)(prompts), Tokenizer()(prompts))
        sd2_tok = Tokenizer.from_folder(sd2)
        assert not sd2_tok.pad_with_eot
        assert torch.equal(sd2_tok(prompts), Tokenizer(pad_with_eot=False)(prompts))
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "vocab.json").write_text("{}")
        Tokenizer.from_folder(tmp_path / "broken")
