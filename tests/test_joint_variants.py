"""The joint loss's variants (issue: regulation on joint attention, measured): each equals its float64 line-by-line
reference (tests/reference_joint_regulation.py), and the default is unchanged."""
import pytest
import torch

from minisd.attention import AttentionHook
from regulation.attention_regulation import JointRegulation, RegulationConfig, regulate_logits

try:
    from reference_joint_regulation import reference_joint_regulate
    from test_sd3_regulation import fake_layer, image_rows
except ImportError:
    from tests.reference_joint_regulation import reference_joint_regulate
    from tests.test_sd3_regulation import fake_layer, image_rows


@pytest.mark.parametrize("per_image", [False, True], ids=["one-generator", "generator-per-image"])
def test_one_map_per_word_equals_float64_reference(per_image):
    """A word's CLIP and T5 columns (here 2 + 13 and 3 + 14) share one W; the loss reads their summed map and tau
    counts the two words. Two steps, 2 images x 2 heads under guidance, float64."""
    n_text, hw, heads = 20, (8, 8), 2
    q = n_text + 64
    targets, words, specials = [2, 3, 13, 14], [0, 1, 0, 1], [0, 5, 16]
    layer = fake_layer(n_text, hw)
    hook = JointRegulation(targets, specials, num_steps=4, config=RegulationConfig(per_word=True),
                           select=lambda _: True, words=words,
                           generator=11 if per_image else torch.Generator().manual_seed(11))
    hook.begin_run([0, 1])
    ref_gens = [torch.Generator().manual_seed(s) for s in (11, 12)] if per_image else \
        torch.Generator().manual_seed(11)
    prev = None
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        square = torch.randn(4, heads, q, q, generator=g, dtype=torch.float64) * 2
        logits = image_rows(square, n_text)
        hook.begin_step(step, slice(2, 4))
        edited = hook.edit_logits(layer, logits)
        probs = hook.edit_probs(layer, logits, edited.softmax(-1))
        ref, prev = reference_joint_regulate(square[2:].reshape(4, q, q), n_text, hw, targets, specials, step, prev,
                                             ref_gens, words=words)
        ref = ref[:, n_text:]
        assert (probs[2:].reshape(4, q - n_text, -1)[..., :n_text] - ref[..., :n_text]).abs().max() < 1e-9
        assert (probs[2:].reshape(4, q - n_text, -1)[..., -1] - ref[..., n_text:].sum(-1)).abs().max() < 1e-9
        # a word's columns take the same Delta
        delta = (edited - logits)[2:]
        assert torch.allclose(delta[..., 2], delta[..., 13]) and torch.allclose(delta[..., 3], delta[..., 14])
        assert not torch.allclose(delta[..., 2], delta[..., 3])


def test_one_word_per_column_is_the_released_optimiser():
    """words = each column its own word gives the per-column result exactly (the default path)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, 30, generator=g, dtype=torch.float64) * 2
    a, sa = regulate_logits(logits, (8, 8), [3, 7, 9], 0, None, torch.Generator().manual_seed(5))
    b, sb = regulate_logits(logits, (8, 8), [3, 7, 9], 0, None, torch.Generator().manual_seed(5),
                            RegulationConfig(per_word=True), words=[0, 1, 2])
    assert torch.equal(a, b) and torch.equal(sa.weights, sb.weights)


def test_words_must_name_each_target():
    logits = torch.randn(2, 64, 30, dtype=torch.float64)
    with pytest.raises(ValueError, match="words must give each"):
        regulate_logits(logits, (8, 8), [3, 7], 0, None, None, words=[0])
    with pytest.raises(ValueError, match="words must give each"):
        regulate_logits(logits, (8, 8), [3, 7], 0, None, None, words=[0, 2])


class JointRows(AttentionHook):
    """Records each joint layer's image rows (text keys and the image keys' total), per head."""
    understands_joint = True

    def __init__(self):
        self.rows = []

    def wants(self, layer):
        return True

    def edit_probs(self, layer, logits, probs):
        self.rows.append(probs.detach().clone())
        return probs


@pytest.mark.parametrize("joint_maps", ["joint", "text"])
def test_attend_excite_reads_joint_or_text_renormalised_maps(joint_maps, monkeypatch):
    """Attend-and-Excite's maps on joint attention, float64: "joint" the joint softmax's text columns (rows sum below
    1), "text" each head's row renormalised over the text keys before the mean over heads and blocks (rows sum to 1),
    both from the joint rows that a recording hook sees in the same pass."""
    from minisd.checkpoint import build_model
    from minisd.config import tiny_sd3
    from regulation.attend_excite import AttendExciteConfig, JointAttendExcite
    try:
        from test_joint_lean import TEXT, run
    except ImportError:
        from tests.test_joint_lean import TEXT, run

    model = build_model(tiny_sd3(True), seed=0).eval()

    def collect(hooks, mmdit, xs):
        x, t, y, ctx = xs
        hooks[1].rows.clear()   # only the conditional pass's rows
        return hooks[0]._attention(x[1:], t[1:], lambda x, t: mmdit(x, t, y=y[1:], context=ctx[1:])), hooks[1]
    make = lambda: [JointAttendExcite([[2], [5, 6]], 4, AttendExciteConfig(joint_maps=joint_maps),
                                      select=lambda layer: True), JointRows()]
    maps, recorder = run(model, torch.float64, make, False, monkeypatch, then=collect)
    text = [r[..., :TEXT] for r in recorder.rows]                      # (1, heads, image, text) per block
    if joint_maps == "text":
        text = [t / t.sum(-1, keepdim=True) for t in text]
    want = torch.cat(text, 1).mean(1).view(maps.shape)
    assert (maps - want).abs().max() < 1e-12
    rows = maps.sum(-1)
    assert (rows - 1).abs().max() < 1e-12 if joint_maps == "text" else rows.max() < 1 - 1e-3
    with pytest.raises(ValueError, match="joint_maps"):
        AttendExciteConfig(joint_maps="rows")


# --- targets in both streams -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    from minisd.checkpoint import build_model
    from minisd.config import tiny_sd3
    from minisd.pipeline_sd3 import SD3Pipeline
    try:
        from test_sd3 import train_t5_tokenizer
    except ImportError:
        from tests.test_sd3 import train_t5_tokenizer
    return SD3Pipeline(build_model(tiny_sd3(True), seed=0).eval(), train_t5_tokenizer(tmp_path_factory.mktemp("t5")))


def t5_text(pipe, target):
    return pipe.t5_tokenizer.sp.decode([pipe.t5_tokenizer.ids(PROMPT2)[p] for p in target.t5])


PROMPT2 = "a big dog on a hill, a small dog under a blue cube"


def test_phrases_and_occurrences_resolve_alike_in_clip_and_t5(pipe):
    from regulation.joint_regulation import resolve_joint_targets
    lines = []
    phrase, second, comma = resolve_joint_targets(pipe, PROMPT2, ["blue cube", "dog#2", "hill"], log=lines.append)
    assert t5_text(pipe, phrase) == "blue cube" and len(phrase.clip) == 2
    assert t5_text(pipe, second) == "dog" and second.t5 != resolve_joint_targets(pipe, PROMPT2, ["dog"], None)[0].t5
    assert second.clip == resolve_joint_targets(pipe, PROMPT2, ["dog#2"], None)[0].clip
    assert t5_text(pipe, comma) == "hill" and comma.positions == comma.clip + [77 + p for p in comma.t5]
    assert not any("only" in line for line in lines)


def test_a_target_that_one_stream_does_not_read_is_regulated_in_the_other_said_in_one_line(pipe):
    from regulation.joint_regulation import resolve_joint_targets
    long = "a," * 80 + " on a hill"            # CLIP's 77 tokens end before "hill"; T5 reads it (170 characters)
    lines = []
    (t,) = resolve_joint_targets(pipe, long, ["hill"], log=lines.append)
    assert t.clip == [] and t.t5 and t.positions == [77 + p for p in t.t5]
    assert any(line == "target 'hill' is not in CLIP's 77 tokens: regulated in T5's columns only" for line in lines)
    # --t5-length shorter than the prompt: T5 cuts "cube", CLIP reads it; T5's end-of-text is its last key
    pipe.t5_tokenizer.length = 6
    try:
        lines = []
        (t,) = resolve_joint_targets(pipe, PROMPT2, ["cube"], log=lines.append)
        assert t.t5 == [] and t.clip and t.positions == t.clip
        assert any("not in T5's reading of the prompt: regulated in CLIP's columns only" in line for line in lines)
        from regulation.joint_regulation import special_columns
        assert special_columns(pipe, PROMPT2)[-1] == 77 + 5
    finally:
        pipe.t5_tokenizer.length = None
    # Attend-and-Excite reads CLIP's columns only: a target outside them is refused, said so
    from regulation.attend_excite import make_editor
    with pytest.raises(Exception, match="not in CLIP's 77 tokens"):
        make_editor(pipe, long, [resolve_joint_targets(pipe, long, ["hill"], None)[0]], 4)


def test_t5_reads_past_226_characters_with_a_length(pipe):
    from regulation.joint_regulation import t5_positions
    long = "a dog " * 40 + "on a hill"      # 249 characters: "hill" is past the reference's 226
    assert t5_positions(pipe.t5_tokenizer, long, "hill") == []
    pipe.t5_tokenizer.length = 256
    try:
        assert t5_positions(pipe.t5_tokenizer, long, "hill") != []
    finally:
        pipe.t5_tokenizer.length = None
