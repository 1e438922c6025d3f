"""The tiny SD 3.5 testbed's tools (tools/testbed/train_sd3.py, tools/testbed/diagnose_sd3.py) on a toy budget: every
stage runs, resumes, and writes an official-layout SD 3.5 file that the loader, the pipeline and the command line
read as they read a real one, its T5 tokenizer carried in the file."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from minisd.loading import load_model
from minisd.pipeline_sd3 import SD3Pipeline
from tools.testbed import diagnose_sd3, train_sd3

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "minisd-shapes.safetensors"
TOY = ["--threads", "1", "--t5-steps", "2", "--t5-batch", "8", "--t5-pool", "32", "--t5-eval", "4",
       "--dataset", "64", "--batch", "4", "--depth", "2", "--width", "32", "--heads", "2", "--save-every", "1",
       "--base", str(SHIPPED)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3testbed")
    out, run = tmp / "m.safetensors", tmp / "run"
    train_sd3.main(["--out", str(out), "--run", str(run), "--mmdit-steps", "2"] + TOY)
    first = load_model(out).mmdit.state_dict()
    # rerun with more steps: the run resumes from its state (the T5 stage is not repeated)
    t5_state = (run / "t5.pt").stat().st_mtime
    train_sd3.main(["--out", str(out), "--run", str(run), "--mmdit-steps", "3"] + TOY)
    assert (run / "t5.pt").stat().st_mtime == t5_state
    return out, run, first


def test_training_writes_the_official_sd35_layout_with_frozen_text_encoders(toy):
    out, run, first = toy
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "text_encoders"}
    assert {k.split(".")[1] for k in keys if k.startswith("text_encoders.")} == {"clip_l", "clip_g", "t5xxl"}
    model = load_model(out)
    base = load_model(SHIPPED)
    assert model.cfg.mmdit.patch_size == 2 and model.cfg.prediction == "flow" and model.cfg.shift == 1.0
    # the shipped tiny CLIP in both CLIP slots, its VAE: unchanged by training
    mine = model.text_encoders.clip_l.text_model.state_dict()
    for k, v in base.cond_stage_model.text_model.state_dict().items():
        assert torch.equal(mine[k].float(), v.half().float()), k
        assert torch.equal(model.text_encoders.clip_g.text_model.state_dict()[k], mine[k])
    for k, v in base.first_stage_model.state_dict().items():
        assert torch.equal(model.first_stage_model.state_dict()[k].float(), v.half().float()), k
    # the MMDiT moved on between the two runs (resumed, not restarted from the same state)
    assert any(not torch.equal(v, model.mmdit.state_dict()[k]) for k, v in first.items())


def test_the_written_file_generates_through_the_pipeline_with_its_own_t5_tokenizer(toy):
    out, run, _ = toy
    pipe = SD3Pipeline.from_checkpoint(out)
    assert pipe.t5_tokenizer.pieces("a red circle")[1:3] == ["▁red", "▁circle"]
    r = pipe("a red circle and a blue square", steps=2, seed=0)
    assert np.asarray(r.images[0]).shape == (128, 128, 3)


def test_flow_timesteps_follow_the_shift():
    g = torch.Generator().manual_seed(0)
    plain = train_sd3.flow_timesteps(20000, 1.0, g)
    g = torch.Generator().manual_seed(0)
    shifted = train_sd3.flow_timesteps(20000, 3.0, g)
    assert 0 < plain.min() and plain.max() < 1 and abs(plain.median() - 0.5) < 0.02
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))
    assert shifted.median() > 0.7   # more of training at high noise, where sampling with shift 3 spends its steps


def test_sincos_table_is_distinct_per_position():
    t = train_sd3.sincos_2d(32, 8)
    assert t.shape == (64, 32)
    assert torch.cdist(t, t).add(torch.eye(64) * 10).min() > 0.1


def test_diagnose_sd3_reports_every_block_and_band(toy, capsys):
    out, _, _ = toy
    res = diagnose_sd3.diagnose(out, steps=3, seeds_a=1, n_two=2, seeds_b=1, regulate=True, log=print)
    rows = res["bd"]["blocks"]
    assert {(r["block"], r["band"]) for r in rows} == {(b, s) for b in range(2) for s in range(diagnose_sd3.BANDS)}
    # every image query gives the text keys a share of its attention, and a noun's mass splits over CLIP and T5
    assert all(0 < r["text_share"] < 1 and 0 < r["clip_share"] < 1 for r in rows)
    # regulated: the maps are read after the edit, which moves the text share in the block it edits (block 0 of 2)
    edited = res["bd_regulated"]["blocks"]
    assert edited[0]["text_share"] != rows[0]["text_share"]
    assert [r["text_share"] for r in edited[3:]] == pytest.approx([r["text_share"] for r in rows[3:]], abs=0.2)
    out_text = capsys.readouterr().out
    assert "block  band" in out_text and "two-object held-out prompts, regulated" in out_text


def test_the_fair_tables_stages_run_on_the_sd3_testbed(toy, tmp_path, monkeypatch):
    """tools.eval.paper_table on an SD 3 file: the blocks stage (regulation one band of joint blocks at a time),
    the options stage (the joint loss's alternatives), the validation grid with Attend-and-Excite's step size on
    joint attention, and the test stage."""
    from tools.eval import paper_table as pt
    monkeypatch.setattr(pt, "SCORER", "tests.test_paper_table:FakeScore")
    out_file, _, _ = toy
    out = tmp_path / "table"
    common = ["--out", str(out), "--checkpoint", str(out_file), "--limit", "1", "--steps", "2", "--threads", "1"]
    pt.main(["blocks", *common, "--bands", "2"])
    blocks = (out / "blocks.md").read_text()
    assert "| 0-0 | [0.00, 0.50) |" in blocks and "| 1-1 | [0.50, 1.00) |" in blocks
    rows = (out / "blocks" / "results.csv").read_text()
    assert "regulate[nouns] blocks 1-1" in rows
    pt.main(["options", *common])
    text = (out / "options.md").read_text()
    for name in ("map per column", "map per word", "joint maps", "maps over the text"):
        assert name in text, name
    choices = pt.main(["validate", *common, "--methods", "regulate,attend-excite"])
    assert set(choices) == {"regulate", "attend-excite"}
    assert "attend-excite[nouns] step size=5" in (out / "validation" / "results.csv").read_text()
    pt.main(["test", *common, "--methods", "regulate,attend-excite"])
    assert "| Attend-and-Excite | authors' defaults |" in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="not an SD 3 file"):
        pt.main(["blocks", "--out", str(out), "--checkpoint", str(SHIPPED), "--limit", "1"])


def test_bands_cut_the_depth_into_near_equal_runs():
    from tools.eval.paper_table import bands
    assert bands(6) == [[0, 1], [2, 3], [4, 5]]
    assert bands(24) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert bands(7) == [[0, 1], [2, 3, 4], [5, 6]]
    assert sum(bands(38), []) == list(range(38))


def test_training_goes_on_from_a_written_file_when_the_run_folder_is_lost(toy, tmp_path):
    out, _, _ = toy
    run, again = tmp_path / "run", tmp_path / "again.safetensors"
    run.mkdir()
    (run / "stray").write_text("")
    with pytest.raises(SystemExit, match="not empty"):
        train_sd3.main(["--out", str(again), "--run", str(run), "--mmdit-steps", "4", "--resume-from", str(out)] + TOY)
    (run / "stray").unlink()
    train_sd3.main(["--out", str(again), "--run", str(run), "--mmdit-steps", "4", "--resume-from", str(out)] + TOY)
    a, b = load_model(out), load_model(again)
    # the frozen T5 and its tokenizer carried over; the MMDiT took one more step (3 -> 4) from the file's weights
    t5 = b.text_encoders.t5xxl.state_dict()
    assert all(torch.equal(v, t5[k]) for k, v in a.text_encoders.t5xxl.state_dict().items())
    assert a.metadata["minisd_t5_spiece"] == b.metadata["minisd_t5_spiece"]
    assert b.metadata["minisd_mmdit_step"] == "4"
    moved = [not torch.equal(v, b.mmdit.state_dict()[k]) for k, v in a.mmdit.state_dict().items()]
    assert any(moved)


def test_patch_1_and_the_shift_reach_the_written_file(tmp_path):
    """The other patch size (256 image tokens at 128 px): the loader reads it back from the weights' shapes."""
    out = tmp_path / "p1.safetensors"
    train_sd3.main(["--out", str(out), "--run", str(tmp_path / "run"), "--mmdit-steps", "1", "--patch", "1",
                    "--shift", "3"] + TOY)
    model = load_model(out)
    assert model.cfg.mmdit.patch_size == 1 and model.cfg.shift == 3.0
    r = SD3Pipeline.from_model(model, out)("a red circle", steps=1, seed=0)
    assert np.asarray(r.images[0]).shape == (128, 128, 3)


SHIPPED_SD3 = SHIPPED.parent / "minisd-shapes-sd3.safetensors"


@pytest.mark.skipif(not SHIPPED_SD3.is_file(), reason="the tiny SD 3.5 is not in this checkout")
def test_the_shipped_sd3_file_runs_the_readme_command(tmp_path, capsys):
    """The file in weights/: the official SD 3.5 layout, its tokenizer and step in the metadata, and the command line
    regulates on it, printing both tokenizers' tables and writing the maps. Under 21 MB: the two CLIP slots' token
    tables (49,408 x 64 each) take 12.6 MB of it, and the issue's 20 MB is 0.8 MB short of the file with an MMDiT of
    2 M parameters (weights/README.md)."""
    from minisd import sample
    assert SHIPPED_SD3.stat().st_size < 21e6
    model = load_model(SHIPPED_SD3)
    assert model.cfg.is_sd3 and model.cfg.name == "minisd-shapes-sd3"
    assert int(model.metadata["minisd_mmdit_step"]) > 0 and model.metadata["minisd_t5_spiece"]
    out = tmp_path / "img.png"
    sample.main(["--checkpoint", str(SHIPPED_SD3), "--prompt", "a picture of a green star and a yellow cross",
                 "--regulate", "--save-attention", str(tmp_path / "maps"), "--steps", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert "CLIP tokens:" in text and "T5 tokens (key = 77 + position):" in text and "▁star" in text
    assert out.is_file() and any((tmp_path / "maps").iterdir())
