"""Attention Regulation: an inference-time edit of the cross-attention logits.

Zhang, Teoh, Lim, Sim, Kawaguchi, "Enhancing Semantic Fidelity in Text-to-Image Synthesis: Attention Regulation
in Diffusion Models" (ECCV 2024, arXiv 2403.06381). At each early sampling step, inside each chosen
cross-attention layer, a few steps of gradient descent fit an additive term Delta to the logits of the target
tokens, so that every target token gets (a) a strong peak somewhere (its 0.9-quantile near 0.9) and (b) a fair
share of the image (its mean near tau / k). Delta is a sum of fixed Gaussian bumps on the w x w map; only their
weights W are optimised. No gradient ever flows through the UNet.

The defaults reproduce the authors' released code number for number (see shared/design/attention-regulation.md).
Where this code goes beyond it, it says so:
  - `sigma_rule`: the released `w // 16` is 0 below 16 x 16 maps (a division by zero); "max1" = max(1, w // 16).
  - `restore_special`/`keep_rows_normalised`: the start/end-of-text columns are put back after the softmax, which
    leaves rows that no longer sum to 1; optionally rescale the other columns so that they do.
  - non-square maps (h != w): sigma from the shorter side, centres along each side as along a square one's.
  - a list of generators, one per image, makes each image of a batch its own problem (see regulate_logits).

Speed: only the k target columns of the logits move, so the softmax over the other L - k columns collapses to one
log-sum-exp column computed once per step, and the 20 iterations work on (N, k, w*w) tensors with an analytic
gradient (no autograd, so it also runs under torch.no_grad / inference_mode).

Precision: the spec's gradient descent (step 100 N) oscillates and keeps the best of its iterations, and the
quantile's gradient jumps when two pixels swap ranks, so float32 rounding can change the result far beyond 1e-5
(in some runs the released algorithm in float32 differs from itself in float64 by O(1)). In float64 this code
and the straightforward reference (tools/bench/reference_regulation.py) agree to ~1e-10.
"""
from dataclasses import dataclass, replace
import functools
import math

import torch
import torch.nn.functional as F

from minisd.attention import AttentionHook, cross_block
from regulation.joint_regulation import JointBlockSelector, is_joint, special_columns
from regulation.layers import LayerSelector
from regulation.registry import Knob, Method, editor_run, register
from regulation.targets import eot_position


@dataclass
class RegulationConfig:
    iterations: int = 20            # gradient steps per layer per sampling step
    lr: float = 100.0               # multiplied by N (images x heads): the loss is a mean over N
    quantile: float = 0.9           # which quantile of a target's map must be high ...
    quantile_goal: float = 0.9      # ... and how high
    quantile_weight: float = 1.0
    mean_weight: float = 80.0       # pull each target's mean attention to tau / k
    reg_weight: float = 0.09        # L2 on the Gaussian weights W
    tau_per_target: float = 0.2     # tau = min(tau_max, tau_per_target * k): the share of the image all targets get
    tau_max: float = 1.0
    blend: float = 0.25             # applied term = blend * previous step's best + (1 - blend) * this step's best
    decay: float = 0.99             # the applied term is scaled by decay ** step
    restore_special: bool = True    # put back the start- and end-of-text columns of the unedited softmax
    keep_rows_normalised: bool = False  # option: then rescale the other columns so that rows sum to 1
    # "max1" is the default: it equals the released w // 16 wherever that is defined (maps of 16 x 16 and larger,
    # i.e. every default SD layer at 512 px), and gives sigma = 1 instead of a division by zero on smaller maps
    # (256 px images, the tiny test models). "released" raises a clear error there instead.
    sigma_rule: str = "max1"
    edit_steps: int | None = None   # None: the paper's 25 of 50, scaled (see default_edit_steps)
    layers: tuple | None = None     # layer specs for regulation.layers.LayerSelector; None = the model's default
    seed: int | None = None         # seeds the generator of the random initial W when none is given
    compile: bool = False           # run the iterations as one compiled graph (torch.compile; CUDA graphs on a GPU)
    # One map per target word instead of one per token column (an option; the released code has one per column):
    # a word's columns (its sub-tokens; on joint attention its CLIP and its T5 columns) share one W, the loss reads
    # the sum of their probabilities, and tau counts words. Editors pass each column's word (`words`).
    per_word: bool = False

    def __post_init__(self):
        if self.sigma_rule not in ("released", "max1"):
            raise ValueError(f"sigma_rule must be 'released' or 'max1', got {self.sigma_rule!r}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")

    def tau(self, k):
        return min(self.tau_max, self.tau_per_target * k)


def default_edit_steps(num_steps):
    """The paper edits the first 25 of 50 steps: half of them. For an odd count we round half up (25 steps -> 13),
    not with Python's round, which rounds halves to even (25 -> 12 but 15 -> 8) and would edit no step of 1."""
    return math.floor(num_steps * 25 / 50 + 0.5)


@dataclass
class RegulationState:
    """What one layer carries to the next step: the best weights W (N, C, k) of this step (Delta is linear in W,
    so these stand for the spec's `prev` Delta), plus the losses, for `AttentionRegulation.history`."""
    weights: torch.Tensor
    first_loss: torch.Tensor   # loss of the random initial W
    best_loss: torch.Tensor    # loss of the kept W


# --------------------------------------------------------------------------------------------------------------
# The Gaussian bumps


def gaussian_sigma(h, w, rule="max1"):
    """The released code uses sigma = w // 16 (square maps). Non-square maps use the shorter side."""
    side = min(h, w)
    if rule == "released":
        if side < 16:
            raise ValueError(f"sigma_rule='released' computes sigma = w // 16 = 0 on a {h}x{w} map (a division by "
                             f"zero in the released code); use sigma_rule='max1' for maps smaller than 16x16")
        return side // 16
    return max(1, side // 16)


@functools.lru_cache(maxsize=64)
def gaussian_maps(h, w, sigma, device=torch.device("cpu"), dtype=torch.float32):
    """G of shape (C, h*w): unnormalised Gaussians at centres (i, j) for i (column), j (row) in range(2s, side, 2s),
    the column coordinate in the outer loop as in the released code, so that W[:, c] means the same bump.
    Built once per (map, device); callers must not change it in place."""
    step = 2 * sigma
    centres = [(i, j) for i in range(step, w, step) for j in range(step, h, step)]
    if not centres:
        raise ValueError(f"a {h}x{w} map has no Gaussian centre for sigma={sigma}")
    ci = torch.tensor([c[0] for c in centres], dtype=dtype)[:, None, None]
    cj = torch.tensor([c[1] for c in centres], dtype=dtype)[:, None, None]
    ys = torch.arange(h, dtype=dtype)[None, :, None]
    xs = torch.arange(w, dtype=dtype)[None, None, :]
    g = torch.exp(-((xs - ci) ** 2 + (ys - cj) ** 2) / (2 * sigma ** 2))
    return g.flatten(1).to(device)


# --------------------------------------------------------------------------------------------------------------
# The optimiser


def on_device(values, device, dtype=None):
    """A small constant tensor (index columns, lerp weights) on `device`, made once per value and device: building
    it anew on a GPU is a host-to-device copy, which makes the host wait for the GPU's whole queue. Read-only."""
    return _on_device(tuple(values), torch.device(device), dtype)


@functools.lru_cache(maxsize=256)
def _on_device(values, device, dtype):
    return torch.tensor(values, dtype=dtype, device=device)


def upload(t, device):
    """A tensor drawn on the host onto `device`. On CUDA through pinned memory without blocking: a plain copy from
    pageable memory makes the host wait until the GPU has run everything queued before it, so the host could no
    longer launch ahead of the GPU (the caching host allocator keeps the pinned block until the copy is done)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def initial_weights(generator, n, c, k, device, dtype=torch.float32):
    """W uniform in [0, 1), shape (N, C, k). One generator: one torch.rand draw of that shape, as the released
    code. A list of generators, one per image: image i's (heads, C, k) block comes from generator i, so that image
    i of a batch draws the W it would draw alone with the same seed (the batch is image-major: n = image*heads+head).
    Draws are made on the generator's device, then moved."""
    if isinstance(generator, (list, tuple)):
        if n % len(generator):
            raise ValueError(f"{len(generator)} generators for N={n} rows: N must be images x heads")
        heads = n // len(generator)
        draws = [torch.rand((heads, c, k), generator=g, device=g.device) for g in generator]
        return torch.cat([upload(d, device) for d in draws]).to(dtype)
    gen_device = generator.device if generator is not None else device
    return upload(torch.rand((n, c, k), generator=generator, device=gen_device), device).to(dtype)


def check_targets(targets, num_tokens=None):
    t = [int(x) for x in targets]
    if not t:
        raise ValueError("Attention Regulation needs at least one target token position")
    if len(set(t)) != len(t):
        raise ValueError(f"target positions must be distinct, got {t}")
    bad = [x for x in t if x < 1 or (num_tokens is not None and x >= num_tokens)]
    if bad:
        top = "" if num_tokens is None else f"..{num_tokens - 1}"
        raise ValueError(f"target positions must be in 1{top} (0 is the start-of-text token), got {bad}")
    return t


@functools.lru_cache(maxsize=256)
def _quantile_positions(n, q, dtype=torch.float32):
    """Where torch.quantile(..., interpolation='linear') reads a sorted row of n values: between ranks lo and hi
    with weight frac. Computed in the values' dtype like torch does (0.9 * 1023 is 920.69995 in float32)."""
    rank = torch.tensor(q, dtype=dtype) * (n - 1)
    lo, hi = int(rank.floor()), int(rank.ceil())
    return lo, hi, float(rank - lo)


def optimise_weights(logits, targets, g, w0, config, groups=1, words=None):
    """Gradient descent on W for one layer and step. logits: float32 (N, HW, L); g: (C, HW); w0: (N, C, k).
    Returns the W with the lowest loss seen (each W is scored before its update; the last update is never
    scored), the first loss and that lowest loss. With groups > 1 (one per image), each image keeps its own best
    iteration, scored by its own loss; the losses returned then have one entry per group.

    With z = the target logits + Delta, A = softmax over [rest, z_1..z_k] where `rest` is the log-sum-exp of
    the other L - k logits: the same numbers as the full softmax, on k + 1 columns instead of L.
    Loss = wq mean((q - goal)^2) + wm mean((m - tau/k)^2) + wr mean(W^2) over (n, t), where q is the quantile
    (a lerp of the two neighbouring order statistics) and m the spatial mean of A[n, t]. Its gradient:
      dL/dA[n,t,p] = 2 wq/(Nk) (q - goal) * {1 - frac at rank lo, frac at rank hi}  +  2 wm/(NkHW) (m - tau/k)
      dL/dz[n,t,p] = A[n,t,p] (dL/dA[n,t,p] - sum_t' dL/dA[n,t',p] A[n,t',p])   (softmax backward; rest is fixed)
      dL/dW[n,t,c] = sum_p dL/dz[n,t,p] G[c,p] + 2 wr/(NCk) W[n,t,c]
    The step lr * N cancels the 1/N of the means: each row's update is the same whatever the batch.

    words (RegulationConfig.per_word): each target column's word, 0..k-1 with k words (w0: (N, C, k)). Then word t's
    Delta is added to each of its columns, A[n,t] is the sum of its columns' probabilities, and dL/dz of a column
    is the softmax backward of its word's dL/dA; dL/dW[n,t] sums its columns' dL/dz. None: one word per column.
    """
    n, hw, _ = logits.shape
    c = g.shape[0]
    word_of = None if words is None else on_device(words, logits.device)
    k = len(targets) if words is None else max(words) + 1
    dev = logits.device
    idx = on_device(targets, dev)
    # The log-sum-exp of the non-target columns, read off a log_softmax (one fused pass, about twice as fast as
    # torch.logsumexp here) at column 0, which is never a target: x_0 - log_softmax(x)_0 = logsumexp(x).
    others = logits.index_fill(-1, idx, float("-inf"))
    rest = logits[..., :1] - others.log_softmax(-1)[..., :1]                           # (N, HW, 1)
    base = (logits.index_select(-1, idx) - rest).transpose(1, 2).reshape(-1, hw)     # (N * columns, HW)
    # The quantile reads ascending ranks lo and hi; in a descending topk(hw - lo) they sit at hw-1-lo and hw-1-hi.
    lo, hi, frac = _quantile_positions(hw, config.quantile, logits.dtype)
    top, at_lo, at_hi = hw - lo, hw - 1 - lo, hw - 1 - hi
    at = on_device([at_hi, at_lo], dev)
    lerp_share = on_device([frac, 1 - frac], dev, logits.dtype)   # the quantile's share of ranks [hi, lo]
    goals, score, slopes = _constants(n, k, c, hw, groups, (config.quantile_goal, config.tau(k), config.quantile_weight,
                                                            config.mean_weight, config.reg_weight), dev, logits.dtype)
    step = config.lr * n
    shrink = 1 - step * 2 * config.reg_weight / (n * c * k)   # the L2 term's gradient, folded into the update
    w = w0.transpose(1, 2).reshape(n * k, c)   # (N*k, C): rows of W, one per (n, t)
    args = (base, w, g, goals, score, slopes, lerp_share, at, n, k, top, at_lo, at_hi, frac, step, shrink,
            config.iterations, groups, word_of)
    if config.compile:
        # a CUDA graph's outputs live in its own memory, which its next replay overwrites: keep copies
        best_w, first, best = (t.clone() for t in _compiled_descent(logits.device)(*args))
    else:
        best_w, first, best = _descend(*args)
    return best_w.view(n, k, c).transpose(1, 2), first, best


def _descend(base, w, g, goals, score, slopes, lerp_share, at, n, k, top, at_lo, at_hi, frac, step, shrink,
             iterations, groups, word_of=None):
    """The iterations of optimise_weights on prepared tensors: (best W (groups, ...), first loss, best loss).
    Plain tensor code with Python numbers as constants, so that torch.compile can take it as one graph."""
    hw = base.shape[-1]
    gt = g.t()
    ws, losses = [], []
    for it in range(iterations):
        per_column = w if word_of is None else w.view(n, k, -1)[:, word_of].flatten(0, 1)
        z = torch.addmm(base, per_column, g).view(n, -1, hw)
        a = F.pad(z, (0, 0, 1, 0)).softmax(1)[:, 1:]   # row 0 stands for the L - k other tokens
        if word_of is not None:   # each word's map: its columns' probabilities summed
            column_a, a = a, a.new_zeros(n, k, hw).index_add_(1, word_of, a)
        top_vals, top_idx = a.topk(top, -1)
        q = torch.lerp(top_vals[..., at_lo], top_vals[..., at_hi], frac)
        x = torch.cat([q.flatten(), a.mean(-1).flatten(), w.flatten()]) - goals   # [q - goal, m - tau/k, W]
        ws.append(w)
        losses.append((x * x) @ score)
        if it == iterations - 1:
            break
        gq, gm = (x[:2 * n * k] * slopes).view(2, n, k, 1)
        ga = torch.scatter_add(gm.expand(n, k, hw), -1, top_idx.index_select(-1, at), gq * lerp_share)  # dL/dA
        if word_of is None:
            ga_a = ga * a
            gz = torch.addcmul(ga_a, a, ga_a.sum(1, keepdim=True), value=-1)                 # dL/dz
        else:   # a column's dL/dA is its word's; a word's dL/dz sums its columns'
            ga_a = ga[:, word_of] * column_a
            gz = torch.addcmul(ga_a, column_a, ga_a.sum(1, keepdim=True), value=-1)
            gz = gz.new_zeros(n, k, hw).index_add_(1, word_of, gz)
        w = torch.addmm(w, gz.view(n * k, hw), gt, beta=shrink, alpha=-step)
    # The best W is picked once at the end, on the device (no host sync per iteration on a GPU). argmin takes the
    # first of equal minima, as the released `if loss < best` does; a NaN loss is never the best.
    losses = torch.stack(losses)                                           # (iterations, groups)
    best = torch.nan_to_num(losses, nan=float("inf")).argmin(0)            # (groups,)
    each = torch.arange(groups, device=w.device)
    best_w = torch.stack(ws).view(len(ws), groups, -1)[best, each]
    return best_w, losses[0], losses[best, each]


@functools.lru_cache(maxsize=None)
def _compiled_descent(device):
    """_descend as one compiled graph (RegulationConfig.compile). On a GPU the eager loop is launch-bound (about
    15 small kernels per iteration, 20 iterations per layer and step); "reduce-overhead" replays the whole descent as
    one CUDA graph. Each new shape (map size, targets, batch) compiles once."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    return torch.compile(_descend, fullgraph=True, dynamic=False, mode=mode)


@functools.lru_cache(maxsize=256)
def _constants(n, k, c, hw, groups, numbers, device, dtype):
    """The optimiser's constant tensors for one problem shape, made once per shape and device (each is a few kernels
    on a GPU, in every regulated layer and step otherwise); read-only. numbers: (quantile goal, tau, quantile
    weight, mean weight, L2 weight). Returns (goals, score, slopes):
      goals  = [goal (N k), tau/k (N k), 0 (N k C)], subtracted from [q, m, W];
      score  = the loss as a weighted sum of squares: (x * x) @ score with x = [q - goal, m - tau/k, W], score
               (len(x), groups) holding each term's weight / count within its group, so that each group's loss is
               the spec's loss over its own rows (the whole batch when groups == 1);
      slopes = dL/dq and dL/dm per unit of (q - goal) and (m - tau/k)."""
    quantile_goal, tau, wq, wm, wr = numbers
    f = dict(device=device, dtype=dtype)
    goals = torch.cat([torch.full((n * k,), quantile_goal, **f), torch.full((n * k,), tau / k, **f),
                       torch.zeros(n * k * c, **f)])
    rows = n // groups * k                                  # (n, t) rows per group
    group = torch.arange(n * k, device=device) // rows
    which = torch.cat([group, group, group.repeat_interleave(c)])
    value = torch.cat([torch.full((n * k,), wq / rows, **f), torch.full((n * k,), wm / rows, **f),
                       torch.full((n * k * c,), wr / (rows * c), **f)])
    score = torch.zeros(len(which), groups, **f)
    score[torch.arange(len(which), device=device), which] = value
    slopes = torch.cat([torch.full((n * k,), 2 * wq / (n * k), **f), torch.full((n * k,), 2 * wm / (n * k * hw), **f)])
    return goals, score, slopes


def regulate_logits(logits, hw, targets, step, prev, generator, config=None, words=None):
    """One layer, one sampling step of Attention Regulation.

    logits: the conditional half's logits, (N, h*w, L) with N = images x heads (image-major).
    hw: (h, w) of the query map. targets: token positions (1..k of them). step: the sampling step index.
    prev: the RegulationState this layer returned at the previous step, or None at the first step.
    generator: a torch.Generator (or None for torch's global one), or a list with one per image.
    Returns (S + decay**step * D, new state) with D = blend * prev + (1 - blend) * best, both as Deltas.

    With one generator the batch is one problem, as in the released code: one loss (a mean over all N) picks the
    best iteration for every image. With a list of generators each image is its own problem: its own draw of W
    and its own best iteration (each row's gradient step does not depend on the batch), so image i of a batch
    gives the result it gives alone with the same seed.

    words: each target's word (RegulationConfig.per_word; optimise_weights): one W and one map per word.
    """
    config = config or RegulationConfig()
    if logits.dim() != 3:
        raise ValueError(f"logits must be (N, h*w, L), got shape {tuple(logits.shape)}")
    n, hwn, num_tokens = logits.shape
    h, w = hw
    if h * w != hwn:
        raise ValueError(f"hw={tuple(hw)} does not match the {hwn} query positions of the logits")
    targets = check_targets(targets, num_tokens)
    # Optimise in float32 whatever the model's dtype; float64 stays float64 (the tests check the math with it).
    s = logits if logits.dtype == torch.float64 else logits.float()
    g = gaussian_maps(h, w, gaussian_sigma(h, w, config.sigma_rule), s.device, s.dtype)
    if words is not None and (len(words) != len(targets) or sorted(set(words)) != list(range(max(words) + 1))):
        raise ValueError(f"words must give each of the {len(targets)} targets its word 0..k-1, got {list(words)}")
    k = len(targets) if words is None else max(words) + 1
    w0 = initial_weights(generator, n, g.shape[0], k, s.device, s.dtype)
    groups = len(generator) if isinstance(generator, (list, tuple)) else 1
    best_w, first_loss, best_loss = optimise_weights(s, targets, g, w0, config, groups, words)

    prev_w = w0 if prev is None else prev.weights   # step 0: the Delta of the initial random W
    if prev_w.shape != best_w.shape:
        raise ValueError(f"the previous state has weights {tuple(prev_w.shape)} but this call needs "
                         f"{tuple(best_w.shape)}: the batch, the map or the targets changed between steps")
    blended = (config.blend * prev_w + (1 - config.blend) * best_w).transpose(1, 2)      # (N, k, C)
    applied = (blended.reshape(-1, g.shape[0]) @ g).view(n, k, hwn)               # (N, k, HW)
    if words is not None:   # each column gets its word's Delta
        applied = applied[:, on_device(words, s.device)]
    out = s.clone()
    out.index_add_(-1, on_device(targets, s.device), applied.transpose(1, 2), alpha=config.decay ** step)
    return out.to(logits.dtype), RegulationState(best_w, first_loss, best_loss)


def restore_special(probs, logits, eot, renormalise=False):
    """After the softmax of the edited logits: put back columns 0 (start of text) and `eot` from the softmax of the
    unedited `logits`, as the released code does (rows then no longer sum to 1). With renormalise, the other
    columns are rescaled so that each row sums to 1 again. Works on any (..., L) shape."""
    if not 0 < eot < logits.shape[-1]:
        raise ValueError(f"end-of-text position must be in 1..{logits.shape[-1] - 1}, got {eot}")
    return restore_columns_(probs.clone(), logits.float(), on_device([0, eot], probs.device), renormalise)


def restore_columns_(probs, logits, cols, renormalise=False):
    """restore_special in place on `probs` (a view into a hook's probabilities) for any key columns `cols` (an
    index tensor): the UNet's start and end of text, or SD 3's special text keys in a joint row. Returns probs.
    The logits are read in float32 at least (float64 stays float64, as in regulate_logits)."""
    s = logits if logits.dtype == torch.float64 else logits.float()
    orig = (s.index_select(-1, cols) - s.logsumexp(-1, keepdim=True)).exp().to(probs.dtype)
    if renormalise:
        rest = probs.sum(-1, keepdim=True) - probs.index_select(-1, cols).sum(-1, keepdim=True)
        probs.mul_((1 - orig.sum(-1, keepdim=True)) / rest)
    return probs.index_copy_(-1, cols, orig)


# --------------------------------------------------------------------------------------------------------------
# The editor: plugs the optimiser into minisd's attention layers


def make_generators(spec):
    """None -> None (torch's global generator); an int seed -> a CPU generator; a list of ints or generators -> one
    generator per image; a torch.Generator is kept. Use generators of their own, not the ones drawing the noise."""
    if spec is None or isinstance(spec, torch.Generator):
        return spec
    if isinstance(spec, int):
        return torch.Generator().manual_seed(spec)
    if isinstance(spec, (list, tuple)):
        return [make_generators(x) if isinstance(x, int) else x for x in spec]
    raise TypeError(f"expected a seed, a torch.Generator or a list of them, got {type(spec).__name__}")


@dataclass
class _LayerRecord:
    step: int
    prev_in: RegulationState | None    # the prev this step's first call used
    prev_out: RegulationState          # what the next step will use


class AttentionRegulation(AttentionHook):
    """The hook that regulates the conditional half of the chosen cross-attention layers during the first
    `edit_steps` sampling steps. State is kept per layer name; a layer called twice in one step (a sampler that
    evaluates the UNet twice per step) reuses that step's prev, and the next step continues from the last call."""

    def __init__(self, targets, eot, num_steps, config=None, select=None, generator=None, model_config=None,
                 words=None):
        config = self.config = config or RegulationConfig()
        self.targets = check_targets(targets)
        # each target position's word (RegulationConfig.per_word); None: each position its own word
        self.words = list(range(len(self.targets))) if words is None else [int(i) for i in words]
        if eot in self.targets or eot < 1:
            raise ValueError(f"end-of-text position {eot} must be > 0 and not a target ({self.targets})")
        self.eot = int(eot)
        self.specials = [0, self.eot]   # the key columns edit_probs restores: start and end of text
        self.edit_steps = config.edit_steps if config.edit_steps is not None else default_edit_steps(num_steps)
        if select is None:
            if model_config is None:
                raise ValueError("give a layer selector (select=) or the model config to use its default layers")
            select = LayerSelector(config.layers, model_config)
        self.select = select
        self.generator = generator if generator is not None else config.seed
        self.reset()

    @property
    def generator(self):
        return self._generator

    @generator.setter
    def generator(self, spec):
        """A seed, a torch.Generator, a list of them (one per image), or None (make_generators)."""
        self._seed = spec if isinstance(spec, int) else None
        self._generator = make_generators(spec)

    def begin_run(self, seeds):
        """The pipeline calls this before sampling one image per seed. An editor made with a seed s gives image i
        its own generator, seeded s + i, so that image i of a batch is its own problem, drawn as the same run
        alone with seed s + i would draw it (the command line runs each image alone with s = its seed). Every run
        starts from fresh generators, so running the same editor twice gives the same images. An editor given
        generators (or None: torch's global one) keeps them."""
        if self._seed is not None:
            gens = [torch.Generator().manual_seed(self._seed + i) for i in range(len(seeds))]
            self._generator = gens[0] if len(gens) == 1 else gens

    def reset(self):
        """Forget all per-layer state, e.g. before sampling another image with the same hook."""
        self.records = {}
        self.history = {}   # layer name -> {step: (first loss, best loss)}, tensors of one loss per group

    def wants(self, layer):
        return layer.is_cross and self.step < self.edit_steps and self.select(layer)

    def edit_logits(self, layer, logits):
        """Regulates the cross-attention block of the logits (cross_block: all of a UNet layer's, the image-to-text
        block of a joint one), whose softmax, and so the loss, runs over the text keys alone."""
        block = cross_block(layer, logits)
        _, heads, hw, num_tokens = block.shape
        if layer.hw is None:
            raise ValueError(f"{layer.name} was called without the size of its query map")
        cond = block[self.cond]
        images = cond.shape[0]
        if isinstance(self.generator, list) and len(self.generator) != images:
            raise ValueError(f"{len(self.generator)} generators for {images} conditional images")
        rec = self.records.get(layer.name)
        if rec is None or self.step < rec.step:     # first call, or a new sampling run from step 0
            prev = None
        elif self.step == rec.step:                 # second call in the same step: no double update
            prev = rec.prev_in
        else:
            prev = rec.prev_out
        edited, state = regulate_logits(cond.reshape(images * heads, hw, num_tokens), layer.hw, self.targets,
                                        self.step, prev, self.generator, self.config,
                                        self.words if self.config.per_word else None)
        self.records[layer.name] = _LayerRecord(self.step, prev, state)
        self.history.setdefault(layer.name, {})[self.step] = (state.first_loss.detach(), state.best_loss.detach())
        out = logits.clone()   # the attention passes the unedited logits on to edit_probs: never edit in place
        cross_block(layer, out)[self.cond] = edited.view(images, heads, hw, num_tokens)
        return out

    def edit_probs(self, layer, logits, probs):
        if not self.config.restore_special:
            return probs
        out = probs.clone()
        # the conditional rows, in place; on joint attention over every key (AttentionHook.understands_joint)
        restore_columns_(out[self.cond], logits[self.cond], on_device(self.specials, probs.device),
                         self.config.keep_rows_normalised)
        return out

    def loss_table(self):
        """{layer name: {step: (first loss, best loss)}}: what the optimiser achieved. Floats, or lists of one per
        image when the editor has one generator per image."""
        plain = lambda t: t.item() if t.numel() == 1 else t.tolist()
        return {name: {s: (plain(a), plain(b)) for s, (a, b) in steps.items()} for name, steps in self.history.items()}


class JointRegulation(AttentionRegulation):
    """Attention Regulation on the image-to-text block of joint attention (regulation/joint_regulation.py says
    what changes there). targets: text-key indices; specials: text-key columns restored after the softmax."""

    understands_joint = True   # its rows' last column stands for the image keys: restoring takes mass from them too

    def __init__(self, targets, specials, num_steps, config=None, select=None, generator=None, words=None):
        super().__init__(targets, specials[1], num_steps, config, select, generator, words=words)
        self.specials = [int(c) for c in specials]

    def wants(self, layer):
        return getattr(layer, "joint", False) and super().wants(layer)


# --- from a prompt to the hook ---------------------------------------------------------------------------------

def make_editor(pipe, prompt, targets, steps, seed=0, layers=None, edit_steps=None, config=None):
    """The hook regulating `targets` (from regulation.editors.pick_targets) of `prompt` for a run of `steps` steps:
    on a UNet's cross-attention, or on joint attention (JointRegulation). layers and edit_steps, when given, replace
    the config's."""
    config = config or RegulationConfig()
    config = replace(config, layers=layers or config.layers,
                     edit_steps=config.edit_steps if edit_steps is None else edit_steps)
    positions = [p for t in targets for p in t.positions]
    words = [i for i, t in enumerate(targets) for _ in t.positions]
    if is_joint(pipe.cfg):
        return JointRegulation(positions, special_columns(pipe, prompt), steps, config,
                               JointBlockSelector(config.layers, pipe.cfg), generator=seed, words=words)
    return AttentionRegulation(positions, eot_position(pipe.tokenizer, prompt), steps, config=config,
                               model_config=pipe.cfg, generator=seed, words=words)


def set_up(pipe, prompt, steps, targets=None, layers=None, edit_steps=None, config=None, seed=0, **run):
    """regulation.editors.set_up's Run of Attention Regulation (the run's other settings are not needed here)."""
    if not targets:
        raise ValueError("Attention Regulation needs target words")
    if config is not None and not isinstance(config, RegulationConfig):
        raise TypeError(f"regulate takes a RegulationConfig, got {type(config).__name__}")
    hook = make_editor(pipe, prompt, targets, steps, seed=seed, layers=layers, edit_steps=edit_steps, config=config)
    return editor_run(hook, targets, is_joint(pipe.cfg))


# Its README documents one option, --edit-steps (25 of 50); its optimiser's constants are not exposed.
METHOD = register(Method("regulate", "Attention Regulation", Knob("edit_steps", "edit steps", 25),
                         takes={"targets", "layers", "edit_steps", "config"}, set_up=set_up, make_editor=make_editor))
