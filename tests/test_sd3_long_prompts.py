"""SD 3 with long prompts (docs/sd3.md, "Long prompts"), on a tiny SD 3.5 Medium-shaped model (random weights).

A 120-word tag-style prompt makes more than 77 T5 tokens within its first 226 characters (the part Stability's
reference gives T5) and more than 77 CLIP tokens. Under guidance both halves are padded to one T5 length, the
longest text's: the result equals diffusers' pipeline given that length as `max_sequence_length` (it pads both
halves to it); T5's and both CLIPs' ids are the reference's tokenizers' (other_impls.py, transcribed: CLIP reads the
first 77-token chunk of whole words, so a long prompt is cut before a word, where diffusers cuts inside it). In a
batch, each image is what its prompt gives alone when its prompt is the batch's longest, and otherwise what it
gives alone at the batch's T5 length (`t5_length`), as docs/sd3.md says.
"""
import random

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is the reference")
pytest.importorskip("sentencepiece")

from minisd.pipeline_sd3 import SD3Pipeline  # noqa: E402
from minisd.sample import main  # noqa: E402

try:
    from conftest import assert_within_floor, float64_twin
    from test_sd3 import build
except ImportError:
    from tests.conftest import assert_within_floor, float64_twin
    from tests.test_sd3 import build

TAGS = ("masterpiece, best quality, 8k, hdr, 1girl, red circle, blue square, 3d render, studio photo, cat, dog, "
        "bird over hill, big star, x9, ultra-detailed, 35mm, f/1.8").split(" ")
# seed 25: T5's 226 characters and CLIP's 75 tokens both end between two words (see test_the_prompt_is_long), where
# diffusers' cuts equal the reference's; seed 12: CLIP's 75th token is inside a word, which the reference leaves out
LONG, MID_WORD = (" ".join(rng.choice(TAGS) for _ in range(120)) for rng in (random.Random(25), random.Random(12)))
SHORT = "a red circle left of a blue square"
# a word of 8 or more CLIP tokens across the 75th: the reference splits it there
SPLIT = " ".join(["red circle"] * 36) + " supercalifragilisticexpialidocious x9"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return build(tmp_path_factory.mktemp("sd3-long"), True)


def reference_t5_ids(tokenizer, prompt):
    """Stability's T5XXLTokenizer (other_impls.py: an SDTokenizer with no start token, max_length 99999999,
    min_length 77, pad_to_max_length False) on SD3Tokenizer's text[:226], transcribed: each space-separated word
    tokenized alone without its end token, then end-of-text, then padding (0) up to 77; `tokenizer` is
    transformers' T5Tokenizer on the same spiece.model."""
    ids = [i for word in prompt[:226].replace("\n", " ").split(" ") if word
           for i in tokenizer(word)["input_ids"][:-1]]
    ids.append(1)
    return ids + [0] * (77 - len(ids))


def t5_length(sd3, *texts):
    return max(77, *(len(sd3.mine.t5_tokenizer.ids(t)) for t in texts))


def test_the_prompt_is_long(sd3):
    assert len(LONG.split()) == 120
    assert len(sd3.mine.t5_tokenizer.ids(LONG)) > 77, "the prompt's first 226 characters make no more than 77 tokens"
    assert len(sd3.mine.tokenizer.encode(LONG)) > 77
    assert LONG[226] == " ", "the 226-character cut must fall between words for the comparison with diffusers"
    ids = sd3.mine.tokenizer.encode(LONG)
    assert sd3.mine.tokenizer.room(LONG, ids) == 75, "CLIP's cut must fall between words, as diffusers' does"
    assert sd3.mine.tokenizer.room(MID_WORD, sd3.mine.tokenizer.encode(MID_WORD)) < 75


def reference_clip_ids(tokenizer, prompt, pad_with_end):
    """The first 77-token chunk of Stability's SDTokenizer.tokenize_with_weights (other_impls.py), the only chunk
    its CLIP encoders read (ClipTokenWeightEncoder.encode_token_weights), transcribed for prompts without
    weight syntax: each space-separated word tokenized alone; a word that does not fit ends the chunk (end token,
    then padding) unless it has 8 tokens or more, which is split at the edge."""
    empty = tokenizer("")["input_ids"]
    start, end = empty
    pad = end if pad_with_end else 0
    batch = [start]
    for word in [w for w in prompt.replace("\n", " ").split(" ") if w]:
        group = tokenizer(word)["input_ids"][1:-1]
        if len(group) + len(batch) > 76:
            remaining = 77 - len(batch) - 1
            if len(group) >= 8:
                batch.extend(group[:remaining])
                batch.append(end)
            else:
                batch.append(end)
                batch.extend([pad] * remaining)
            return batch
        batch.extend(group)
    batch.append(end)
    return batch + [pad] * (77 - len(batch))


def test_clip_ids_are_the_references(sd3):
    """Long prompts cut as the reference cuts them: before the word that does not fit (not inside it, as
    diffusers' truncation does), a word of 8 or more tokens split at the edge; short ones padded."""
    theirs = sd3.theirs
    assert "(" not in LONG + MID_WORD + SPLIT   # the reference reads "(word:1.2)" as a weight (docs/sd3.md)
    for prompt in (LONG, MID_WORD, SPLIT, SHORT):
        mine = sd3.mine.ids([prompt])
        for i, (tok, pad_with_end) in enumerate(((theirs.tokenizer, True), (theirs.tokenizer_2, False))):
            assert mine[i][0].tolist() == reference_clip_ids(tok, prompt, pad_with_end), (prompt[:40], i)
    diffusers = theirs.tokenizer(MID_WORD, padding="max_length", max_length=77, truncation=True).input_ids
    assert sd3.mine.ids([MID_WORD])[0][0].tolist() != diffusers, "the prompt cannot show the two cuts apart"


def test_t5_ids_are_the_references(sd3):
    tok = sd3.theirs.tokenizer_3
    for prompt in (LONG, SHORT, ""):
        ref = reference_t5_ids(tok, prompt)
        assert sd3.mine.t5_tokenizer(prompt)[0].tolist() == ref
    assert len(reference_t5_ids(tok, LONG)) > 77


def run_both(sd3, prompts, negative, length, steps=2):
    """Final latents: diffusers' pipeline at max_sequence_length `length` (float32 and float64) and minisd's."""
    side = sd3.cfg.image_size // sd3.cfg.vae.downsample
    latents = torch.randn(len(prompts), 16, side, side, generator=torch.Generator().manual_seed(3))
    ref, ref64 = (pipe(prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=5.0,
                       latents=latents.to(dtype), output_type="latent", max_sequence_length=length).images
                  for pipe, dtype in ((sd3.theirs, torch.float32), (float64_twin(sd3.theirs), torch.float64)))
    out = sd3.mine(prompts, negative_prompt=negative, steps=steps, guidance=5.0, sampler="euler",
                   latents=latents.clone(), return_latents=True, decode=False).latents
    return ref, out, ref64


@pytest.mark.parametrize("negative", ["", "blurry, grey"], ids=["no-negative", "negative"])
def test_long_prompt_under_guidance_equals_diffusers_at_its_length(sd3, negative):
    """Both halves at the longest text's T5 length: diffusers' pipeline pads both halves to max_sequence_length,
    so at that length it computes the same thing (the prompt cut at 226 characters gives the same tokens as
    diffusers' cut at that many tokens, since the cut falls between words)."""
    length = t5_length(sd3, LONG, negative)
    assert length > 77
    ref, out, ref64 = run_both(sd3, [LONG], negative, length)
    assert_within_floor(ref, out, ref64)
    assert ref.abs().max() > 0.1


@pytest.mark.parametrize("negative", ["", "blurry, grey"], ids=["no-negative", "negative"])
def test_a_batch_gives_each_image_what_docs_say(sd3, negative):
    """[long, short] in one batch: the long prompt's image is its image alone; the short one's is its image alone
    at the batch's T5 length, which differs from its image alone at 77 (the padding is read: no attention mask).
    Compared in float64, where a batch and a single call round alike."""
    model = sd3.mine.model.double()
    try:
        pipe = SD3Pipeline(model, sd3.spiece)
        side = sd3.cfg.image_size // sd3.cfg.vae.downsample
        noise = torch.randn(2, 16, side, side, generator=torch.Generator().manual_seed(5))

        def run(prompts, latents, length=None):
            p = pipe if length is None else SD3Pipeline(model, sd3.spiece, t5_length=length)
            return p(prompts, negative_prompt=negative, steps=2, guidance=5.0, sampler="euler", latents=latents,
                     return_latents=True, decode=False).latents

        batch = run([LONG, SHORT], noise.clone())
        long_alone, short_alone = run(LONG, noise[:1].clone()), run(SHORT, noise[1:].clone())
        short_at_batch_length = run(SHORT, noise[1:].clone(), t5_length(sd3, LONG, SHORT, negative))
        assert (batch[:1] - long_alone).abs().max() < 1e-6
        assert (batch[1:] - short_at_batch_length).abs().max() < 1e-6
        assert (batch[1:] - short_alone).abs().max() > 1e-3, "the padding made no difference: the test cannot see it"
    finally:
        model.float()


def test_command_line_runs_a_long_prompt_under_guidance(sd3, tmp_path, capsys):
    """The issue's case: more than 77 T5 tokens under guidance, from the command line; the cuts are said."""
    try:
        main(["--checkpoint", str(sd3.path), "--t5-tokenizer", str(sd3.spiece), "--prompt", LONG,
              "--negative-prompt", "blurry", "--steps", "2", "--out", str(tmp_path / "long.png")])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "long.png").is_file()
    assert "longer than the text encoder's 77 tokens" in err and "T5 reads the prompt's first 226 characters" in err
