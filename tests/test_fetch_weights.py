"""tools/fetch_weights.py, offline: nothing is ever downloaded. Every failure is one line and exit code 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import fetch_weights
from tools.fetch_weights import MODELS, main

ROOT = Path(__file__).resolve().parents[1]
hub = pytest.importorskip("huggingface_hub", reason="the download goes through huggingface_hub")


def one_line_failure(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, err
    return err


def raising(error):
    def download(**kw):
        raise error
    return download


def test_offline_hub_error_is_one_line(monkeypatch, capsys, tmp_path):
    # what hf_hub_download raises when the Hub cannot be reached and the file is not cached (a multi-line text)
    from huggingface_hub.errors import LocalEntryNotFoundError
    offline = LocalEntryNotFoundError(
        "An error happened while trying to locate the file on the Hub and we cannot find the requested files in "
        "the local cache.\nPlease check your connection and try again or make sure your Internet connection is on.")
    monkeypatch.setattr(hub, "hf_hub_download", raising(offline))
    err = one_line_failure(capsys, ["sd15", "--dest", str(tmp_path)])
    assert "not reachable" in err and MODELS["sd15"][1] in err


@pytest.mark.parametrize("error, says", [
    (ConnectionError("[Errno 111] Connection refused\nmore detail"), "Connection refused"),
    (TimeoutError("timed out"), "timed out"),
])
def test_network_library_errors_are_one_line(monkeypatch, capsys, tmp_path, error, says):
    monkeypatch.setattr(hub, "hf_hub_download", raising(error))
    assert says in one_line_failure(capsys, ["sd21", "--dest", str(tmp_path)])


def test_missing_huggingface_hub_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    assert "pip install huggingface_hub" in one_line_failure(capsys, ["sd15", "--dest", str(tmp_path)])


def test_hub_offline_mode_in_a_real_process(tmp_path):
    """The real hf_hub_download, with the Hub switched off by its own setting and an empty cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "tools.fetch_weights", "sd21", "--dest", str(tmp_path / "w")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert not list((tmp_path / "w").glob("*.safetensors"))


def test_downloads_the_official_file_into_dest(monkeypatch, tmp_path):
    calls = []

    def download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        (Path(local_dir) / filename).write_bytes(b"weights")
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    path = main(["sd15", "--dest", str(tmp_path)])
    assert calls == [MODELS["sd15"][:2]] and path == tmp_path / MODELS["sd15"][1]
    assert main(["sd15", "--dest", str(tmp_path)]) == path and len(calls) == 1  # there already: not again


def test_help_names_the_repositories_and_warns_they_move(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for repo, filename, _ in MODELS.values():
        assert repo in text and filename in text
    assert "may move" in text
    assert fetch_weights.__doc__.count("\n") > 3


def hub_into(calls):
    """hf_hub_download, offline: writes the file at its path in the repository under local_dir, as the Hub does."""
    def download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
        return str(path)
    return download


@pytest.mark.parametrize("model", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_sd3_fetches_its_text_encoders_and_t5_tokenizer(monkeypatch, capsys, tmp_path, model):
    """The single file, the three text encoders from its repository, spiece.model from the diffusers-format one;
    the last line printed is a command minisd.sample parses, naming each file by its flag."""
    import shlex

    from minisd.sample import build_parser
    calls = []
    monkeypatch.setattr(hub, "hf_hub_download", hub_into(calls))
    repo, single, _ = MODELS[model]
    path = main([model, "--dest", str(tmp_path)])
    assert path == tmp_path / single
    tokenizer_repo = "stabilityai/stable-diffusion-3-medium-diffusers" if model == "sd3-medium" else repo
    assert calls == [(repo, single), (repo, "text_encoders/clip_l.safetensors"),
                     (repo, "text_encoders/clip_g.safetensors"), (repo, "text_encoders/t5xxl_fp16.safetensors"),
                     (tokenizer_repo, "tokenizer_3/spiece.model")]
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert command[:3] == ["python", "-m", "minisd.sample"]
    args = build_parser().parse_args(command[3:])
    assert (args.checkpoint, args.clip_l, args.clip_g, args.t5, args.t5_tokenizer) == tuple(
        str(tmp_path / f) for f in (single, "text_encoders/clip_l.safetensors", "text_encoders/clip_g.safetensors",
                                    "text_encoders/t5xxl_fp16.safetensors", "tokenizer_3/spiece.model"))
    main([model, "--dest", str(tmp_path)])
    assert len(calls) == 5  # every file there: none again


def test_sd3_repo_flag_moves_the_text_encoders_too(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(hub, "hf_hub_download", hub_into(calls))
    main(["sd3.5-large", "--dest", str(tmp_path), "--repo", "someone/sd35", "--file", "large.safetensors"])
    assert calls[:4] == [("someone/sd35", "large.safetensors")] + [
        ("someone/sd35", f"text_encoders/{f}.safetensors") for f in ("clip_l", "clip_g", "t5xxl_fp16")]


def test_sd3_failure_on_a_later_file_is_one_line(monkeypatch, capsys, tmp_path):
    """The single file arrives, T5 does not (the Hub unreachable midway): one line naming T5's file."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    calls, ok = [], hub_into([])

    def download(repo_id, filename, local_dir):
        calls.append(filename)
        if "t5xxl" in filename:
            raise LocalEntryNotFoundError("cannot reach the Hub\nsecond line")
        return ok(repo_id=repo_id, filename=filename, local_dir=local_dir)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    err = one_line_failure(capsys, ["sd3.5-medium", "--dest", str(tmp_path)])
    assert "text_encoders/t5xxl_fp16.safetensors" in err and "not reachable" in err
    assert (tmp_path / "sd3.5_medium.safetensors").is_file()
