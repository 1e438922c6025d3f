"""Train minisd's tiny Stable Diffusion on the shapes world (tools/testbed/shapes.py), on CPU, from scratch.

Four stages, each seeded and resumable, in the order Stable Diffusion's parts were made:
  clip   a tiny CLIP (tools/testbed/tinyclip.py): minisd's CLIP-architecture text tower and a small image tower, trained
         contrastively on caption <-> render pairs with hard negatives; then the text tower is FROZEN, as SD freezes
         OpenAI's CLIP. Held-out retrieval is printed (and stored in the checkpoint's metadata).
  vae    minisd's own AutoencoderKL (a small config) on random crops of rendered scenes.
  unet   the UNet alone, on latents of a fixed set of encoded training scenes, epsilon prediction on SD's noise
         schedule with min-SNR-5 loss weighting, 10% empty captions for classifier-free guidance, EMA.
  ground the UNet continued for 900 steps with a grounding loss added (TokenCompose, Wang et al., CVPR 2024):
         each noun's cross-attention at the 16x16 and 8x8 layers is pulled inside its own object, whose mask the
         renderer knows (token loss), and inside it the noun must take the row (pixel loss). SD's maps localise
         objects by themselves, learnt from billions of images; a UNet this small, on this budget, reads the
         words without placing them (gate d). The token loss alone, or with an identity term,
         localised the maps by emptying the words into the padding (README); with the pixel loss the model kept
         drawing and following the words. For a quarter of the examples (`--ground-inject 0.25`) the scene's
         layout is written into the nouns' attention instead, at every timestep, so the UNet learns to draw a
         noun's object where its attention is high: SD's early maps control layout (Prompt-to-Prompt, Directed
         Diffusion), which regulation relies on. That is the shipped recipe (`--ground-steps 0` leaves it out).

The text encoder is frozen, so whatever it puts in the end-of-text and padding positions is there for the UNet to
read, and in a world this small those positions summarise the whole prompt: a UNet trained naively reads the
prompt there, not in the words. `--pad-swap P` makes the summary unreliable: for a share P of
the examples the states from the end-of-text token on are taken from another caption of the batch, so only the
word states always agree with the image. Inference is unchanged: 77 positions, the encoder's own states.

The result is one official-format single-file safetensors (float16) with the model config in its metadata: the
same loader reads it as real SD weights.

    python -m tools.testbed.train --out weights/minisd-shapes.safetensors           # all stages, resumable
    python -m tools.testbed.train --stage clip --clip-steps 200 --run /tmp/try    # one stage: its state in --run only
    python -m tools.testbed.train --snapshot-every 1000 ...   # a checkpoint every 1000 UNet steps (learning curves)
    python -m tools.testbed.train --stage ground --init FILE --run /tmp/g --out /tmp/g/grounded.safetensors
                                  # the ground stage alone, on a checkpoint of the unet stage

`--run DIR` keeps the resumable state (rerun the same command to continue after an interruption).
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
from minisd.attention import AttentionHook
from minisd.model import StableDiffusion
from minisd.samplers import Schedule
from minisd.tokenizer import Tokenizer
from tools.testbed import shapes


def shapes_config():
    """The shipped model: 128 px images, 16x16x4 latents (VAE factor 8), a 3-level UNet (16x16, 8x8, 4x4) with
    cross-attention at 16x16 and 8x8: objects of 28-52 px span 4-7 cells of a 16x16 map. Most channels sit at
    the coarse levels, where a shape is decided, and cost little there. The regulated layers follow the one rule
    for every family (ModelConfig.default_blocks): the deepest level of the down and up paths that has
    cross-attention, here the 8x8 maps."""
    return ModelConfig(
        name="minisd-shapes",
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(1, 2),
                        num_heads=2, context_dim=64, groups=16),
        vae=VAEConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, groups=8, scale_factor=1.0),
        text=TextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        image_size=128, default_steps=50, default_guidance=5.0,
        regulate_blocks=None,
    )


def render_pool(seed, n, size=128, mask_res=0):
    """n training scenes -> (images uint8 (n, 3, size, size), object lists, object masks or None). Rendering is
    the slow part of a step on CPU, so scenes are rendered once (2x supersampling instead of 4x: the edges differ
    by a fraction of a pixel) and captions are drawn afresh from the templates every time a scene is used.
    mask_res: also each object's coverage of a mask_res x mask_res grid (shapes.object_masks), float16."""
    rng = np.random.default_rng(seed)
    shapes.SUPERSAMPLE = 2
    imgs, objs, masks = [], [], []
    for _ in tqdm(range(n), desc="render", leave=False):
        scene = shapes.sample_scene(rng)
        imgs.append(shapes.render(scene, size))
        objs.append([o.key for o in scene.objects])
        if mask_res:
            masks.append(torch.from_numpy(shapes.object_masks(scene, mask_res, size)).half())
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), objs, (masks if mask_res else None)


def to_pixels(x):
    return x.float() / 127.5 - 1


def save_state(path, **state):
    tmp = Path(str(path) + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True) if Path(path).is_file() else None


def train_contrastive(model, tokenize, tok, run, name, key, seed, save_every, steps, batch, lr, pool, n_eval):
    """Contrastive caption <-> render training of a text tower in a tinyclip model (TinyCLIP, or train_sd3's T5CLIP),
    each image also against hard negatives of its caption; resumable from run/{name}.pt (the weights under `key`).
    tokenize(captions, negatives) -> (ids, negative ids). Returns held-out retrieval (run/{name}_eval.json)."""
    from tools.testbed import tinyclip
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    state, step = load_state(run / f"{name}.pt"), 0
    if state:
        model.load_state_dict(state[key])
        if "opt" in state:   # a run seeded from a written file (train_sd3 --resume-from) has none
            opt.load_state_dict(state["opt"])
        step = state["step"]
    if step < steps:
        images, objs, _ = render_pool(seed + 20, pool, size=64)
        images = to_pixels(images)
        rng = np.random.default_rng(seed + 21 + step)
        torch.manual_seed(seed + 22 + step)
        bar = tqdm(total=steps, initial=step, desc=name)
        model.train()
        while step < steps:
            idx = rng.integers(0, len(images), batch)
            caps, negs = zip(*[tinyclip.caption_and_negatives(objs[k], rng) for k in idx])
            ids, neg_ids = tokenize(list(caps), [n for ns in negs for n in ns])
            cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 100) * (cosine * 0.9 + 0.1)
            loss, acc = tinyclip.contrastive_loss(model, images[idx], ids, neg_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
            if step % save_every == 0 or step == steps:
                save_state(run / f"{name}.pt", **{key: model.state_dict()}, opt=opt.state_dict(), step=step)
        bar.close()
    path = run / f"{name}_eval.json"
    if not path.is_file():
        path.write_text(json.dumps(tinyclip.evaluate(model, tok, n=n_eval)))
    result = json.loads(path.read_text())
    print(f"tiny {name.upper()}, held-out retrieval (true caption beats its hard negatives):", result)
    return result


def train_clip(model, args, run):
    """The tiny CLIP (tools/testbed/tinyclip.py) by train_contrastive. Returns held-out retrieval."""
    from tools.testbed import tinyclip
    tok = Tokenizer(pad_with_eot=model.cfg.text.pad_with_eot)
    clip = tinyclip.TinyCLIP(model.cond_stage_model, tok.eos_id)

    def tokenize(caps, negs):
        ids, neg_ids = tok(caps), tok(negs)
        # the text tower is causal: states up to the end-of-text token do not depend on what follows, so
        # training on the used length only gives exactly the states of the full 77 positions, 4x cheaper
        n = int(max((ids == clip.eot_id).int().argmax(1).max(), (neg_ids == clip.eot_id).int().argmax(1).max())) + 1
        return ids[:, :n], neg_ids[:, :n]

    return train_contrastive(clip, tokenize, tok, run, "clip", "clip", args.seed, args.save_every, args.clip_steps,
                             args.clip_batch, args.clip_lr, args.clip_pool, args.clip_eval)


def train_vae(model, args, run):
    """Reconstruction (L1 + MSE) with a tiny KL term, on 64 px crops: the VAE is convolutional, so crops teach it the
    same edges at a quarter of the cost."""
    vae = model.first_stage_model
    if args.vae_from:
        # the VAE of an earlier run of this tool (same config): its weights, checked key by key and shape by shape
        from minisd.loading import load_model
        vae.load_state_dict(load_model(args.vae_from).first_stage_model.state_dict())
        save_state(run / "vae.pt", vae=vae.state_dict(), step=args.vae_steps, source=str(args.vae_from))
        print(f"VAE taken from {args.vae_from}")
        return
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    state, step = load_state(run / "vae.pt"), 0
    if state:
        vae.load_state_dict(state["vae"])
        step = state["step"]
        if "opt" in state:
            opt.load_state_dict(state["opt"])
    if step >= args.vae_steps:
        return
    pool, _, _ = render_pool(args.seed + 10, args.vae_pool)
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
    """Render and encode the UNet's training scenes once: latent posterior mean and std, each scene's objects and
    their masks on the latent grid (for the ground stage)."""
    path = run / "latents.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    pool, objs, masks = render_pool(args.seed + 1, args.dataset, mask_res=128 // 8)
    vae = model.first_stage_model.eval()
    means, stds = [], []
    for i in tqdm(range(0, args.dataset, 64), desc="encode"):
        post = vae.encode(to_pixels(pool[i:i + 64]))
        means.append(post.mean.half()), stds.append(post.std.half())
    data = dict(mean=torch.cat(means), std=torch.cat(stds), objects=objs, masks=masks)
    torch.save(data, path)
    return data


def snapshot(model, path, metadata):
    """The model as it is now, float16, official layout: what the shipped file will be."""
    half = StableDiffusion(model.cfg)
    half.load_state_dict(model.state_dict())
    save_checkpoint(half.half(), path, metadata=metadata)


def swap_tail(context, ids, eot_id, source=None, source_ids=None):
    """Each caption's states from its end-of-text token on, replaced by the next caption's (in the batch) from
    that caption's own end-of-text token on: the end-of-text state and the padding that follows it. With `source`
    and `source_ids` (same shapes as context and ids) the tail comes from those rows instead."""
    if source is None:
        source, source_ids = context.roll(-1, 0), ids.roll(-1, 0)
    pos = torch.arange(ids.shape[1])
    eot = (ids == eot_id).int().argmax(1)
    tail = pos[None] >= eot[:, None]                                                  # (b, 77)
    src_eot = (source_ids == eot_id).int().argmax(1)
    src = (src_eot[:, None] + (pos[None] - eot[:, None])).clamp(0, ids.shape[1] - 1)
    taken = source.gather(1, src[..., None].expand(-1, -1, context.shape[-1]))
    return torch.where(tail[..., None], taken, context)


def inject_layout(probs, columns, masks, share=0.9):
    """Attention with a layout written in: in each cell, the j-th object's noun takes `share` x that object's
    coverage of the cell (split over its sub-tokens), and the other positions keep their proportions of the rest.
    probs (b, heads, hw, 77) float32, columns (b, 77, 3) from noun_columns, masks (b, 3, H, W) on the latent grid.
    A caption that names no object keeps its attention (renormalised)."""
    h = w = int(probs.shape[2] ** 0.5)
    m = F.adaptive_avg_pool2d(masks, (h, w)).flatten(2).transpose(1, 2) * share            # (b, hw, 3)
    total = m.sum(-1, keepdim=True)
    m = m * (share / total).clamp(max=1)     # overlapping objects share one `share` of the row
    total = m.sum(-1, keepdim=True)
    nouns = (columns.sum(-1) > 0).float()                                                   # (b, 77)
    per_position = columns / columns.sum(1, keepdim=True).clamp_min(1)
    rest = probs * (1 - nouns)[:, None, None]
    rest = rest / rest.sum(-1, keepdim=True).clamp_min(1e-8) * (1 - total)[:, None]
    return rest + (m @ per_position.transpose(1, 2))[:, None]


class GroundingHook(AttentionHook):
    """Keeps, with their gradient, the cross-attention probabilities of every layer whose map is at least
    `min_side` cells high and wide (at 128 px: the 16x16 and 8x8 maps, not the 4x4 one). With `inject` set to
    (rows, columns, masks), those rows of the batch get the layout written into their attention (inject_layout)."""

    def __init__(self, min_side=8):
        self.min_side, self.seen, self.inject = min_side, [], None

    def wants(self, layer):
        return layer.is_cross and min(layer.hw) >= self.min_side

    def edit_probs(self, layer, logits, probs):
        self.seen.append((layer.hw, probs))
        if self.inject is None:
            return probs
        rows, columns, masks = self.inject
        return torch.where(rows[:, None, None, None], inject_layout(probs, columns, masks), probs)


def noun_columns(tok, captions_objects):
    """(captions, [[(colour, shape)] in caption order]) -> (b, 77, 3) float: column j marks the token
    positions of the j-th object's noun (all its sub-tokens), zeros for missing objects."""
    from regulation.targets import resolve_targets
    out = torch.zeros(len(captions_objects), 77, 3)
    for i, (cap, keys) in enumerate(captions_objects):
        if not keys:
            continue
        specs = [f"{s}#{[k[1] for k in keys[:j]].count(s) + 1}" for j, (_, s) in enumerate(keys)]
        for j, t in enumerate(resolve_targets(tok, cap, specs)):
            out[i, t.positions, j] = 1
    return out


def grounding_loss(seen, columns, masks, contrast=0.0, pixel=0.0):
    """TokenCompose's token loss (Wang et al., CVPR 2024): for each object named in the caption, the share of its
    noun's cross-attention (mean over heads) that falls outside the object, squared; mean over objects and layers.
    columns (b, 77, 3) from noun_columns, masks (b, 3, 16, 16) each object's coverage of the latent grid.

    The token loss alone teaches "attend where the objects are", not "where *my* object is" (measured: a noun's
    attention inside the other object ended as high as inside its own). `contrast` adds, with that weight, an
    identity term: inside each object, among the caption's nouns, the object's own noun must take the attention
    (cross-entropy of the nouns' attention shares, mask-weighted mean over the object's cells). It only acts where
    a caption names two or more objects.

    Both terms can be met by emptying the words: a noun's attention pushed down outside its object goes to the
    end-of-text and padding states (docs/testbed.md). `pixel` adds,
    with that weight, TokenCompose's pixel loss: the noun's share of each row (its probability, summed over its
    sub-tokens, mean over heads) against the object's mask, binary cross-entropy over the map, so inside its object
    the noun must take the row, not just more of it than elsewhere."""
    present = columns.sum(1) > 0                                                    # (b, 3)
    if not present.any():
        return torch.zeros(())
    several = present.sum(1) >= 2                                                   # (b,)
    losses = []
    for (h, w), probs in seen:
        a = probs.mean(1) @ columns                                                 # (b, hw, 3)
        m = F.adaptive_avg_pool2d(masks, (h, w)).flatten(2).transpose(1, 2)         # (b, hw, 3)
        inside = (a * m).sum(1) / a.sum(1).clamp_min(1e-8)                          # (b, 3)
        loss = ((1 - inside) ** 2)[present].mean()
        if contrast and several.any():
            share = a / a.sum(-1, keepdim=True).clamp_min(1e-8)   # (b, hw, 3); absent objects' columns are 0
            nll = -(share.clamp_min(1e-8).log() * m).sum(1) / m.sum(1).clamp_min(1e-8)  # (b, 3)
            keep = present & several[:, None] & (m.sum(1) > 0)
            if keep.any():
                loss = loss + contrast * nll[keep].mean()
        if pixel:
            bce = F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), m.clamp(0, 1), reduction="none").mean(1)  # (b, 3)
            loss = loss + pixel * bce[present].mean()
        losses.append(loss)
    return torch.stack(losses).mean()


def optimizer_step(loss, params, opt, ema, ema_max, step):
    """One denoiser update: backward, gradients clipped to norm 1, the optimiser's step, then the EMA weights (decay
    warming up to ema_max). The UNet's and the SD 3.5 testbed's MMDiT train with it."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        d = min(ema_max, (1 + step) / (10 + step))
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1 - d)


def train_unet(model, args, run, data, metadata, stage="unet"):
    """The UNet alone: the text encoder and the VAE are frozen.

    stage "unet": the diffusion loss from the model's initial weights. Stage "ground": continues from the unet
    stage's result (its EMA weights) with a fresh optimiser, adding `--ground-weight` x the grounding loss: each
    noun's cross-attention, at the 16x16 and 8x8 layers, pulled into its own object's region."""
    tok = Tokenizer(pad_with_eot=model.cfg.text.pad_with_eot)
    ground = stage == "ground"
    steps, lr0, warmup = ((args.ground_steps, args.ground_lr, args.ground_warmup) if ground
                          else (args.unet_steps, args.lr, args.warmup))
    seed = args.seed + (5 if ground else 2)
    hook = GroundingHook()
    if ground:
        if data.get("masks") is None:
            raise SystemExit(f"{run / 'latents.pt'} has no object masks (written by an older version of this "
                             "tool): delete it and rerun to encode the dataset again")
        model.set_hooks([hook])
    n = len(data["objects"])
    empty = tok([""])
    sched = Schedule.for_model(model.cfg)
    abar = sched.alphas_cumprod
    unet, text = model.unet, model.cond_stage_model.eval().requires_grad_(False)
    if args.pad_clean:   # the frozen encoder's states of the empty prompt, as swap_tail's source rows
        with torch.no_grad():
            blank = (text(empty).expand(args.batch, -1, -1), empty.expand(args.batch, -1))
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    state, step, before = load_state(run / f"{stage}.pt"), 0, 0.0
    if state:
        unet.load_state_dict(state["unet"]), opt.load_state_dict(state["opt"])
        ema, step = state["ema"], state["step"]
        before = state.get("seconds", 0.0)  # training time of the earlier, interrupted sessions
    scale = model.cfg.vae.scale_factor
    g = torch.Generator().manual_seed(seed + step)
    rng = np.random.default_rng(seed + 1 + step)
    log = (run / f"{stage}_log.jsonl").open("a")
    bar = tqdm(total=steps, initial=step, desc=stage)
    unet.train()
    t_start, losses, glosses, seconds = time.time(), [], [], before
    while step < steps:
        idx = torch.randint(0, n, (args.batch,), generator=g)
        noise = torch.randn(data["mean"][idx].shape, generator=g)
        z = (data["mean"][idx].float() + data["std"][idx].float() * noise) * scale
        # each caption names its scene's objects in a random order; `order` keeps which object came where. The
        # draws interleave per caption as caption_for(shuffle=True) makes them: the unet stage's captions are the
        # ones that trained the shipped model
        order, caps = [], []
        for k in idx.tolist():
            order.append(rng.permutation(len(data["objects"][k])))
            caps.append(shapes.caption_for([data["objects"][k][j] for j in order[-1]], rng, shuffle=False))
        ids = tok(caps)
        drop = torch.rand(args.batch, generator=g) < 0.1  # unconditional examples teach guidance
        ids[drop] = empty
        with torch.no_grad():
            context = text(ids)
            # for a share of the examples, everything from the end-of-text token on comes from the next caption
            # of the batch: only the word states always describe the image (see the module docstring)
            swap = (torch.rand(args.batch, generator=g) < args.pad_swap) & ~drop & ~drop.roll(-1)
            if swap.any():
                context = torch.where(swap[:, None, None], swap_tail(context, ids, tok.eos_id), context)
            # "clean padding": of the others, this share get the empty prompt's end-of-text and padding states,
            # which describe no image (drawn only when asked for: the default run's random stream stays the one
            # that trained the shipped model)
            if args.pad_clean:
                clean = (torch.rand(args.batch, generator=g) < args.pad_clean) & ~drop & ~swap
                context = torch.where(clean[:, None, None], swap_tail(context, ids, tok.eos_id, *blank), context)
        t = torch.randint(0, sched.num_train_timesteps, (args.batch,), generator=g)
        eps = torch.randn(z.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * eps
        lr = lr0 * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        # min-SNR-gamma weighting (Hang et al., ICCV 2023) for epsilon prediction: min(SNR, gamma) / SNR
        snr = abar[t] / (1 - abar[t])
        w = snr.clamp(max=args.min_snr) / snr
        if ground:
            # a share of the conditional examples, at every timestep, get their scene's layout written into the
            # nouns' attention (--ground-inject): the drawn object must then follow the noun that holds a region
            inject = (torch.rand(args.batch, generator=g) < args.ground_inject) & ~drop if args.ground_inject else None
            keys, masks = [], torch.zeros(args.batch, 3, *data["masks"][0].shape[-2:])
            for i, (k, o) in enumerate(zip(idx.tolist(), order)):
                masks[i, :len(o)] = data["masks"][k][torch.as_tensor(o)].float()
                keys.append([data["objects"][k][j] for j in o])
            if inject is not None:
                hook.inject = (inject, noun_columns(tok, [(c, kk if r else []) for c, kk, r in
                                                         zip(caps, keys, inject.tolist())]), masks)
            # no grounding target for unconditional or injected examples, nor (with --ground-max-t) where the
            # noise hides the layout
            keys = [[] if drop[i] or t[i] >= args.ground_max_t or (inject is not None and inject[i]) else kk
                    for i, kk in enumerate(keys)]
        loss = (w * (unet(zt, t, context) - eps).pow(2).mean((1, 2, 3))).mean()
        if ground:
            gl = grounding_loss(hook.seen, noun_columns(tok, list(zip(caps, keys))), masks,
                                contrast=args.ground_contrast, pixel=args.ground_pixel)
            glosses.append(gl.item())
            loss = loss + args.ground_weight * gl
        hook.seen = []  # the kept probabilities hold this step's graph
        optimizer_step(loss, params, opt, ema, args.ema, step)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}",
                        **({"ground": f"{glosses[-1]:.3f}"} if ground else {}))
        if step % args.save_every == 0 or step == steps:
            seconds = before + time.time() - t_start  # what the state (and the stage's timing) records
            save_state(run / f"{stage}.pt", unet=unet.state_dict(), opt=opt.state_dict(), ema=ema, step=step,
                       seconds=seconds)
            log.write(json.dumps(dict(step=step, loss=float(np.mean(losses)), seconds=seconds,
                                      **({"ground": float(np.mean(glosses))} if ground else {}))) + "\n")
            log.flush()
            losses, glosses = [], []
        if args.snapshot_every and step % args.snapshot_every == 0 and step < steps:
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                for e, p in zip(ema, params):
                    p.copy_(e)
            snapshot(model, run / f"snapshot-{'ground-' if ground else ''}{step:06d}.safetensors",
                     dict(metadata, **{f"minisd_{stage}_step": str(step)}))
            with torch.no_grad():
                for v, p in zip(live, params):
                    p.copy_(v)
    bar.close()
    model.set_hooks([])
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return seconds


def ground_from(args, run, record):
    """The ground stage on a checkpoint this tool wrote: its frozen CLIP and VAE, its UNet as the start. The
    training times of the checkpoint (its metadata) and of this stage are added up in the new file's metadata."""
    from minisd.loading import load_model
    model = load_model(args.init)
    meta = model.metadata or {}
    model.unet.requires_grad_(True)
    data = encode_dataset(model, args, run)  # the checkpoint's own VAE: the latents its UNet was trained on
    metadata = {"minisd_training": json.dumps(vars(args)), "minisd_clip_heldout": meta.get("minisd_clip_heldout", "{}"),
                "minisd_init": str(args.init), "minisd_init_training": meta.get("minisd_training", "{}")}
    seconds = train_unet(model, args, run, data, metadata, stage="ground")
    record("ground_s", seconds)
    timings = dict(json.loads(meta.get("minisd_timings", "{}")), ground_s=seconds)
    snapshot(model, args.out, dict(metadata, minisd_timings=json.dumps(timings)))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB); times {timings}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="weights/minisd-shapes.safetensors")
    ap.add_argument("--run", default="runs/shapes", help="folder for resumable state (default: %(default)s)")
    ap.add_argument("--stage", choices=["all", "clip", "vae", "unet", "ground"], default="all",
                    help="run one stage (the others must be done in --run) or all of them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--clip-steps", type=int, default=1000)
    ap.add_argument("--clip-batch", type=int, default=128)
    ap.add_argument("--clip-lr", type=float, default=2e-3)
    ap.add_argument("--clip-pool", type=int, default=5000, help="scenes the tiny CLIP sees (64 px)")
    ap.add_argument("--clip-eval", type=int, default=200, help="held-out scenes for the retrieval check")
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-from", help="take the VAE from a checkpoint this tool wrote (same VAE config) "
                                       "instead of training it")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--vae-pool", type=int, default=3000, help="scenes the VAE's crops come from")
    ap.add_argument("--dataset", type=int, default=10000, help="training scenes encoded for the UNet")
    ap.add_argument("--unet-steps", type=int, default=9000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting")
    ap.add_argument("--pad-swap", type=float, default=0.5,
                    help="share of examples whose end-of-text and padding states come from another caption")
    ap.add_argument("--pad-clean", type=float, default=0.0,
                    help="share of the other examples whose end-of-text and padding states are the empty prompt's "
                         "(default 0)")
    ap.add_argument("--ground-steps", type=int, default=900,
                    help="steps of the ground stage after the unet stage (default %(default)s; 0: none)")
    ap.add_argument("--ground-weight", type=float, default=0.03, help="weight of the grounding loss")
    ap.add_argument("--ground-lr", type=float, default=1e-4)
    ap.add_argument("--ground-max-t", type=int, default=600,
                    help="ground only the examples noised to a timestep below this (default %(default)s; 1000: all)")
    ap.add_argument("--ground-contrast", type=float, default=0.0,
                    help="weight of the grounding loss's identity term (inside each object its own noun, not the "
                         "other's; default 0: none)")
    ap.add_argument("--ground-pixel", type=float, default=1.0,
                    help="weight of TokenCompose's pixel loss: inside its object the noun takes the row's attention, "
                         "outside it none (default %(default)s; 0: the token loss alone)")
    ap.add_argument("--ground-inject", type=float, default=0.25,
                    help="share of examples whose nouns' attention gets the scene's layout written in (any timestep)")
    ap.add_argument("--ground-warmup", type=int, default=50)
    ap.add_argument("--init", help="--stage ground only: start from a checkpoint this tool wrote (its frozen CLIP, "
                                   "VAE and UNet) instead of the stages' state in --run")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--snapshot-every", type=int, default=0, help="write run/snapshot-STEP.safetensors this often")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = shapes_config()
    model = StableDiffusion(cfg)
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}

    def record(name, seconds):
        timings[name] = seconds
        (run / "timings.json").write_text(json.dumps(timings))

    def timed(name, fn, *a):
        t0 = time.time()
        out = fn(*a)
        record(name, timings.get(name, 0) + time.time() - t0)
        return out

    if args.init and args.stage != "ground":
        raise SystemExit("--init is for --stage ground only")
    if args.stage == "ground" and args.init:
        return ground_from(args, run, record)
    needed = {"vae": ["clip.pt", "clip_eval.json"], "unet": ["clip.pt", "clip_eval.json", "vae.pt"],
              "ground": ["clip.pt", "clip_eval.json", "vae.pt", "unet.pt"]}.get(args.stage, [])
    missing = [name for name in needed if not (run / name).is_file()]
    if missing:
        raise SystemExit(f"--stage {args.stage} needs the earlier stages done in {run}: missing {', '.join(missing)} "
                         f"(run them with --stage clip / --stage vae, or use --stage all)")
    if args.stage in ("all", "clip"):
        clip_eval = timed("clip_s", train_clip, model, args, run)
    else:
        clip_eval = json.loads((run / "clip_eval.json").read_text())
        from tools.testbed import tinyclip
        tinyclip.TinyCLIP(model.cond_stage_model, 0).load_state_dict(load_state(run / "clip.pt")["clip"])
    if args.stage == "clip":
        return  # one stage alone writes only its state in --run; the model file needs all three
    if args.stage in ("all", "vae"):
        timed("vae_s", train_vae, model, args, run)
        if args.stage == "vae":
            return
    else:
        model.first_stage_model.load_state_dict(load_state(run / "vae.pt")["vae"])
    metadata = {"minisd_training": json.dumps(vars(args)), "minisd_clip_heldout": json.dumps(clip_eval)}
    data = timed("encode_s", encode_dataset, model, args, run)
    # SD's trick: scale latents to unit variance so the noise schedule fits them
    cfg.vae.scale_factor = float(1.0 / data["mean"].float().std())
    if args.stage in ("all", "unet"):
        # each UNet stage counts its own time across interruptions (a killed session never returns to timed())
        record("unet_s", train_unet(model, args, run, data, metadata))
    if args.stage == "ground":
        state = load_state(run / "unet.pt")
        with torch.no_grad():
            for e, p in zip(state["ema"], model.unet.parameters()):
                p.copy_(e)
    if args.stage in ("all", "ground") and args.ground_steps:
        record("ground_s", train_unet(model, args, run, data, metadata, stage="ground"))
    model.cfg = cfg
    snapshot(model, args.out, dict(metadata, minisd_timings=json.dumps(timings)))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB); times {timings}")


if __name__ == "__main__":
    main()
