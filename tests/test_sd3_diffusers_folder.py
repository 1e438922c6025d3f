"""An SD 3 / 3.5 diffusers folder as the checkpoint: diffusers' own StableDiffusion3Pipeline, built as test_sd3.py
builds it (tiny, random, read from an official-layout file), written by `save_pretrained`, then read by minisd
through the renaming rules of minisd/diffusers_folder.py. Its weights equal the single file's, key for key, and the
4-step pipeline's final latents equal diffusers'."""
import shutil

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers writes the folder and is the reference")
pytest.importorskip("sentencepiece")

from minisd.checkpoint import CheckpointError  # noqa: E402
from minisd.loading import load_model  # noqa: E402
from minisd.pipeline import Pipeline  # noqa: E402
from minisd.pipeline_sd3 import SD3Pipeline  # noqa: E402
from minisd.sample import main  # noqa: E402

try:
    from test_sd3 import NEGATIVE, PROMPTS, assert_close, build, diffusers_without_t5, run_both
except ImportError:
    from tests.test_sd3 import NEGATIVE, PROMPTS, assert_close, build, diffusers_without_t5, run_both


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """SD 3.5 Medium's shape (qk norm, attn2 in blocks 0 and 1, the last block's pre-only text stream)."""
    tmp = tmp_path_factory.mktemp("sd3-folder")
    s = build(tmp, dual=True)
    s.diffusers = tmp / "diffusers"
    s.theirs.save_pretrained(s.diffusers)
    # transformers 5 writes T5's tokenizer as tokenizer.json only; the official folders also hold spiece.model
    shutil.copy(s.spiece, s.diffusers / "tokenizer_3" / "spiece.model")
    s.folder = SD3Pipeline.from_checkpoint(s.diffusers)
    return s


def copy_without(sd3, tmp_path, *parts):
    folder = tmp_path / "folder"
    shutil.copytree(sd3.diffusers, folder, ignore=lambda d, names: [n for n in names if n in parts])
    return folder


def test_folder_weights_are_the_single_files(sd3):
    """Every key of the single file, each tensor equal: the q, k, v fused back, (scale, shift) swapped back."""
    assert isinstance(sd3.folder, SD3Pipeline)
    mine, ref = sd3.folder.model.state_dict(), sd3.model.state_dict()
    assert mine.keys() == ref.keys()
    assert [k for k in ref if not torch.equal(mine[k], ref[k])] == []
    # the family's defaults, as for the same weights in an official single file (shape: SD 3.5 Medium)
    assert (sd3.folder.cfg.name, sd3.folder.cfg.shift, sd3.folder.cfg.image_size) == ("sd3.5-medium", 3.0, 32)
    assert sd3.folder.cfg.mmdit == sd3.cfg.mmdit


def test_folder_pipeline_matches_diffusers_and_the_single_file(sd3):
    """4 steps, Euler, guidance 5 with negative prompts: final latents within the float32 tolerance of diffusers' pipeline (the one
    that wrote the folder), and those of minisd reading the single file."""
    ref, out, ref64 = run_both(sd3, 5.0, NEGATIVE, mine=sd3.folder)
    assert_close(ref, out, ref64)
    assert ref.abs().max() > 0.1
    _, single, _ = run_both(sd3, 5.0, NEGATIVE)
    assert torch.equal(single, out), "the same weights from a folder and from a file gave different latents"


def test_folder_without_t5(sd3, tmp_path, capsys):
    """No text_encoder_3/ (nor tokenizer_3/): one line says so, zeros stand in, as diffusers' pipeline without it."""
    mine = SD3Pipeline.from_checkpoint(copy_without(sd3, tmp_path, "text_encoder_3", "tokenizer_3"))
    said = [line for line in capsys.readouterr().out.splitlines() if "text_encoder_3" in line]
    assert len(said) == 1 and "zeros" in said[0]
    assert not mine.model.text_encoders.has_t5
    ref, out, ref64 = run_both(sd3, 5.0, NEGATIVE, mine, diffusers_without_t5(sd3), steps=2)
    assert_close(ref, out, ref64)


@pytest.mark.parametrize("part, says", [
    ("transformer", "no unet/, nor SD 3's transformer/"), ("vae", "vae/config.json"),
    ("text_encoder", "text_encoder/config.json"), ("text_encoder_2", "text_encoder_2/config.json"),
])
def test_folder_missing_a_part_is_named(sd3, tmp_path, part, says):
    with pytest.raises(CheckpointError) as e:
        load_model(copy_without(sd3, tmp_path, part))
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_folder_missing_weights_or_t5_tokenizer_is_named(sd3, tmp_path):
    folder = copy_without(sd3, tmp_path, "spiece.model")
    with pytest.raises(CheckpointError) as e:
        SD3Pipeline.from_checkpoint(folder)
    assert "tokenizer_3/spiece.model" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(SD3Pipeline.from_checkpoint(folder, t5_tokenizer=sd3.spiece), SD3Pipeline)  # or by flag
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="text_encoder_2: no diffusion_pytorch_model.safetensors"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="the folder .* has its own"):
        load_model(sd3.diffusers, text_files={"clip_l": sd3.path})


def test_folder_as_checkpoint_on_the_command_line(sd3, tmp_path, capsys):
    out = tmp_path / "x.png"
    main(["--checkpoint", str(sd3.diffusers), "--prompt", PROMPTS[0], "--steps", "1", "--out", str(out)])
    assert out.is_file()


def test_sd3_medium_shaped_folder(tmp_path):
    """SD 3 Medium's shape (no qk norm, no attn2): the same weights as its single file, and SD 3 Medium's defaults
    (shift 3.0, as the code released with it and the folder's scheduler config; docs/sd3.md, defaults by file)."""
    s = build(tmp_path, dual=False)
    s.theirs.save_pretrained(tmp_path / "diffusers")
    model = load_model(tmp_path / "diffusers")
    mine, ref = model.state_dict(), s.model.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert (model.cfg.name, model.cfg.shift, model.cfg.default_sampler) == ("sd3-medium", 3.0, "dpmpp_2m")


def test_sd_pipeline_names_the_sd3_one(sd3):
    """Pipeline reads SD 1.x, 2.x and SDXL; given SD 3 it names the class that reads it (the command line chooses)."""
    with pytest.raises(CheckpointError, match=r"SD3Pipeline\.from_checkpoint"):
        Pipeline.from_checkpoint(sd3.diffusers)
