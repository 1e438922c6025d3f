"""A regulated layer must not make the host wait for the GPU. On CUDA a copy from the host (torch.tensor(list,
device=...) or .to(device) of a CPU tensor) and a read back (.item(), bool(tensor)) block until the GPU has run all
that was queued before them, so the host can no longer launch kernels ahead of it: that cost is paid in every
regulated layer at every edited step. With no GPU here, the same code runs on the meta device (shapes only, no
data), and a dispatch mode records every copy from the host onto it and every read back from it."""
import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from regulation import attention_regulation as ar


class HostTraffic(TorchDispatchMode):
    """Records ops that copy a CPU tensor onto the meta device outside ar.upload, reads of a meta tensor, and
    (through the fixture) tensors built from Python data on the device, which copy below the dispatcher."""

    def __init__(self):
        super().__init__()
        self.blocking, self.uploads, self.in_upload, self.active = [], 0, False, False

    def __enter__(self):
        self.active, self.uploads = True, 0
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        onto = any(a.device.type == "cpu" for a in ins) and any(o.device.type == "meta" for o in outs)
        if onto and not self.in_upload:
            self.blocking.append(str(func))
        if func is torch.ops.aten._local_scalar_dense.default and ins[0].device.type != "cpu":
            self.blocking.append(f"{func} (a read back)")
        return out


@pytest.fixture
def traffic(monkeypatch):
    mode = HostTraffic()
    real = ar.upload

    def upload(t, device):
        mode.in_upload, mode.uploads = True, mode.uploads + 1
        try:
            return real(t, device)
        finally:
            mode.in_upload = False

    monkeypatch.setattr(ar, "upload", upload)
    real_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):
        if mode.active and device is not None and torch.device(device).type != "cpu":
            mode.blocking.append(f"torch.tensor({data!r}, device={device})")
        return real_tensor(data, *args, device=device, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    return mode


def test_a_regulated_layer_makes_the_host_wait_for_nothing(traffic):
    meta = torch.device("meta")
    logits = torch.randn(2 * 8, 16 * 16, 77).to(meta)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    out, state = ar.regulate_logits(logits, (16, 16), [2, 5], 0, None, gens)   # the first step makes the constants
    ar.restore_special(out.softmax(-1), logits, 7)
    with traffic:
        out, state = ar.regulate_logits(logits, (16, 16), [2, 5], 1, state, gens)
        probs = ar.restore_special(out.softmax(-1), logits, 7)
    assert traffic.blocking == [], traffic.blocking
    # the random W is drawn on the host (CPU generators, as the released code) and goes up through ar.upload,
    # which on CUDA copies from pinned memory without blocking: one upload per image
    assert traffic.uploads == 2
    assert out.shape == logits.shape and probs.shape == logits.shape


def test_the_same_layer_without_the_cache_would_block(monkeypatch, traffic):
    """The check can fail: building the index tensors anew each call is seen as copies onto the device."""
    monkeypatch.setattr(ar, "on_device", lambda values, device, dtype=None: torch.tensor(values, dtype=dtype,
                                                                                          device=device))
    logits = torch.randn(8, 16 * 16, 77).to("meta")
    _, state = ar.regulate_logits(logits, (16, 16), [2, 5], 0, None, torch.Generator().manual_seed(0))
    with traffic:
        ar.regulate_logits(logits, (16, 16), [2, 5], 1, state, torch.Generator().manual_seed(0))
    assert len(traffic.blocking) >= 3


def test_constants_are_made_once_per_value_and_device():
    a = ar.on_device([2, 5], "cpu")
    assert a is ar.on_device((2, 5), torch.device("cpu")) and a.tolist() == [2, 5] and a.dtype == torch.int64
    f = ar.on_device([0.25, 0.75], "cpu", torch.float64)
    assert f.dtype == torch.float64 and f is not ar.on_device([0.25, 0.75], "cpu", torch.float32)
    w = torch.rand(2, 3)
    assert torch.equal(ar.upload(w, "cpu"), w)
