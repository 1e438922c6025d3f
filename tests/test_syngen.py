"""SynGen (regulation/syngen.py) against the straightforward per-image reference of the authors' loss
(tests/reference_syngen.py): the loss and its gradient on random maps (float32 and float64, words of several
pieces, nouns without modifiers), whole short runs on a tiny random SD through the pipeline, the modifier-noun
parse (rules, and the spaCy rule on a hand-made parse), and bad input."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minisd.checkpoint import build_model
from minisd.config import tiny
from minisd.pipeline import Pipeline
from regulation.layers import LayerSelector
from regulation.syngen import (SynGen, SynGenConfig, make_syngen, parse_pairs, resolve_pairs, step_sizes,
                               symmetric_kl, syngen_loss)
from regulation.targets import TargetError, modifier_noun_pairs, spacy_pairs

try:
    from tests.reference_syngen import ReferenceSynGen, reference_loss, sym_kl, to_subtrees
except ImportError:  # tests/ itself on sys.path
    from reference_syngen import ReferenceSynGen, reference_loss, sym_kl, to_subtrees

PROMPT = "a red circle and a blue square"


def random_attention(b, h, w, num_tokens, seed, sharp=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(b, h, w, num_tokens, generator=g, dtype=torch.float64)).softmax(-1).to(dtype)


# --------------------------------------------------------------------------------------------- pure functions

def test_symmetric_kl_equals_categorical_kl():
    attn = random_attention(2, 4, 5, 12, seed=0)
    ours = symmetric_kl(attn, [2, 5], [1, 2, 7])
    for r in range(2):
        for i, a in enumerate([2, 5]):
            for j, c in enumerate([1, 2, 7]):
                torch.testing.assert_close(ours[r, i, j], sym_kl(attn[r, :, :, a], attn[r, :, :, c]))
    assert ours[:, 0, 1].abs().max() < 1e-6      # a map's distance to itself


# pairs as SynGen takes them: per modifier its positions, the noun's positions; eot = the end-of-text position
CASES = {
    "one piece each": ([([[2]], [3]), ([[6]], [7])], 8, False),
    "several pieces and modifiers": ([([[2, 3], [4]], [5, 6]), ([[9]], [10, 11])], 13, False),
    "noun without modifier": ([([[2], [3]], [4]), ([], [7]), ([[9]], [11])], 12, True),
    "nothing outside": ([([[1], [2]], [3])], 4, False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradient_equal_reference_on_random_maps(case, dtype):
    pairs, eot, _ = CASES[case]
    subtrees = to_subtrees(pairs)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for h, w in [(4, 4), (8, 6), (16, 16)]:
        attn = random_attention(3, h, w, 77, seed=h * w + eot, dtype=dtype).requires_grad_(True)
        loss, positive, negative = syngen_loss(attn, pairs, eot)
        assert loss.dtype == dtype and loss.shape == (3,)
        torch.testing.assert_close(loss, positive + negative)
        (ours,) = torch.autograd.grad(loss.sum(), attn)
        attn_ref = attn.detach().clone().requires_grad_(True)
        ref = [reference_loss(image, subtrees, eot) for image in attn_ref]
        ref = torch.stack([torch.as_tensor(v, dtype=dtype) for v in ref])
        torch.testing.assert_close(loss, ref, **tol)
        (ref_grad,) = torch.autograd.grad(ref.sum(), attn_ref)
        # float32: an element of the gradient is a sum with cancellation, so its error is relative to the largest
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(ours, ref_grad, rtol=tol["rtol"], atol=max(tol["atol"], tol["rtol"] * scale))
        assert ours.abs().sum() > 0
        if case == "nothing outside":
            assert negative.abs().max() == 0 and positive.min() > 0


def test_loss_is_smaller_for_bound_maps():
    """A modifier on its noun's cells and away from the other words' cells gives a lower loss."""
    attn = torch.full((2, 4, 4, 77), 1.0)
    attn[0, :2, :, 2] = attn[0, :2, :, 3] = 50.0      # image 0: 'red' and 'circle' on the top half
    attn[1, :2, :, 2] = attn[1, 2:, :, 3] = 50.0      # image 1: 'red' on top, 'circle' at the bottom
    attn = attn / attn.sum(-1, keepdim=True)
    loss, positive, _ = syngen_loss(attn, [([2], [3])], eot=8)
    assert positive[0] < 1e-6 < positive[1] and loss[0] < loss[1]


def test_step_sizes():
    assert step_sizes(50) == [20.0] * 50                                   # the authors': constant
    decay = step_sizes(3, SynGenConfig(scale_range=(1.0, 0.5)))            # Attend-and-Excite's schedule
    assert decay == pytest.approx([20.0, 20 * 0.75 ** 0.5, 20 * 0.5 ** 0.5])


# ------------------------------------------------------------------------------------------------- the parse

@pytest.mark.parametrize("prompt, expected", [
    ("a red circle and a blue square", [(["red"], "circle"), (["blue"], "square")]),
    ("a small fluffy cat on a wooden table", [(["small", "fluffy"], "cat"), (["wooden"], "table")]),
    ("a checkered bowl on a red and blue table", [(["checkered"], "bowl"), (["red", "blue"], "table")]),
    ("a photo of a horned lion and a spotted monkey", [(["horned"], "lion"), (["spotted"], "monkey")]),
    ("A Pink Sunflower and a Yellow Flamingo", [(["pink"], "sunflower"), (["yellow"], "flamingo")]),
    ("a teddy bear to the left of a cup", [(["teddy"], "bear"), ([], "cup")]),
    ("a dog sitting on a bench, digital art", [([], "dog"), ([], "bench")]),
    ("the car is red", [(["red"], "car")]),
    ("a dog that is red and shiny", [(["red", "shiny"], "dog")]),
    ("the car is very red", [(["red"], "car")]),
    ("the cat's red hat", [([], "cat"), (["red"], "hat")]),
    ("a red cube and a red sphere", [(["red"], "cube"), (["red#2"], "sphere")]),
    ("a red-haired girl and a red dress", [(["red-haired"], "girl"), (["red#2"], "dress")]),
    ("two brightly colored birds", [(["brightly", "colored"], "birds")]),
    ("a cat and a cat", [([], "cat"), ([], "cat#2")]),
    ("two fluffy dogs chase a red ball", [(["fluffy"], "dogs"), (["red"], "ball")]),
])
def test_modifier_noun_pairs(prompt, expected):
    assert modifier_noun_pairs(prompt) == expected


def test_parsed_words_resolve_to_their_own_tokens():
    from minisd.tokenizer import Tokenizer
    tok = Tokenizer()
    prompt = "a red-haired girl and a red dress"
    assert resolve_pairs(tok, prompt) == [([[2, 3, 4]], [5]), ([[8]], [9])]
    assert resolve_pairs(tok, "a red cube and a red sphere") == [([[2]], [3]), ([[6]], [7])]
    # nouns without modifiers: dropped unless include_entities
    assert resolve_pairs(tok, "a teddy bear and a cup") == [([[2]], [3])]
    assert resolve_pairs(tok, "a teddy bear and a cup", include_entities=True) == [([[2]], [3]), ([], [6])]
    assert resolve_pairs(tok, PROMPT, "blue square") == [([[6]], [7])]
    assert resolve_pairs(tok, PROMPT, [("red", "circle")]) == [([[2]], [3])]
    assert parse_pairs("small fluffy cat; wooden table") == [(["small", "fluffy"], "cat"), (["wooden"], "table")]


def fake_doc(words):
    """A hand-made parse: (text, pos, dep, head index or None) per word, as spaCy's Doc gives them."""
    toks, idx = [], 0
    for i, (text, pos, dep, _) in enumerate(words):
        toks.append(SimpleNamespace(text=text, pos_=pos, dep_=dep, i=i, idx=idx, children=[]))
        idx += len(text) + 1
    for tok, (_, _, _, head) in zip(toks, words):
        if head is not None:
            toks[head].children.append(tok)
    return toks


def test_spacy_rule_on_a_hand_made_parse():
    # "a checkered bowl on a red and blue table", as en_core_web_trf parses it
    doc = fake_doc([("a", "DET", "det", 2), ("checkered", "ADJ", "amod", 2), ("bowl", "NOUN", "ROOT", None),
                    ("on", "ADP", "prep", 2), ("a", "DET", "det", 8), ("red", "ADJ", "amod", 8),
                    ("and", "CCONJ", "cc", 5), ("blue", "ADJ", "conj", 5), ("table", "NOUN", "pobj", 3)])
    pairs = [([m.text for m in mods], noun.text) for mods, noun in spacy_pairs(doc)]
    assert pairs == [(["checkered"], "bowl"), (["red", "blue"], "table")]
    # "the car is red": the copula rule
    doc = fake_doc([("the", "DET", "det", 1), ("car", "NOUN", "nsubj", 2), ("is", "AUX", "ROOT", None),
                    ("red", "ADJ", "acomp", 2)])
    assert [([m.text for m in mods], noun.text) for mods, noun in spacy_pairs(doc)] == [(["red"], "car")]


def test_spacy_parser_needs_spacy():
    try:
        import spacy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="parser='rules'"):
            modifier_noun_pairs(PROMPT, parser="spacy")
    with pytest.raises(ValueError, match="parser"):
        modifier_noun_pairs(PROMPT, parser="nltk")


# --------------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error():
    from minisd.tokenizer import Tokenizer
    tok = Tokenizer()
    with pytest.raises(ValueError, match="no modifier-noun pair.*'a cat and a dog'"):
        resolve_pairs(tok, "a cat and a dog")
    with pytest.raises(ValueError, match="no modifier-noun pair"):
        resolve_pairs(tok, PROMPT, [([], "circle")])
    with pytest.raises(TargetError, match="'green'.*not in the prompt") as err:
        resolve_pairs(tok, PROMPT, [(["green"], "circle")])
    assert isinstance(err.value, ValueError) and "circle</w>" in str(err.value)   # the token table
    with pytest.raises(ValueError, match="no pairs"):
        parse_pairs(" ; ")
    select = lambda layer: True  # noqa: E731
    with pytest.raises(ValueError, match="at least one"):
        SynGen([], 8, 10, select=select)
    with pytest.raises(ValueError, match=r"1\.\.7"):
        SynGen([([2], [9])], 8, 10, select=select)
    with pytest.raises(ValueError, match="different tokens"):
        SynGen([([3], [3])], 8, 10, select=select)
    with pytest.raises(ValueError, match="modifier positions, noun positions"):
        SynGen([3], 8, 10, select=select)
    with pytest.raises(ValueError, match="parser"):
        SynGenConfig(parser="nltk")
    with pytest.raises(ValueError, match="model config"):
        SynGen([([2], [3])], 8, 10)
    # the short forms: an int for a one-piece word
    assert SynGen([(2, 3), ([2, [4, 5]], 6)], 8, 10, select=select).pairs == [([[2]], [3]), ([[2], [4, 5]], [6])]


# --------------------------------------------------------------------------------------- a tiny random SD

@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return Pipeline(build_model(tiny(image_size=32)).eval())


RUN = dict(steps=5, height=32, width=32, n=2, seed=7, sampler="ddim", return_latents=True)


def reference_run(pipe, prompt, pairs, layers, config):
    eot = pipe.tokenizer.ids(prompt).index(pipe.tokenizer.eos_id)
    context = pipe.encode_prompts([prompt])
    model = pipe.model

    def unet_one(latent, t):
        return model.unet(latent, torch.tensor([t]), context)
    from regulation.attend_excite import default_layers   # SynGen's default: the authors' attn_res = 16
    select = LayerSelector(layers or default_layers(pipe.cfg), pipe.cfg)
    ref = ReferenceSynGen(unet_one, pairs, eot, select, config.scale_factor,
                          config.max_iter_to_alter)
    return pipe(prompt, hooks=[ref], **RUN), ref


@pytest.mark.parametrize("prompt, pairs, layers", [
    (PROMPT, None, None),
    ("a small fluffy capybara on a wooden table", None, ("8x8",)),
])
def test_whole_run_equals_reference(pipe, prompt, pairs, layers):
    config = SynGenConfig(max_iter_to_alter=3)
    hook = make_syngen(pipe, prompt, RUN["steps"], layers=layers, pairs=pairs, config=config)
    if "capybara" in prompt:
        assert len(hook.pairs[0][1]) > 1          # a noun of several pieces
    ours = pipe(prompt, hooks=[hook], **RUN)
    ref, ref_hook = reference_run(pipe, prompt, hook.pairs, layers, config)
    plain = pipe(prompt, **RUN)
    assert list(hook.history) == [0, 1, 2] == list(ref_hook.losses)
    for i in hook.history:
        assert hook.history[i]["loss"] == pytest.approx(ref_hook.losses[i], rel=1e-5, abs=1e-6)
    assert hook._layers and hook._layers == ref_hook.layers     # the layers LayerSelector(layers) picks
    # Sampling on a random model amplifies float32 rounding: a 1e-7 change of the initial latents moves the final
    # ones by about 2e-6 of their scale. So the runs are compared relative to the latents' scale, and the edit
    # (the difference the hook makes) must be far larger than that tolerance.
    scale = ref.latents.abs().max().item()
    torch.testing.assert_close(ours.latents, ref.latents, rtol=1e-5, atol=1e-5 * scale)
    assert (ours.latents - plain.latents).abs().max() > 20 * 1e-5 * scale
    for a, b in zip(ours.images, ref.images):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        assert diff <= 1                          # 8-bit rounding at most


def test_one_step_equals_reference(pipe):
    """One update of a batch of two different images: each image's update is its own (the reference updates them
    one at a time)."""
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = pipe.encode_prompts([PROMPT] * 2)
    model = pipe.model

    def cond_unet(latents, t, rows=slice(None)):
        return model.unet(latents, torch.tensor([t] * latents.shape[0]), cond[rows])
    hook = make_syngen(pipe, PROMPT, 50)
    model.set_hooks([hook])
    ours = hook.edit_latents(x, 901.0, 0, cond_unet)
    from regulation.attend_excite import default_layers
    ref_hook = ReferenceSynGen(lambda latent, t: cond_unet(latent, t, slice(0, 1)), hook.pairs, hook.eot,
                               LayerSelector(default_layers(pipe.cfg), pipe.cfg))
    model.set_hooks([ref_hook])
    ref = ref_hook.edit_latents(x, 901.0, 0, None)
    model.set_hooks([])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    update = (ours - x).abs().max().item()
    assert update > 1e-4   # a hundred times the tolerance
    torch.testing.assert_close(ours - x, ref - x, rtol=1e-3, atol=1e-3 * update)   # the update to 0.1%
    assert hook.history[0]["loss"] == pytest.approx(ref_hook.losses[0], rel=1e-5)
    assert hook.history[0]["loss"][0] != pytest.approx(hook.history[0]["loss"][1], rel=1e-3)   # two different images


def test_hook_in_the_pipeline(pipe):
    hook = make_syngen(pipe, PROMPT, 3, config=SynGenConfig(max_iter_to_alter=1), log=(lines := []).append)
    assert hook.pairs == [([[2]], [3]), ([[6]], [7])] and hook.eot == 8 and hook.edit_steps == 1
    assert isinstance(hook.select, LayerSelector) and any("red -> circle" in line for line in lines)
    wanted = []
    original = hook.wants
    hook.wants = lambda layer: wanted.append((hook.step, hook._collecting)) or original(layer)
    pipe(PROMPT, hooks=[hook], steps=3, height=32, width=32, decode=False)
    assert list(hook.history) == [0] and set(hook.history[0]) == {"loss", "positive", "negative", "step_size"}
    assert {s for s, collecting in wanted if collecting} == {0}   # only its own pass, only at step 0
    with pytest.raises(TypeError, match="SynGenConfig"):
        make_syngen(pipe, PROMPT, 3, config=object())
