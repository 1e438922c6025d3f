"""The MMDiT's once-per-run inputs (MMDiT.prepare): the same output as embedding at every call, the pipeline embeds
the text once per run and not at every step, and a latent of another size than prepared is refused by name."""
import pytest
import torch

from minisd.checkpoint import build_model
from minisd.config import tiny_sd3
from minisd.pipeline_sd3 import SD3Pipeline


@pytest.fixture(scope="module")
def model():
    cfg = tiny_sd3(True)
    cfg.t5 = None   # no T5: no tokenizer to train
    return build_model(cfg, seed=0).eval()


@torch.no_grad()
def test_prepared_equals_embedding_at_every_call(model):
    g = torch.Generator().manual_seed(0)
    m = model.cfg.mmdit
    x, ctx, y = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 154, m.context_dim, generator=g), \
        torch.randn(2, m.adm_in_channels, generator=g)
    t = torch.tensor([900.0, 100.0])
    prepared = model.mmdit.prepare(y, ctx, (8, 12))
    assert torch.equal(model.mmdit(x, t, prepared=prepared), model.mmdit(x, t, y=y, context=ctx))
    with pytest.raises(ValueError, match="prepared for a 8x12 latent, given one of 12x8"):
        model.mmdit(x.transpose(-1, -2), t, prepared=prepared)


def test_the_pipeline_embeds_the_text_once_per_run(model):
    calls = []
    handle = model.mmdit.context_embedder.register_forward_hook(lambda *a: calls.append(1))
    try:
        SD3Pipeline(model)("a red circle", steps=3, guidance=5.0, sampler="euler", decode=False)
    finally:
        handle.remove()
    assert len(calls) == 2   # the guided batch and the conditional half (Attend-and-Excite's pass): not per step
