"""Train minisd's tiny Stable Diffusion on the shapes world (tools/shapes.py), on CPU, from scratch.

Stage 1 trains the VAE (minisd's own AutoencoderKL, a small config) on random crops of rendered scenes. Stage 2
freezes it, encodes a fixed set of training scenes once, and trains the UNet together with a small
CLIP-architecture text encoder (the real CLIP tokenizer), predicting the noise as SD does, with 10% empty captions
so classifier-free guidance works. The result is one official-format single-file safetensors (float16) with the
model config in its metadata: the same loader reads it as real SD weights.

    python -m tools.train --out weights/minisd-shapes.safetensors           # both stages, resumable
    python -m tools.train --stage vae --vae-steps 200 --out /tmp/x.safetensors  # a quick try

Runs are seeded; `--run DIR` keeps the resumable state (rerun the same command to continue after an interruption).
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minisd.checkpoint import save_checkpoint
from minisd.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from minisd.model import StableDiffusion
from minisd.samplers import Schedule
from minisd.tokenizer import Tokenizer
from tools import shapes


def shapes_config():
    """The shipped model: 128 px images, 16x16x4 latents (VAE factor 8), a 3-level UNet with attention at every
    level. Its regulated layers are the cross-attentions at 16x16, the largest maps it has."""
    return ModelConfig(
        name="minisd-shapes",
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1, 2, 4),
                        num_heads=2, context_dim=64, groups=16),
        vae=VAEConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, groups=8, scale_factor=1.0),
        text=TextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        image_size=128, default_steps=50, default_guidance=5.0,
        regulate_blocks=("input_blocks.1", "output_blocks.4", "output_blocks.5"),
    )


def render_pool(seed, n, size=128):
    """n training scenes -> (images uint8 (n, 3, size, size), object lists). Rendering is the slow part of a step
    on CPU, so scenes are rendered once (2x supersampling instead of 4x: the edges differ by a fraction of a
    pixel) and captions are drawn afresh from the templates every time a scene is used."""
    rng = np.random.default_rng(seed)
    shapes.SUPERSAMPLE = 2
    imgs, objs = [], []
    for _ in tqdm(range(n), desc="render", leave=False):
        scene = shapes.sample_scene(rng)
        imgs.append(shapes.render(scene, size))
        objs.append([o.key for o in scene.objects])
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), objs


def to_pixels(x):
    return x.float() / 127.5 - 1


def save_state(path, **state):
    tmp = Path(str(path) + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True) if Path(path).is_file() else None


def train_vae(model, args, run):
    """Reconstruction (L1 + MSE) with a tiny KL term, on 64 px crops: the VAE is convolutional, so crops teach it the
    same edges at a quarter of the cost."""
    vae = model.first_stage_model
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    state, step = load_state(run / "vae.pt"), 0
    if state:
        vae.load_state_dict(state["vae"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    pool, _ = render_pool(args.seed + 10, args.vae_pool)
    rng = np.random.default_rng(args.seed + step)
    torch.manual_seed(args.seed + step)
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae")
    while step < args.vae_steps:
        x = to_pixels(pool[rng.integers(0, len(pool), args.vae_batch)])
        i, j = rng.integers(0, 128 - args.crop + 1, size=2) // 8 * 8
        x = x[:, :, i:i + args.crop, j:j + args.crop]
        post = vae.encode(x)
        rec = vae.decode(post.sample())
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + 1e-6 * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.save_every == 0 or step == args.vae_steps:
            save_state(run / "vae.pt", vae=vae.state_dict(), opt=opt.state_dict(), step=step)
    bar.close()


@torch.no_grad()
def encode_dataset(model, args, run):
    """Render and encode the UNet's training scenes once: latent posterior mean and std, and each scene's objects."""
    path = run / "latents.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    pool, objs = render_pool(args.seed + 1, args.dataset)
    vae = model.first_stage_model.eval()
    means, stds = [], []
    for i in tqdm(range(0, args.dataset, 64), desc="encode"):
        post = vae.encode(to_pixels(pool[i:i + 64]))
        means.append(post.mean.half()), stds.append(post.std.half())
    data = dict(mean=torch.cat(means), std=torch.cat(stds), objects=objs)
    torch.save(data, path)
    return data


def train_unet(model, args, run, data):
    tok = Tokenizer(pad_with_eot=True)
    n = len(data["objects"])
    empty = tok([""])
    sched = Schedule.for_model(model.cfg)
    abar = sched.alphas_cumprod
    unet, text = model.unet, model.cond_stage_model
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    state, step = load_state(run / "unet.pt"), 0
    if state:
        unet.load_state_dict(state["unet"]), text.load_state_dict(state["text"]), opt.load_state_dict(state["opt"])
        ema, step = state["ema"], state["step"]
    scale = model.cfg.vae.scale_factor
    g = torch.Generator().manual_seed(args.seed + 2 + step)
    rng = np.random.default_rng(args.seed + 3 + step)
    bar = tqdm(total=args.unet_steps, initial=step, desc="unet")
    unet.train(), text.train()
    while step < args.unet_steps:
        idx = torch.randint(0, n, (args.batch,), generator=g)
        z = (data["mean"][idx].float() + data["std"][idx].float() * torch.randn(data["mean"][idx].shape, generator=g)) * scale
        ids = tok([shapes.caption_for(data["objects"][k], rng) for k in idx.tolist()])
        drop = torch.rand(args.batch, generator=g) < 0.1  # unconditional examples teach guidance
        ids[drop] = empty
        t = torch.randint(0, sched.num_train_timesteps, (args.batch,), generator=g)
        eps = torch.randn(z.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * eps
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.5 * (1 + math.cos(math.pi * step / args.unet_steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.mse_loss(unet(zt, t, text(ids)), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - d)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % args.save_every == 0 or step == args.unet_steps:
            save_state(run / "unet.pt", unet=unet.state_dict(), text=text.state_dict(), opt=opt.state_dict(),
                       ema=ema, step=step)
    bar.close()
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="weights/minisd-shapes.safetensors")
    ap.add_argument("--run", default="runs/shapes", help="folder for resumable state (default: %(default)s)")
    ap.add_argument("--stage", choices=["all", "vae", "unet"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--vae-pool", type=int, default=3000, help="scenes the VAE's crops come from")
    ap.add_argument("--dataset", type=int, default=10000, help="training scenes encoded for the UNet")
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--save-every", type=int, default=100)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = shapes_config()
    model = StableDiffusion(cfg)
    t0 = time.time()
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    if args.stage in ("all", "vae"):
        train_vae(model, args, run)
        timings["vae_s"] = timings.get("vae_s", 0) + time.time() - t0
    else:
        model.first_stage_model.load_state_dict(load_state(run / "vae.pt")["vae"])
    if args.stage in ("all", "unet"):
        t1 = time.time()
        data = encode_dataset(model, args, run)
        # SD's trick: scale latents to unit variance so the noise schedule fits them
        cfg.vae.scale_factor = float(1.0 / data["mean"].float().std())
        train_unet(model, args, run, data)
        timings["unet_s"] = timings.get("unet_s", 0) + time.time() - t1
    (run / "timings.json").write_text(json.dumps(timings))
    model.cfg = cfg
    half = StableDiffusion(cfg)
    half.load_state_dict(model.state_dict())
    save_checkpoint(half.half(), args.out, metadata={"minisd_training": json.dumps(vars(args)),
                                                    "minisd_timings": json.dumps(timings)})
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB); times {timings}")


if __name__ == "__main__":
    main()
