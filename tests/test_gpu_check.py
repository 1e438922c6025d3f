"""tools/gpu_check.py runs here on the CPU with the tiny config, so the script a GPU session will run cannot rot:
its parity rows hold (on the CPU the "device" is the CPU, so device-vs-CPU rows are exact), its half-precision
rows measure a real drift, and it writes the JSON it promises."""
import json

import pytest
import torch

pytest.importorskip("diffusers", reason="gpu_check compares with diffusers")

from tools import gpu_check  # noqa: E402


def test_gpu_check_on_cpu(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--json", str(out), "--steps", "2", "--runs", "1"]) == 0
    r = json.loads(out.read_text())
    par, speed = r["parity"], r["speed"]
    assert r["device"] == "cpu" and r["family"] == "tiny" and r["steps"] == 2
    assert all(v["finite"] for v in par.values())
    for row in ("unet f32 (device vs CPU)", "regulated f32 (device vs CPU)", "maps f32 (device vs CPU)"):
        assert par[row]["max_abs"] < 1e-6, row
    assert par["unet f32 (minisd vs diffusers, device)"]["max_abs"] < 1e-4
    assert par["vae f32 (minisd vs diffusers, device)"]["max_abs"] < 1e-4
    assert 1e-5 < par["unet bfloat16 drift (device vs CPU f32)"]["rel"] < 0.1
    assert set(speed) >= {"unet call, minisd", "unet call, diffusers", "2-step generation, minisd",
                          "2-step generation, diffusers", "2-step generation, minisd regulated"}
    assert all(v > 0 for v in speed.values())
    methods = {f"2-step generation, minisd {m}" for m in ("regulate", "attend-excite", "syngen", "dense", "composable")}
    assert set(speed) >= methods | {"2-step generation, minisd plain (methods' prompt)"}   # the paper's overheads
    printed = capsys.readouterr().out
    assert "| unet f32 (minisd vs diffusers, device) |" in printed and "| unet call, minisd | " in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no CUDA device")
def test_gpu_check_without_cuda_says_so(tmp_path, capsys):
    assert gpu_check.main(["--json", str(tmp_path / "x.json")]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
