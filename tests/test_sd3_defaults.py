"""SD 3's sampling defaults by file (docs/sd3.md, "Defaults by file"): Stability's reference table (sd3_infer.py's
CONFIGS, keyed by the file's name), recognised by name, by the file's modelspec metadata or a folder's name; every
flag overrides; the settings used are printed and written in the PNG (`Shift: 3.0`). Also the compiled optimiser's
flag and page control on SD 3's joint attention."""
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from minisd.config import SD3_PRESETS, sd3_preset, tiny_sd3, with_sd3_preset
from minisd.pipeline_sd3 import SD3Pipeline
from minisd.sample import main

try:
    from test_sd3 import official_state, train_t5_tokenizer
except ImportError:
    from tests.test_sd3 import official_state, train_t5_tokenizer

PROMPT = "a red circle left of a blue square"

# sd3_infer.py's CONFIGS (Stability-AI/sd3.5, fbf8f48), transcribed: the files minisd runs
REFERENCE = {"sd3_medium": {"shift": 1.0, "steps": 50, "cfg": 5.0, "sampler": "dpmpp_2m"},
             "sd3.5_medium": {"shift": 3.0, "steps": 50, "cfg": 5.0, "sampler": "dpmpp_2m"},
             "sd3.5_large": {"shift": 3.0, "steps": 40, "cfg": 4.5, "sampler": "dpmpp_2m"},
             "sd3.5_large_turbo": {"shift": 3.0, "cfg": 1.0, "steps": 4, "sampler": "euler"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same tiny SD 3.5 weights under a plain name, the Turbo's name, and a plain name whose metadata says
    Turbo; T5's tokenizer beside them."""
    pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("sd3-defaults")
    cfg = tiny_sd3(True)
    state = {k: v.contiguous() for k, v in official_state(cfg, seed=6).items()}
    meta = {"minisd_config": cfg.to_json()}
    paths = {"plain": tmp / "tiny.safetensors", "turbo": tmp / "sd3.5_large_turbo.safetensors",
             "metadata": tmp / "renamed.safetensors"}
    save_file(state, str(paths["plain"]), metadata=meta)
    save_file(state, str(paths["turbo"]), metadata=meta)
    save_file(state, str(paths["metadata"]), metadata={**meta, "modelspec.architecture":
                                                          "stable-diffusion-v3.5-large-turbo",
                                                          "modelspec.title": "Stable Diffusion 3.5 Large Turbo"})
    train_t5_tokenizer(tmp / "tokenizer_3")
    return paths


def run(capsys, argv):
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_presets_are_the_references_table():
    """Every file of the reference's table has its steps, guidance and sampler; the shift too, but SD 3 Medium's,
    which minisd takes as 3.0 (the code released with SD 3 Medium and diffusers' scheduler config; docs/sd3.md)."""
    assert set(SD3_PRESETS) == set(REFERENCE)
    for key, ref in REFERENCE.items():
        cfg = SD3_PRESETS[key]()
        assert (cfg.default_steps, cfg.default_guidance, cfg.default_sampler) == (ref["steps"], ref["cfg"],
                                                                                   ref["sampler"]), key
        assert cfg.shift == (3.0 if key == "sd3_medium" else ref["shift"]), key


@pytest.mark.parametrize("name, key", [
    ("weights/sd3.5_large_turbo.safetensors", "sd3.5_large_turbo"),
    ("sd3.5_large.safetensors", "sd3.5_large"),
    ("sd3.5_medium.safetensors", "sd3.5_medium"),
    ("sd3_medium.safetensors", "sd3_medium"),
    ("sd3_medium_incl_clips_t5xxlfp16.safetensors", "sd3_medium"),   # the official variant with text encoders
    ("SD3.5_Large_Turbo-fp8.safetensors", "sd3.5_large_turbo"),
    ("models/stable-diffusion-3.5-large-turbo", "sd3.5_large_turbo"),   # a diffusers folder, as the Hub names it
    ("my-model.safetensors", None),
    ("sd3_large.safetensors", None),   # never released as a file: no preset
])
def test_recognised_by_name(name, key):
    found = sd3_preset(name)
    assert (found and found[0]) == key


def test_recognised_by_metadata_and_name_first():
    meta = {"modelspec.architecture": "stable-diffusion-v3.5-large-turbo"}
    assert sd3_preset("model.safetensors", meta)[0] == "sd3.5_large_turbo"
    assert sd3_preset("model.safetensors", {"modelspec.title": "Stable Diffusion 3.5 Medium"})[0] == "sd3.5_medium"
    assert sd3_preset("sd3.5_large.safetensors", meta)[0] == "sd3.5_large"   # the name, as the reference reads it
    cfg = with_sd3_preset(tiny_sd3(True), "x.safetensors", meta)
    assert (cfg.default_steps, cfg.default_guidance, cfg.default_sampler, cfg.shift) == (4, 1.0, "euler", 3.0)
    assert cfg.mmdit == tiny_sd3(True).mmdit, "the preset changes the defaults, not the architecture"


@pytest.mark.parametrize("which", ["turbo", "metadata"])
def test_turbo_file_runs_the_turbo_settings(files, tmp_path, capsys, which):
    out = tmp_path / "t.png"
    code, stdout, err = run(capsys, ["--checkpoint", str(files[which]), "--prompt", PROMPT, "--out", str(out)])
    assert code == 0, err
    assert "SD 3 settings: 4 steps, guidance 1, Euler, shift 3; the others sd3.5-large-turbo's defaults" in stdout
    text = Image.open(out).info["parameters"]
    assert "Steps: 4, Sampler: Euler, Shift: 3.0" in text and "CFG scale: 1.0" in text


def test_every_flag_overrides(files, tmp_path, capsys):
    out = tmp_path / "o.png"
    code, stdout, err = run(capsys, ["--checkpoint", str(files["turbo"]), "--prompt", PROMPT, "--steps", "2",
                                     "--guidance", "3", "--sampler", "dpmpp_2m", "--shift", "1.5", "--out", str(out)])
    assert code == 0, err
    assert ("SD 3 settings: 2 steps (--steps), guidance 3 (--guidance), DPM++ 2M (--sampler), shift 1.5 (--shift)"
            in stdout)
    text = Image.open(out).info["parameters"]
    assert "Steps: 2, Sampler: DPM++ 2M, Shift: 1.5" in text and "CFG scale: 3.0" in text


def test_plain_name_keeps_the_files_own_defaults(files, tmp_path, capsys):
    code, stdout, err = run(capsys, ["--checkpoint", str(files["plain"]), "--prompt", PROMPT, "--steps", "1",
                                     "--out", str(tmp_path / "p.png")])
    assert code == 0, err
    cfg = tiny_sd3(True)
    assert f"guidance {cfg.default_guidance:g}, Euler, shift {cfg.shift:g}; the others tiny-sd3.5's defaults\n" \
        in stdout


@torch.no_grad()
def test_shift_is_the_runs(files):
    """shift= on a call gives that call's schedule; the pipeline's own stays the model's."""
    pipe = SD3Pipeline.from_checkpoint(files["plain"])
    side = pipe.cfg.image_size // pipe.cfg.vae.downsample
    noise = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(1))

    def final(**kw):
        return pipe(PROMPT, steps=3, latents=noise.clone(), return_latents=True, decode=False, **kw).latents
    default = final()
    assert torch.equal(final(shift=pipe.cfg.shift), default)
    assert (final(shift=1.0) - default).abs().max() > 1e-3
    assert torch.equal(final(), default)


def test_compiled_optimizer_from_the_command_line(files, tmp_path, capsys, monkeypatch):
    """--compile-optimizer reaches Attention Regulation's optimiser on joint attention (its compile replaced by the
    eager loop it equals, as tests/test_gpu_check.py does: compiling takes minutes on a CPU) and is recorded."""
    from regulation import attention_regulation
    calls = []

    def compiled(device):
        def descend(*args):
            calls.append(device)
            return attention_regulation._descend(*args)
        return descend
    monkeypatch.setattr(attention_regulation, "_compiled_descent", compiled)
    out = tmp_path / "r.png"
    code, _, err = run(capsys, ["--checkpoint", str(files["plain"]), "--prompt", PROMPT, "--regulate",
                                "--compile-optimizer", "--steps", "2", "--out", str(out)])
    assert code == 0, err
    assert calls, "the compiled optimiser was not used"
    assert "Regulation optimiser: compiled" in Image.open(out).info["parameters"]


def test_compiled_optimizer_from_the_page():
    """The page's box adds the flag to Attention Regulation's command line only."""
    from minisd.app import page_argv
    from minisd.tokenizer import Tokenizer
    defaults = {"checkpoint": "c", "device": "cpu", "dtype": "float32", "steps": 50, "guidance": 5.0,
                "parser": {"--checkpoint": "c", "--device": "cpu", "--dtype": "float32"}}
    fields = {"prompt": "a red circle and a blue square", "seed": 0, "steps": 50, "guidance": 5.0,
              "method": "regulate", "targets": "", "weights": "", "compile": True}
    argv, plain = page_argv(fields, Tokenizer(), defaults)
    assert "--compile-optimizer" in argv and "--compile-optimizer" not in plain
    argv, _ = page_argv({**fields, "compile": False}, Tokenizer(), defaults)
    assert "--compile-optimizer" not in argv
    argv, _ = page_argv({**fields, "method": "attend-excite"}, Tokenizer(), defaults)
    assert "--compile-optimizer" not in argv
