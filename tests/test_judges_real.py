"""tools/eval/real_judges.py: the CLIP scorer and the OWLv2 detector, each built from a tiny random-weight config of the
transformers class it loads, saved with its processor to a folder and loaded back by path, as a user's local copy
of the real weights would be. The scores are checked against the model's own outputs computed here, and the
judges run inside tools.eval.evaluate on the tiny UNet, their numbers landing in results.csv and table.md."""
import csv
import gzip
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from minisd.checkpoint import build_model, save_checkpoint   # noqa: E402
from minisd.config import tiny                               # noqa: E402
from minisd.tokenizer import DEFAULT_VOCAB                   # noqa: E402
from tools.eval import evaluate, real_judges                      # noqa: E402

TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def clip_tokenizer(folder, max_length):
    """transformers' CLIPTokenizer over CLIP's real vocabulary (the .gz minisd ships, as CLIP derives it)."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_chars = [chr(b) for b in keep] + [chr(256 + n) for n in range(256 - len(keep))]
    merges = gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    major = int(transformers.__version__.split(".")[0])
    cls = transformers.CLIPTokenizer if major >= 5 else transformers.CLIPTokenizerFast
    return cls.from_pretrained(str(folder), model_max_length=max_length, pad_token="!")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=dict(TEXT, max_position_embeddings=77), vision_config=VISION,
                                     projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(root / "model")
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor,
                               tokenizer=clip_tokenizer(root / "tok", 77)).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("owl")
    torch.manual_seed(0)
    config = transformers.Owlv2Config(text_config=dict(TEXT, max_position_embeddings=16), vision_config=VISION,
                                      projection_dim=32)   # OWL's class head maps image features to the text width
    model = transformers.Owlv2ForObjectDetection(config)
    # random shift and scale layers of the class head push every logit far out, where every sigmoid is 1.0;
    # zeroed, a logit is the cosine of box and query embeddings, and the scores spread over (0.27, 0.73)
    with torch.no_grad():
        for layer in (model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.zero_()
            layer.bias.zero_()
    model.save_pretrained(root / "model")
    image_processor = transformers.Owlv2ImageProcessor(size={"height": 32, "width": 32})
    transformers.Owlv2Processor(image_processor=image_processor,
                                tokenizer=clip_tokenizer(root / "tok", 16)).save_pretrained(root / "model")
    return root / "model"


def photo(seed, size=48):
    """A real image tensor: uint8 (H, W, 3), what the pipeline's PIL images become for a judge."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_clip_scores_are_cosine_similarities_with_the_prompt_and_the_templated_objects(clip_dir):
    scorer = real_judges.ClipScore(str(clip_dir), template="a drawing of a {}")
    image = photo(0)
    got = scorer.scores(image, "a cat and a red car", ["cat", ("red", "car")])

    # the same numbers straight from the model, the texts written out by hand
    model = transformers.CLIPModel.from_pretrained(clip_dir)
    proc = transformers.AutoProcessor.from_pretrained(clip_dir)
    texts = ["a cat and a red car", "a drawing of a cat", "a drawing of a red car"]
    with torch.no_grad():
        pixels = proc(images=image, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pixels)
        img = getattr(img, "pooler_output", img)
        tok = proc.tokenizer(texts, padding=True, return_tensors="pt")
        txt = model.get_text_features(**tok)
        txt = getattr(txt, "pooler_output", txt)
    sims = torch.nn.functional.cosine_similarity(img, txt)
    assert got["clip_prompt"] == pytest.approx(float(sims[0]), abs=1e-5)
    assert got["clip_min_object"] == pytest.approx(float(sims[1:].min()), abs=1e-5)
    # the template is honoured: another one gives the other texts' similarity
    plain = real_judges.ClipScore(str(clip_dir)).scores(image, "a cat and a red car", ["cat", ("red", "car")])
    assert plain["clip_prompt"] == pytest.approx(got["clip_prompt"], abs=1e-6)
    assert plain["clip_min_object"] != pytest.approx(got["clip_min_object"], abs=1e-6)
    assert set(scorer.scores(image, "a cat", None)) == {"clip_prompt"}
    with pytest.raises(ValueError, match="one {}"):
        real_judges.ClipScore(str(clip_dir), template="a photo")


def test_detector_thresholds_queries_and_box_assignment(owl_dir):
    image = photo(1, 40)
    det = real_judges.OwlDetector(str(owl_dir), threshold=0.0, template="an image of a {}")
    objects = ["cat", ("red", "car")]
    assert det.queries(objects) == (["an image of a cat", "an image of a red car"], [0, 1])
    assert real_judges.OwlDetector(str(owl_dir), query="noun").queries(objects)[0] == ["a photo of a cat",
                                                                                       "a photo of a car"]
    scores = det.presence_scores(image, objects)

    # independently: every box gets its best query (transformers' post-processing rule) and that query's score
    model = transformers.Owlv2ForObjectDetection.from_pretrained(owl_dir)
    proc = transformers.AutoProcessor.from_pretrained(owl_dir)
    with torch.no_grad():
        logits = model(**proc(text=[["an image of a cat", "an image of a red car"]], images=image,
                              return_tensors="pt")).logits[0]
    best, label = logits.sigmoid().max(-1)
    expected = [float(best[label == q].max()) if (label == q).any() else 0.0 for q in range(2)]
    assert scores == pytest.approx(expected, abs=1e-6)
    assert all(0 < s < 1 for s in scores if s) and any(scores)

    # the threshold decides: just below a score counts the object, just above does not
    top = max(scores)
    k = scores.index(top)
    assert real_judges.OwlDetector(str(owl_dir), threshold=top - 1e-4, template="an image of a {}")(image, objects)[k]
    assert not any(real_judges.OwlDetector(str(owl_dir), threshold=min(1.0, top + 1e-4),
                                           template="an image of a {}")(image, objects))
    with pytest.raises(ValueError, match="probability"):
        real_judges.OwlDetector(str(owl_dir), threshold=1.5)


def test_missing_weights_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load CLIPModel from"):
        real_judges.ClipScore(str(tmp_path / "nowhere"))


def test_both_judges_in_the_evaluation_land_in_rows_and_table(clip_dir, owl_dir, tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model(tiny(image_size=32)), ckpt)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat and a dog\n")
    out = tmp_path / "eval"
    summary = evaluate.main(["--checkpoint", str(ckpt), "--prompts", str(prompts), "--seeds", "2", "--steps", "3",
                             "--threads", "1", "--out", str(out),
                             "--judge", "tools.eval.real_judges:OwlDetector,tools.eval.real_judges:ClipScore",
                             "--detector-model", str(owl_dir), "--detector-threshold", "0.0",
                             "--clip-model", str(clip_dir)])
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for r in rows:
        assert json.loads(r["objects"]) == ["cat", "dog"]        # from the detector's objects_for
        assert r["found"] == "1 1"                                # threshold 0: every best box counts
        assert set(json.loads(r["scores"])) == {"clip_prompt", "clip_min_object"}
        assert "threshold=0.0" in r["settings"] and str(clip_dir) in r["settings"]
    mean = np.mean([json.loads(r["scores"])["clip_prompt"] for r in rows if r["method"] == "plain"])
    assert summary["plain"]["scores"]["clip_prompt"] == pytest.approx(mean)
    table = (out / "table.md").read_text()
    assert "| clip_prompt | clip_min_object |" in table and f"| {mean:.4f} |" in table
    # the threshold is part of the settings: another one cannot mix into these results
    with pytest.raises(SystemExit, match="other settings"):
        evaluate.main(["--checkpoint", str(ckpt), "--prompts", str(prompts), "--seeds", "2", "--steps", "3",
                       "--out", str(out), "--judge", "tools.eval.real_judges:OwlDetector",
                       "--detector-model", str(owl_dir), "--detector-threshold", "0.5"])


def test_the_judges_flags_are_in_the_help_when_named(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--judge", "tools.eval.real_judges:OwlDetector,tools.eval.real_judges:ClipScore", "--help"])
    text = capsys.readouterr().out
    assert "--detector-threshold" in text and "--clip-template" in text
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    assert "--detector-threshold" not in capsys.readouterr().out
