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


def test_gpu_check_overhead_only_keeps_going_past_a_failing_row(tmp_path, capsys, monkeypatch):
    """--only overhead needs no diffusers; a row that raises is recorded and the rows after it still run; the JSON
    on disk holds every row measured so far; the compiled optimiser's rows (forced on the CPU, the compile itself
    replaced by the eager loop it equals, tests/test_regulation_optimizer.py) are timed against plain."""
    import importlib.util

    from regulation import attention_regulation, editors

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "diffusers" else real_find_spec(name, *a))
    real_set_up = editors.set_up

    def set_up(method, *args, **kwargs):
        if method == "syngen":
            raise RuntimeError("CUDA out of memory (planted)")
        return real_set_up(method, *args, **kwargs)

    monkeypatch.setattr(editors, "set_up", set_up)
    calls = []
    monkeypatch.setattr(attention_regulation, "_compiled_descent",
                        lambda device: lambda *a: calls.append(1) or attention_regulation._descend(*a))
    out = tmp_path / "o.json"
    assert gpu_check.main(["--device", "cpu", "--json", str(out), "--steps", "1", "--runs", "1", "--only", "overhead",
                           "--compiled"]) == 0
    r = json.loads(out.read_text())
    assert r["parity"] == {} and not any("diffusers" in k for k in r["speed"])
    assert r["errors"] == {"1-step generation, minisd syngen": "RuntimeError: CUDA out of memory (planted)"}
    plain = "1-step generation, minisd plain (methods' prompt)"
    after = {f"1-step generation, minisd {m}" for m in ("dense", "composable", "regulate compiled")}
    assert set(r["speed"]) >= after | {plain, "1-step generation, minisd regulate compiled, first run (compiles)"}
    assert calls, "the compiled optimiser was not used"
    assert r["base"]["1-step generation, minisd regulate compiled"] == plain and r["seconds"] > 0
    printed = capsys.readouterr().out
    assert "| Attention Regulation, optimiser compiled | " in printed and "| +48.8% |" in printed
    assert "| SynGen | not measured | - | +378.0% |" in printed
    assert "error in 1-step generation, minisd syngen: RuntimeError" in printed


def test_gpu_check_without_diffusers_skips_its_rows(tmp_path, monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "diffusers" else real_find_spec(name, *a))
    out = tmp_path / "n.json"
    assert gpu_check.main(["--device", "cpu", "--json", str(out), "--steps", "1", "--runs", "1"]) == 0
    r = json.loads(out.read_text())
    assert "diffusers is not installed" in r["skipped"]["minisd vs diffusers rows"] and r["errors"] == {}
    assert not any("diffusers" in k for k in (*r["parity"], *r["speed"]))
    assert r["parity"]["unet f32 (device vs CPU)"]["max_abs"] < 1e-6
    assert r["speed"]["1-step generation, minisd regulated"] > 0 and "unet call, minisd" in r["speed"]
