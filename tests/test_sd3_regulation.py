"""SD 3's joint attention through the hook protocol, and the methods that read it: the hooks see the image queries'
rows in float32, the image-to-text block is what AttentionMaps records, Attention Regulation on joint attention
equals its float64 line-by-line reference (tests/reference_joint_regulation.py), and the editors run in a tiny
SD 3.5 pipeline. tests/test_joint_lean.py compares the hooked path with the whole square's."""
from types import SimpleNamespace

import pytest
import torch

from minisd.attention import AttentionHook, cross_block
from minisd.checkpoint import build_model
from minisd.config import tiny_sd3
from minisd.maps import AttentionMaps
from minisd.pipeline_sd3 import SD3Pipeline
from regulation.attention_regulation import JointRegulation, RegulationConfig
from regulation.editors import make_editor, pick_targets, set_up
from regulation.joint_regulation import JointBlockSelector, resolve_joint_targets, t5_words

try:
    from reference_joint_regulation import reference_joint_regulate
except ImportError:
    from tests.reference_joint_regulation import reference_joint_regulate

PROMPT = "a red circle left of a blue square"


def train_t5_tokenizer(folder):
    try:
        from test_sd3 import train_t5_tokenizer as train
    except ImportError:
        from tests.test_sd3 import train_t5_tokenizer as train
    return train(folder)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    cfg = tiny_sd3(True)
    model = build_model(cfg, seed=0).eval()
    spiece = train_t5_tokenizer(tmp_path_factory.mktemp("t5"))
    return SD3Pipeline(model, spiece)


class Recorder(AttentionHook):
    understands_joint = True

    def __init__(self):
        self.seen = []

    def wants(self, layer):
        return True

    def edit_probs(self, layer, logits, probs):
        self.seen.append((layer.name, layer.hw, logits.dtype, probs.dtype, tuple(probs.shape),
                          cross_block(layer, probs).shape, probs.sum(-1)))
        return probs


@torch.no_grad()
def test_hooks_see_joint_logits_in_float32_and_explicit_path_equals_sdpa(pipe):
    g = torch.Generator().manual_seed(0)
    m = pipe.cfg.mmdit
    x, ctx, y = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 154, m.context_dim, generator=g), \
        torch.randn(2, m.adm_in_channels, generator=g)
    plain = pipe.model.mmdit(x, torch.tensor([700.0, 300.0]), y=y, context=ctx)
    rec = Recorder()
    pipe.model.set_hooks([rec])
    try:
        seen = pipe.model.mmdit(x, torch.tensor([700.0, 300.0]), y=y, context=ctx)
    finally:
        pipe.model.set_hooks([])
    assert (seen - plain).abs().max() < 1e-5 * max(1, plain.abs().max())
    assert [r[0] for r in rec.seen] == [f"model.diffusion_model.joint_blocks.{i}" for i in range(m.depth)]
    for name, hw, dl, dp, shape, block, sums in rec.seen:
        assert hw == (4, 6) and dl == dp == torch.float32
        assert shape == (2, m.num_heads, 24, 154 + 1)                  # image queries x [text, all image keys]
        assert tuple(block) == (2, m.num_heads, 24, 154)               # image queries x text keys
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)  # one softmax over every key


def test_attention_maps_read_the_image_to_text_block(pipe):
    maps = AttentionMaps([2, 3, 80], steps=[0, 1], blocks=JointBlockSelector(None, pipe.cfg))
    rec = []

    class Probe(AttentionHook):
        understands_joint = True

        def wants(self, layer):
            return maps.wants(layer)

        def edit_probs(self, layer, logits, probs):
            rec.append(cross_block(layer, probs)[maps.cond][..., [2, 3, 80]].mean(1))
            return probs

    pipe(PROMPT, steps=2, guidance=5.0, sampler="euler", hooks=[maps, Probe()], decode=False)
    out = maps.result()
    assert sorted(out) == [0, 1] and out[0].shape == (1, 3, 8, 8)   # 32 px: a 16 x 16 latent, 8 x 8 patches
    per_step = len(rec) // 2
    first = torch.stack(rec[:per_step]).mean(0)                       # (1, hw, 3) averaged over the layers
    assert torch.allclose(out[0], first.transpose(1, 2).reshape(1, 3, 8, 8), atol=1e-6)
    blocks = JointBlockSelector(None, pipe.cfg).blocks
    assert maps.layers_seen == {f"model.diffusion_model.joint_blocks.{i}" for i in blocks}


def fake_layer(n_text, hw, block=1):
    return SimpleNamespace(name=f"model.diffusion_model.joint_blocks.{block}", hw=hw, joint=True, is_cross=True,
                           text_keys=slice(0, n_text))


def image_rows(logits, n_text):
    """What a hook that understands joint attention sees of the whole square: the image queries' rows over [text
    keys, one column for all image keys, holding their log-sum-exp]."""
    rows = logits[..., n_text:, :]
    return torch.cat([rows[..., :n_text], rows[..., n_text:].logsumexp(-1, keepdim=True)], -1)


@pytest.mark.parametrize("per_image", [False, True], ids=["one-generator", "generator-per-image"])
def test_joint_regulation_equals_float64_reference(per_image):
    """Two steps (the second blends with the first's best), batch of 2 images x 2 heads under guidance (the
    unconditional half untouched), targets in CLIP's and T5's columns, in float64."""
    n_text, hw, heads = 20, (8, 8), 2
    q = n_text + 64
    targets, specials = [2, 3, 13], [0, 5, 16]
    layer = fake_layer(n_text, hw)
    # a seed: one generator per image (seed + i, from begin_run); a Generator: the batch is one problem
    hook = JointRegulation(targets, specials, num_steps=4, config=RegulationConfig(), select=lambda _: True,
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
        assert hook.wants(layer) and hook.understands_joint
        edited = hook.edit_logits(layer, logits)
        probs = hook.edit_probs(layer, logits, edited.softmax(-1))
        ref, prev = reference_joint_regulate(square[2:].reshape(4, q, q), n_text, hw, targets, specials, step, prev,
                                             ref_gens)
        ref = ref[:, n_text:]   # the image queries' rows: text keys, and the image keys' total
        assert (probs[2:].reshape(4, q - n_text, -1)[..., :n_text] - ref[..., :n_text]).abs().max() < 1e-9
        assert (probs[2:].reshape(4, q - n_text, -1)[..., -1] - ref[..., n_text:].sum(-1)).abs().max() < 1e-9
        assert torch.equal(probs[:2], logits[:2].softmax(-1)), "the unconditional half must not change"
        changed = (edited[2:] != logits[2:]).any(0).any(0).any(0).nonzero().flatten().tolist()
        assert changed == targets, "only the target text columns take the Gaussian term"


def test_block_selector_and_refusals(pipe):
    cfg = pipe.cfg
    assert cfg.default_blocks() == ("joint_blocks.1",)           # the middle third of 3 blocks
    s = JointBlockSelector("joint_blocks.0, 2", cfg)
    assert s.blocks == {0, 2}
    with pytest.raises(ValueError, match="joint_blocks.0 to joint_blocks.2"):
        JointBlockSelector("joint_blocks.3", cfg)
    with pytest.raises(ValueError, match="only regulate and attend-excite"):
        make_editor("syngen", pipe, PROMPT, [], 4)


def test_targets_resolve_in_both_tokenizers(pipe):
    lines = []
    targets = resolve_joint_targets(pipe, PROMPT, ["circle", "square"], log=lines.append)
    ids = pipe.t5_tokenizer.ids(PROMPT)
    for t in targets:
        assert t.clip and t.t5 and t.positions == t.clip + [77 + p for p in t.t5]
        assert pipe.t5_tokenizer.sp.decode([ids[p] for p in t.t5]) == t.word
    words = t5_words(pipe.t5_tokenizer, PROMPT)
    assert sum(len(p) for _, p in words) == len(ids) - 1   # word by word covers every token but end-of-text
    assert "CLIP tokens" in lines[0] and "T5 tokens" in lines[1] and "circle" in lines[1]


@pytest.mark.parametrize("method", ["regulate", "attend-excite"])
def test_editors_run_in_the_pipeline(pipe, method):
    targets = resolve_joint_targets(pipe, PROMPT, ["circle", "square"], log=None)
    editor = make_editor(method, pipe, PROMPT, targets, steps=3, seed=0)
    plain = pipe(PROMPT, steps=3, guidance=5.0, sampler="euler", decode=False, return_latents=True).latents
    edited = pipe(PROMPT, steps=3, guidance=5.0, sampler="euler", decode=False, return_latents=True,
                  hooks=[editor]).latents
    assert torch.isfinite(edited).all()
    assert (edited - plain).abs().max() > 1e-5, f"{method} changed nothing"
    if method == "regulate":
        assert set(editor.loss_table()) == {"model.diffusion_model.joint_blocks.1"}
    else:
        assert editor.history and editor.history[0]["loss_before"]


def test_set_up_for_the_command_line(pipe):
    lines = []
    targets = pick_targets(pipe, PROMPT, None, log=lines.append)
    assert [t.word for t in targets] == ["circle", "square"] and "chosen from the prompt" in lines[0]
    run = set_up("regulate", pipe, PROMPT, 4, targets=targets, seed=3, layers=None, edit_steps=None)
    assert run.settings["Regulation layers"] == "joint_blocks.1" and run.settings["Regulation edit steps"] == 2
    for method in ("syngen", "dense", "composable"):
        with pytest.raises(ValueError, match="does not run on SD 3") as e:
            set_up(method, pipe, PROMPT, 4, targets=None if method == "dense" else targets)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--layout"):
        set_up("regulate", pipe, PROMPT, 4, targets=targets, layout="a:0,0,1,1")
