"""Bad input on the SD 3 path, as tests/test_cli_bad_input.py does for the UNet's: each mistake is one `error:` line
with exit status 2, no traceback, nothing written, no sampling. A text encoder's own file that is the wrong model is
named (with its flag) in the error, not the main checkpoint; a T5 tokenizer that is not T5's, or not these
weights', is refused."""
import random
from pathlib import Path

import pytest
from safetensors.torch import save_file

import minisd.pipeline_sd3
from minisd.checkpoint import build_model, save_checkpoint
from minisd.config import tiny, tiny_sd3
from minisd.sample import main

try:
    from test_sd3 import official_state, train_t5_tokenizer
except ImportError:
    from tests.test_sd3 import official_state, train_t5_tokenizer

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """A tiny SD 3.5 file, its text encoders as files of their own (the official layout: no prefix), T5's
    tokenizer beside it, and tokenizers that are wrong in each way."""
    sp = pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("sd3-bad")
    cfg = tiny_sd3(True)
    state = official_state(cfg, seed=7)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "tiny-sd3.5.safetensors"),
              metadata={"minisd_config": cfg.to_json()})
    for name in ("clip_l", "clip_g", "t5xxl"):
        prefix = f"text_encoders.{name}.transformer."
        save_file({k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)},
                  str(tmp / f"{name}.safetensors"))
    train_t5_tokenizer(tmp / "tokenizer_3")
    (tmp / "empty").mkdir()
    (tmp / "not-sentencepiece.model").write_text("not a SentencePiece model")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    (tmp / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(3000)))
    # LLaMA's layout (unknown 0, start 1, end 2): a SentencePiece model, not T5's
    sp.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "other-ids"),
                                  vocab_size=60, minloglevel=2)
    # T5's ids, but more pieces than the tiny T5 embeds (300 rows)
    sp.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "too-big"),
                                  vocab_size=400, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    save_checkpoint(build_model(tiny(image_size=32)), tmp / "tiny-unet.safetensors")
    return tmp


@pytest.fixture
def no_sampling(monkeypatch):
    def forbidden(*a, **kw):
        raise AssertionError("sampling started")
    monkeypatch.setattr(minisd.pipeline_sd3.SD3Pipeline, "__call__", forbidden)


def refused(capsys, tmp, argv, checkpoint="tiny-sd3.5.safetensors"):
    """Exit status 2, one `error:` line and nothing else but warnings, no traceback, nothing written."""
    out = tmp / "out"
    capsys.readouterr()
    try:
        main(["--checkpoint", str(tmp / checkpoint), "--prompt", PROMPT, "--steps", "1", "--out", str(out), *argv])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and all(x.startswith(("error:", "warning:")) for x in lines), err
    assert not out.exists(), "something was written"
    return errors[0]


@pytest.mark.parametrize("argv, message", [
    (["--t5-tokenizer", "{tmp}/empty"], "is a folder without spiece.model"),
    (["--t5-tokenizer", "{tmp}/not-sentencepiece.model"], "is not a SentencePiece model"),
    (["--t5-tokenizer", "{tmp}/missing.model"], "no such file"),
    (["--t5-tokenizer", "{tmp}/other-ids.model"], "is not T5's tokenizer: its padding and end-of-text ids are"),
    (["--t5-tokenizer", "{tmp}/too-big.model"], "has 400 pieces but the T5 weights embed 300 tokens"),
    (["--t5-length", "0"], "--t5-length must be at least 1"),
    (["--t5-length", "-5"], "--t5-length must be at least 1"),
    (["--shift", "0"], "--shift must be a finite number > 0"),
    (["--shift", "-3"], "--shift must be a finite number > 0"),
    (["--shift", "nan"], "--shift must be a finite number > 0"),
    (["--shift", "inf"], "--shift must be a finite number > 0"),
    (["--compile-optimizer"], "--compile-optimizer compiles Attention Regulation's optimiser; add --regulate"),
], ids=["tokenizer-folder", "tokenizer-not-sentencepiece", "tokenizer-missing", "tokenizer-other-ids",
        "tokenizer-not-these-weights", "t5-length-0", "t5-length-negative", "shift-0", "shift-negative",
        "shift-nan", "shift-inf", "compile-without-regulate"])
def test_refused_in_one_line(tmp, capsys, no_sampling, argv, message):
    line = refused(capsys, tmp, [a.format(tmp=tmp) for a in argv])
    assert message in line, line


@pytest.mark.parametrize("flag, given", [("--t5", "clip_l"), ("--clip-g", "t5xxl"), ("--clip-l", "t5xxl"),
                                         ("--t5", "tiny-sd3.5")])
def test_wrong_text_encoder_file_is_named(tmp, capsys, no_sampling, flag, given):
    """The file given by the flag is named, with its flag, and the main checkpoint is not blamed."""
    path = tmp / f"{given}.safetensors"
    line = refused(capsys, tmp, [flag, str(path)])
    assert line.startswith(f"error: {path}, given with {flag}, is not the text encoder this model reads"), line
    assert "keys missing" in line


def test_shift_refused_on_a_unet(tmp, capsys):
    line = refused(capsys, tmp, ["--shift", "3"], checkpoint="tiny-unet.safetensors")
    assert "--shift sets SD 3's rectified flow" in line


def test_right_files_still_run(tmp, capsys):
    """The same flags with the right files: the run goes through (the refusals above are the files', not the
    flags')."""
    argv = ["--checkpoint", str(tmp / "tiny-sd3.5.safetensors"), "--prompt", PROMPT, "--steps", "1",
            "--out", str(tmp / "ok.png"), "--t5-tokenizer", str(tmp / "tokenizer_3"), "--t5-length", "80",
            "--shift", "2"] + [a for n in ("clip_l", "clip_g", "t5xxl")
                               for a in ("--" + n.replace("_", "-").replace("xxl", ""), str(tmp / f"{n}.safetensors"))]
    main(argv)
    assert Path(tmp / "ok.png").is_file()
