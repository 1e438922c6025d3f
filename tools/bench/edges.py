"""How far from an edge is Attention Regulation's edit? The optimiser makes discrete choices (the quantile's ranks,
which iteration is kept as best), so its result is piecewise in the logits it gets. This takes the logits that the
first default regulated layer receives in one UNet call (random weights under the official names, as tools.bench
unet makes them), adds random noise of a few sizes, and prints the optimiser's best loss for each draw: one value
per noise size means the edit is stable there, several mean a change that small can give another image.

    python -m tools.bench edges                 # SD 1.5 at 512 px (about 30 s on 2 cores)
    python -m tools.bench edges --family tiny --px 64
"""
import argparse

import torch

from regulation.attention_regulation import regulate_logits
from tools.bench.unet import minisd_unet, model_config, official_unet_state, regulation_hook


def first_layer_logits(family, px, seed=0):
    """-> (hw, logits (b, heads, hw, 77)) of the first regulated layer, in one float32 UNet call at timestep 500."""
    mc = model_config(family)
    unet_cfg = mc.unet
    unet = minisd_unet(unet_cfg, official_unet_state(unet_cfg, torch.float32))
    g = torch.Generator().manual_seed(seed)
    side = px // mc.vae.downsample
    x = torch.randn(2, unet_cfg.in_channels, side, side, generator=g)
    ctx = torch.randn(2, 77, unet_cfg.context_dim, generator=g)
    hook, seen = regulation_hook(mc, slice(1, 2)), []
    edit = hook.edit_logits
    hook.edit_logits = lambda layer, logits: (seen.append((layer.hw, logits.clone())), edit(layer, logits))[1]
    unet.hooks[:] = [hook]
    with torch.inference_mode():
        unet(x, torch.full((2,), 500), ctx)
    if not seen:
        raise SystemExit(f"no layer of {family} is regulated at {px} px")
    return mc, seen[0]


def best_losses(mc, hw, logits, noise, draws, seed=1):
    g, out = torch.Generator().manual_seed(seed), []
    for _ in range(draws):
        hook = regulation_hook(mc, slice(1, 2))
        cond = (logits + noise * torch.randn(logits.shape, generator=g))[hook.cond]
        with torch.inference_mode():
            _, state = regulate_logits(cond.reshape(-1, *cond.shape[2:]), hw, hook.targets, 0, None, hook.generator,
                                       hook.config)
        out.append(state.best_loss.item())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="sd1")
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--noise", type=float, nargs="+", default=[0, 1e-7, 1e-6, 1e-5])
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mc, (hw, logits) = first_layer_logits(args.family, args.px)
    rows = {}
    for noise in args.noise:
        rows[noise] = best_losses(mc, hw, logits, noise, args.draws)
        print(f"logit noise {noise:g}: best losses {[round(v, 5) for v in rows[noise]]}", flush=True)
    return rows


if __name__ == "__main__":
    main()
