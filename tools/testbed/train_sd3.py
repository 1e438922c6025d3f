"""Train a tiny Stable Diffusion 3.5 on the shapes world (tools/testbed/shapes.py), on CPU, from scratch: the
testbed on which regulation of joint attention is measured (docs/testbed.md).

What SD 3.5 freezes, this freezes; where SD 3.5 reads the words, so does this. Three stages, each seeded and
resumable from `--run` (rerun the same command after an interruption):
  spiece  a SentencePiece model (T5's ids: pad 0, end-of-text 1, unknown 2) trained on the shapes captions: the
          tiny T5's tokenizer. It travels in the model file's metadata (`minisd_t5_spiece`).
  t5      a tiny encoder of T5's architecture (transformers' T5EncoderModel, minisd/t5.py) trained as the tiny CLIP
          was (tools/testbed/tinyclip.py): contrastively against rendered scenes, each image also against hard
          negatives of its caption; then FROZEN, as SD 3 freezes T5-XXL.
  mmdit   the MMDiT alone on latents of the shipped UNet testbed's training scenes (the same seed, so the same
          10,000 scenes), rectified flow (x_t = (1 - t) x_0 + t noise, the model predicts noise - x_0) with SD 3's
          logit-normal timesteps put through the shift it samples with, 10% empty captions for guidance, EMA.

The text encoders and the VAE are the shipped testbed's (weights/minisd-shapes.safetensors), frozen: its tiny CLIP
in both of SD 3's CLIP slots (clip_l and clip_g, read at the penultimate layer without the final LayerNorm as SD 3
reads them; clip_g's projection the identity, so the pooled text is the tiny CLIP's end-of-text state twice), and
its 4-channel VAE (SD 3's has 16: the shipped one is kept, so the testbed's latents, judge round trip and cost stay
those of the UNet testbed). No stage writes layouts into the attention: whatever layout handle the joint attention
has, the model learned from the diffusion loss alone.

The result is one official-layout SD 3.5 single file (float16): `model.diffusion_model.*`, `first_stage_model.*`,
`text_encoders.{clip_l, clip_g, t5xxl}.transformer.*`, with its config in the metadata.

    python -m tools.testbed.train_sd3 --out weights/minisd-shapes-sd3.safetensors --threads 2
    python -m tools.testbed.train_sd3 --mmdit-steps 500 --run /tmp/try --out /tmp/try/m.safetensors  # a timing run
"""
import argparse
import base64
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from minisd.checkpoint import save_checkpoint
from minisd.loading import load_model
from minisd.config import MMDiTConfig, ModelConfig, T5Config
from minisd.model_sd3 import StableDiffusion3
from minisd.t5 import T5Tokenizer
from minisd.tokenizer import Tokenizer
from tools.testbed import shapes, tinyclip
from tools.testbed.train import (encode_dataset, load_state, optimizer_step, save_state, swap_tail,
                                 train_contrastive)

UNET_TESTBED = "weights/minisd-shapes.safetensors"


def sd3_shapes_config(base, t5_vocab, args):
    """The tiny SD 3.5: SD 3.5 Large's block (qk RMSNorm, no image-only attn2) in miniature on the 16x16 latents
    (`--patch` 1: 256 image tokens; 2, SD 3's own: 64), CLIP's 77 tokens and a short T5 (`--t5-length`) beside them."""
    clip = replace(base.text, penultimate=True, final_norm=False, key_layout="sd3")
    width = 2 * clip.hidden_size   # CLIP-L and CLIP-G side by side; T5's width is the context's
    return ModelConfig(
        name="minisd-shapes-sd3", unet=None, prediction="flow", image_size=128,
        text=clip, text2=replace(clip, projection_dim=clip.hidden_size),
        vae=replace(base.vae), shift=args.shift, default_steps=50, default_guidance=5.0, default_sampler="euler",
        mmdit=MMDiTConfig(depth=args.depth, hidden_size=args.width, num_heads=args.heads, patch_size=args.patch,
                          in_channels=base.vae.z_channels, pos_embed_max_size=32, adm_in_channels=width,
                          context_dim=width, qk_norm=True),
        t5=T5Config(vocab_size=t5_vocab, d_model=width, d_kv=32, d_ff=2 * width, num_layers=3,
                    num_heads=width // 32, min_length=args.t5_length))


def sincos_2d(dim, n):
    """A fixed n x n table of 2-D sine-cosine positions (the MAE / DiT table diffusers gives SD 3), (n * n, dim)."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    gy, gx = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")
    table = np.concatenate([one_axis(dim // 2, gx.ravel()), one_axis(dim // 2, gy.ravel())], 1)
    return torch.from_numpy(table).float()


def init_mmdit(mmdit):
    """DiT's initialisation (Peebles & Xie): Xavier linears, every adaLN modulation and the final projection zero, so
    each block starts as the identity; the position table fixed."""
    for m in mmdit.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for block in mmdit.joint_blocks:
        for stream in (block.context_block, block.x_block):
            nn.init.zeros_(stream.adaLN_modulation[-1].weight), nn.init.zeros_(stream.adaLN_modulation[-1].bias)
    for m in (mmdit.final_layer.adaLN_modulation[-1], mmdit.final_layer.linear):
        nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)
    for m in (mmdit.t_embedder.mlp, mmdit.y_embedder.mlp):
        nn.init.normal_(m[0].weight, std=0.02), nn.init.normal_(m[2].weight, std=0.02)
    n = mmdit.cfg.pos_embed_max_size
    mmdit.pos_embed.copy_(sincos_2d(mmdit.cfg.hidden_size, n)[None])


# ----------------------------------------------------------------------------------------------------- stages

def caption_corpus(seed, n):
    rng = np.random.default_rng(seed)
    return [shapes.caption(shapes.sample_scene(rng), rng) for _ in range(n)]


def train_spiece(args, run):
    path = run / "spiece.model"
    if not path.is_file():
        import sentencepiece
        corpus = run / "captions.txt"
        corpus.write_text("\n".join(caption_corpus(args.seed + 30, 20000)))
        # a word-level vocabulary: the shapes world has about forty words, each its own piece
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(run / "spiece"), vocab_size=args.t5_vocab,
            model_type=args.t5_model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
            minloglevel=2)
    tok = T5Tokenizer(path, min_length=args.t5_length, length=args.t5_length)
    longest = max(len(tok.ids(c)) for c in caption_corpus(args.seed + 31, 2000))
    if longest > args.t5_length:
        raise SystemExit(f"captions take up to {longest} T5 tokens, more than --t5-length {args.t5_length}")
    return tok


class T5CLIP(nn.Module):
    """tinyclip.TinyCLIP with T5 as its text tower: T5's encoder is bidirectional and has no end-of-text summary to
    pool, so a caption is the mean of its token states (padding left out)."""

    def __init__(self, t5, dim=64):
        super().__init__()
        self.text = t5
        self.text_projection = nn.Linear(t5.transformer.config.d_model, dim, bias=False)
        self.image = tinyclip.ImageTower(dim)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def encode_text(self, ids):
        h = self.text(ids)
        keep = (ids != 0).float()[..., None]
        return F.normalize(self.text_projection((h * keep).sum(1) / keep.sum(1)), dim=-1)

    def encode_image(self, x):
        return F.normalize(self.image(x), dim=-1)


def train_t5(t5, tok, args, run):
    """Contrastive caption <-> render training of the T5 tower, as train.py trains the tiny CLIP."""
    return train_contrastive(T5CLIP(t5), lambda caps, negs: (tok(caps), tok(negs)), tok, run, "t5", "model",
                             args.seed, args.save_every, args.t5_steps, args.t5_batch, args.t5_lr, args.t5_pool,
                             args.t5_eval)


def flow_timesteps(n, shift, generator):
    """SD 3's training timesteps: logit-normal (m 0, s 1), then the shift that inference uses, so training spends its
    steps where sampling does (more at high noise, where the shapes world's layout is decided)."""
    t = torch.sigmoid(torch.randn(n, generator=generator))
    return shift * t / (1 + (shift - 1) * t)


def train_mmdit(model, tok_t5, args, run, data):
    """The MMDiT alone: text encoders and VAE frozen. Captions are drawn afresh each time a scene is used; for
    `--pad-swap` of them CLIP's states from the end-of-text token on (and the pooled end-of-text state) come from
    another caption of the batch, as the UNet testbed trains (tools/testbed/train.py), so the word columns are the
    only CLIP columns that always describe the image."""
    tok = Tokenizer(pad_with_eot=True)
    text = model.text_encoders.eval().requires_grad_(False)
    mmdit = model.mmdit
    params = list(mmdit.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    state, step, before = load_state(run / "mmdit.pt"), 0, 0.0
    warm_from = 0   # the warm-up runs again from here where the optimiser's moments start afresh
    if state:
        mmdit.load_state_dict(state["mmdit"])
        ema, step, before = state["ema"], state["step"], state.get("seconds", 0.0)
        if "opt" in state:
            opt.load_state_dict(state["opt"])
        else:   # a run seeded by --resume-from
            warm_from = step
    v = model.cfg.vae
    g = torch.Generator().manual_seed(args.seed + 2 + step)
    rng = np.random.default_rng(args.seed + 3 + step)
    n = len(data["objects"])
    log = (run / "mmdit_log.jsonl").open("a")
    bar = tqdm(total=args.mmdit_steps, initial=step, desc="mmdit")
    mmdit.train()
    t_start, losses, seconds = time.time(), [], before
    while step < args.mmdit_steps:
        idx = torch.randint(0, n, (args.batch,), generator=g)
        noise = torch.randn(data["mean"][idx].shape, generator=g)
        x0 = ((data["mean"][idx].float() + data["std"][idx].float() * noise) - v.shift_factor) * v.scale_factor
        caps = [shapes.caption_for([data["objects"][k][j] for j in rng.permutation(len(data["objects"][k]))],
                                   rng, shuffle=False) for k in idx.tolist()]
        drop = torch.rand(args.batch, generator=g) < 0.1
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        clip_ids = tok(caps)
        with torch.no_grad():
            context, pooled = text([clip_ids, clip_ids, tok_t5(caps)])
            swap = (torch.rand(args.batch, generator=g) < args.pad_swap) & ~drop & ~drop.roll(-1)
            if swap.any():
                clip = context[:, :77]
                context = torch.cat([torch.where(swap[:, None, None], swap_tail(clip, clip_ids, tok.eos_id), clip),
                                     context[:, 77:]], 1)
                pooled = torch.where(swap[:, None], pooled.roll(-1, 0), pooled)
        t = flow_timesteps(args.batch, model.cfg.shift, g)
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        lr = args.lr * min(1.0, (step + 1 - warm_from) / args.warmup) * (
            0.5 * (1 + math.cos(math.pi * step / args.mmdit_steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.mse_loss(mmdit(xt, t * 1000, context=context, y=pooled), eps - x0)
        optimizer_step(loss, params, opt, ema, args.ema, step)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % args.save_every == 0 or step == args.mmdit_steps:
            seconds = before + time.time() - t_start
            save_state(run / "mmdit.pt", mmdit=mmdit.state_dict(), opt=opt.state_dict(), ema=ema, step=step,
                       seconds=seconds)
            log.write(json.dumps(dict(step=step, loss=float(np.mean(losses)), seconds=seconds)) + "\n")
            log.flush()
            losses = []
        if args.snapshot_every and step % args.snapshot_every == 0 and step < args.mmdit_steps:
            write_model(model, ema, run / f"snapshot-{step:06d}.safetensors", args, run,
                        {"minisd_mmdit_step": str(step)})
    bar.close()
    return ema, seconds


def write_model(model, ema, path, args, run, extra=None):
    """The EMA weights in float16, official layout, the T5 tokenizer and the training settings in the metadata."""
    half = StableDiffusion3(model.cfg)
    half.load_state_dict(model.state_dict())
    with torch.no_grad():
        for e, p in zip(ema, half.mmdit.parameters()):
            p.copy_(e)
    meta = {"minisd_training": json.dumps(vars(args)),
            "minisd_t5_spiece": base64.b64encode((run / "spiece.model").read_bytes()).decode(),
            "minisd_t5_heldout": (run / "t5_eval.json").read_text(), **(extra or {})}
    timings = run / "timings.json"
    if timings.is_file():
        meta["minisd_timings"] = timings.read_text()
    save_checkpoint(half.half(), path, metadata=meta)


def seed_run(path, run, args):
    """Start an empty `run` folder from a file this tool wrote (`--resume-from`): its T5 tokenizer, its frozen T5,
    its MMDiT's (EMA) weights and the step it reached, so training goes on where a lost run folder stopped. The
    optimiser's moments start afresh; the VAE latents are encoded again."""
    if any(run.iterdir()):
        raise SystemExit(f"--resume-from starts an empty --run folder; {run} is not empty")
    src = load_model(path)
    meta = getattr(src, "metadata", None) or {}
    if "minisd_t5_spiece" not in meta or "minisd_mmdit_step" not in meta:
        raise SystemExit(f"{path} was not written by tools/testbed/train_sd3.py (no tokenizer or step in its metadata)")
    (run / "spiece.model").write_bytes(base64.b64decode(meta["minisd_t5_spiece"]))
    tower = T5CLIP(src.text_encoders.t5xxl.float())
    save_state(run / "t5.pt", model=tower.state_dict(), step=args.t5_steps)
    (run / "t5_eval.json").write_text(meta.get("minisd_t5_heldout", "{}"))
    mmdit = src.mmdit.float()
    ema = [p.detach().clone() for p in mmdit.parameters()]
    timings = json.loads(meta.get("minisd_timings", "{}"))
    (run / "timings.json").write_text(json.dumps(timings))
    save_state(run / "mmdit.pt", mmdit=mmdit.state_dict(), ema=ema, step=int(meta["minisd_mmdit_step"]),
               seconds=timings.get("mmdit_s", 0.0))
    print(f"--run {run} started from {path}: step {meta['minisd_mmdit_step']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="weights/minisd-shapes-sd3.safetensors")
    ap.add_argument("--run", default="runs/shapes-sd3", help="folder for resumable state (default: %(default)s)")
    ap.add_argument("--base", default=UNET_TESTBED, help="the UNet testbed whose tiny CLIP and VAE are taken")
    ap.add_argument("--stage", choices=["all", "spiece", "t5", "mmdit", "export"], default="all",
                    help="one stage (the earlier ones done in --run), or export: write --out from the MMDiT's "
                         "state in --run as it is now (a snapshot of a run still going)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--t5-vocab", type=int, default=128)
    ap.add_argument("--t5-model-type", default="bpe",
                    help="SentencePiece model type (T5's is unigram; on this little text bpe keeps whole words)")
    ap.add_argument("--t5-length", type=int, default=24, help="T5 tokens (captions need up to about 20)")
    ap.add_argument("--t5-steps", type=int, default=800)
    ap.add_argument("--t5-batch", type=int, default=128)
    ap.add_argument("--t5-lr", type=float, default=2e-3)
    ap.add_argument("--t5-pool", type=int, default=5000)
    ap.add_argument("--t5-eval", type=int, default=200)
    ap.add_argument("--dataset", type=int, default=10000, help="training scenes encoded (the UNet testbed's)")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--patch", type=int, default=2, choices=[1, 2], help="latent cells a side per image token")
    ap.add_argument("--shift", type=float, default=1.0,
                    help="the timestep shift, trained and sampled: 1.0, SD 3's base schedule, at this size (its "
                         "3.0 is for 1024 px; docs/testbed.md)")
    ap.add_argument("--mmdit-steps", type=int, default=9000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--pad-swap", type=float, default=0.5,
                    help="share of examples whose CLIP end-of-text and padding states come from another caption")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--snapshot-every", type=int, default=0)
    ap.add_argument("--resume-from", help="a file this tool wrote: start an empty --run from it (its tokenizer, T5, "
                    "MMDiT weights and step) and go on training, where the run folder itself was lost")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    if args.resume_from:
        seed_run(args.resume_from, run, args)
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}

    def timed(name, fn, *a):
        t0 = time.time()
        out = fn(*a)
        timings[name] = timings.get(name, 0) + time.time() - t0
        (run / "timings.json").write_text(json.dumps(timings))
        return out

    tok_t5 = timed("spiece_s", train_spiece, args, run)
    if args.stage == "spiece":
        return
    base = load_model(args.base)
    torch.manual_seed(args.seed)
    cfg = sd3_shapes_config(base.cfg, tok_t5.sp.get_piece_size(), args)
    model = StableDiffusion3(cfg)
    for slot in (model.text_encoders.clip_l, model.text_encoders.clip_g):
        slot.text_model.load_state_dict(base.cond_stage_model.text_model.state_dict())
    with torch.no_grad():
        model.text_encoders.clip_g.transformer.text_projection.weight.copy_(torch.eye(cfg.text2.hidden_size))
    model.first_stage_model.load_state_dict(base.first_stage_model.state_dict())
    init_mmdit(model.mmdit)
    t5_eval = timed("t5_s", train_t5, model.text_encoders.t5xxl, tok_t5, args, run)
    if args.stage == "t5":
        return
    if load_state(run / "t5.pt"):
        T5CLIP(model.text_encoders.t5xxl).load_state_dict(load_state(run / "t5.pt")["model"])
    data = timed("encode_s", encode_dataset, base, args, run)
    latents = data["mean"].float()
    cfg.vae.shift_factor = float(latents.mean())
    cfg.vae.scale_factor = float(1.0 / (latents - latents.mean()).std())
    if args.stage == "export":
        state = load_state(run / "mmdit.pt")
        model.mmdit.load_state_dict(state["mmdit"])
        write_model(model, state["ema"], args.out, args, run, {"minisd_mmdit_step": str(state["step"])})
        print(f"wrote {args.out} from step {state['step']}")
        return
    ema, seconds = train_mmdit(model, tok_t5, args, run, data)
    timings["mmdit_s"] = seconds
    (run / "timings.json").write_text(json.dumps(timings))
    write_model(model, ema, args.out, args, run, {"minisd_t5_heldout": json.dumps(t5_eval),
                                                  "minisd_mmdit_step": str(args.mmdit_steps)})
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB); times {timings}")


if __name__ == "__main__":
    main()
