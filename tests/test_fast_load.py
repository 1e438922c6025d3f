"""Loading in a smaller dtype casts each tensor as it is read (minisd/checkpoint.py), so a bfloat16 model never has
a float32 copy beside it; the strict key and shape checks hold on that path too. (The memory itself is measured
by `python -m tools.bench load`: about 2.4 GB peak for SD 1.5 in bfloat16 instead of 6.5 GB.)"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from minisd.checkpoint import CheckpointError, build_model, read_safetensors, save_checkpoint
from minisd.config import tiny
from minisd.loading import load_model


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("load") / "tiny.safetensors"
    with torch.no_grad():
        save_checkpoint(build_model(tiny(), seed=5), path)
    return path


def test_bfloat16_load_equals_float32_load_cast(tiny_file):
    f32 = load_model(tiny_file).state_dict()
    bf16 = load_model(tiny_file, dtype=torch.bfloat16).state_dict()
    assert f32.keys() == bf16.keys()
    for k, v in f32.items():
        if v.is_floating_point():
            assert bf16[k].dtype == torch.bfloat16, k
            assert torch.equal(bf16[k], v.to(torch.bfloat16)), k


def test_cast_on_read(tiny_file):
    plain, meta = read_safetensors(tiny_file)
    cast, meta2 = read_safetensors(tiny_file, torch.bfloat16)
    assert meta == meta2 and plain.keys() == cast.keys()
    assert all(cast[k].dtype == torch.bfloat16 and torch.equal(cast[k], v.to(torch.bfloat16))
               for k, v in plain.items())


def test_cast_path_is_still_strict(tiny_file, tmp_path):
    state = load_file(str(tiny_file))
    key = next(k for k in state if k.endswith("attn2.to_q.weight"))
    state[key] = state[key][:, :-1].contiguous()                          # a wrong shape
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)          # an unexpected key
    bad = tmp_path / "bad.safetensors"
    from safetensors import safe_open
    with safe_open(str(tiny_file), "pt") as f:
        save_file(state, str(bad), metadata=f.metadata())
    with pytest.raises(CheckpointError, match="wrong shapes") as err:
        load_model(bad, dtype=torch.bfloat16)
    assert "unexpected keys" in str(err.value) and key in str(err.value)
