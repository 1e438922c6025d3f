"""The noise schedule and the samplers: how Stable Diffusion turns noise into latents.

The schedule. SD's UNet was trained (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") on latents x0
noised to one of 1000 levels t = 0..999:

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,        eps ~ N(0, I),    abar_t = prod_{s <= t} (1 - beta_s)

with the betas rising "scaled linear" (linear in sqrt(beta)) from 0.00085 to 0.012. So abar_t falls from 0.99915 at
t = 0 to 0.0047 at t = 999: the last level is almost, not quite, pure noise. Given (x_t, t) the UNet predicts eps
(SD 1.x, SD 2 base) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (the 768 px SD 2 models; Salimans & Ho 2022,
"Progressive Distillation for Fast Sampling of Diffusion Models"). Either one, with x_t, gives the model's guess of
the clean latent: `denoised`, x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t).
Dividing x_t by sqrt(abar_t) gives x0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t), which runs from
0.029 to 14.6: the "noise level" view of Karras et al. (2022), which euler works in.

The samplers. Generating walks from t ~ 999 down to t ~ 0 in `steps` jumps; at each point the model guesses x0 and
the sampler moves x part of the way towards that guess. All of them follow the same deterministic path (the
probability-flow ODE) and differ only in how they take a step along it:
  ddim      jump straight to the next level, keeping the predicted noise (first order; eta > 0 adds fresh noise)
  euler     the same idea as a plain Euler step of the ODE in the sigma view (first order)
  dpmpp_2m  an exponential integrator that also uses the previous step's x0 guess (second order, multistep)
  plms      DDIM's jump, with eps extrapolated from the last 4 predictions (Adams-Bashforth, up to fourth order)
Which `steps` of the 1000 levels are visited is the `spacing` (Lin et al. 2023, "Common Diffusion Noise Schedules
and Sample Steps are Flawed", Table 2): "leading" (SD's configs: 981, 961, ..., 1 for 50 steps), "trailing"
(999, 979, ..., 19: starts at the noisiest level) or "linspace" (evenly from 999 to 0).

Each sampler equals, step by step, the diffusers scheduler named in its docstring configured as SD ships it
(tests/test_samplers.py). Where diffusers has a quirk we keep it and say so, so that a seed gives the same image.

Every sampler has one signature, `sampler(model, x, schedule, steps, *, generator=None, callback=None, **options)`:
  model(x_in, t, i) -> the raw UNet output (eps or v, as `schedule.prediction` says) for the input x_in; the sampler
      has already applied any input scaling. `t` is a python float (a whole number except for euler under linspace
      spacing); `i` is the step index 0..steps-1 (a step that calls the model twice passes the same i).
  x: unit-variance starting noise; the sampler scales it by its initial noise level where it needs to.
  generator: a torch.Generator, or a list with one per batch row (row r's noise then comes from generator r alone).
      Only stochastic sampling (ddim with eta > 0) draws noise.
  edit(x_in, t, i) -> x_in: optional, changes the latents at the start of each step (Attend-and-Excite's update),
      in the model-input view.
  init, start: image-to-image (SDEdit: Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
      Differential Equations"). init is the clean latent of the given image; the sampler noises it with x to the
      level of its step `start` (as the diffusers scheduler's add_noise does there) and runs only the steps
      start..steps-1, which model, edit and callback see as i = 0, 1, ...: the steps that run. start = 0 with init
      still starts from the image (noised to the first level, which for SD is not quite pure noise).
  callback(dict(i, t, x, denoised)) after each step: x = the sampler's latents after the step (for euler these are
      scaled by sqrt(sigma^2 + 1) as diffusers holds them), denoised = the predicted x0 of that step.
Samplers compute in float32 and return float32 latents.
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch

PREDICTIONS = ("epsilon", "v")
SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class Schedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "epsilon"   # what the UNet predicts: "epsilon" or "v"
    spacing: str = "leading"      # which timesteps a sampler visits: "leading", "trailing" or "linspace"
    steps_offset: int = 1         # added to "leading" timesteps (SD's scheduler configs): 981..1 rather than 980..0
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS} (diffusers' 'v_prediction' is 'v'), "
                             f"got {self.prediction!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        # "scaled_linear": linear in sqrt(beta), as latent diffusion was trained. float32, as in diffusers.
        betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_train_timesteps,
                               dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    @classmethod
    def for_model(cls, cfg, spacing="leading"):
        """The schedule of a `config.ModelConfig`."""
        return cls(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.prediction, spacing)

    @property
    def sigmas(self):
        """The noise level sigma_t = sqrt((1 - abar_t) / abar_t) of each training timestep."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def timesteps(self, steps):
        """The `steps` timesteps a sampler visits, noisiest first, as python floats (fractional only for
        "linspace"; the samplers that need whole timesteps round them)."""
        T = self.num_train_timesteps
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in 1..{T}, got {steps!r}")
        if self.spacing == "leading":
            ts = np.arange(steps)[::-1] * (T // steps) + self.steps_offset
        elif self.spacing == "trailing":
            # [:steps]: for some step counts (61, 103, ...) float rounding gives arange one extra value, which
            # diffusers keeps as a final timestep -1
            ts = np.round(np.arange(T, 0, -T / steps)[:steps]) - 1
        else:
            ts = np.linspace(0, T - 1, steps)[::-1]
        return [float(t) for t in ts]

    def sigma_at(self, t):
        """sigma at a possibly fractional timestep, interpolated linearly between training timesteps (float32)."""
        sig = self.sigmas.double()
        lo = min(int(math.floor(t)), self.num_train_timesteps - 1)
        hi = min(lo + 1, self.num_train_timesteps - 1)
        return (sig[lo] + (t - lo) * (sig[hi] - sig[lo])).float()


# ---------------------------------------------------------------------------------------------------- helpers

def _prepare(x, schedule, steps, generator):
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a samplers.Schedule, got {type(schedule).__name__}")
    _check_batch(x, generator)
    schedule.timesteps(steps)  # validates steps
    return x.float()


def _check_batch(x, generator):
    """Both kinds of sampler: starting noise with a batch dimension, and one generator per row if a list."""
    if not torch.is_tensor(x) or x.dim() < 1:
        raise ValueError("x must be a tensor of starting noise with a batch dimension")
    if isinstance(generator, (list, tuple)) and len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}: give one per row")


def _discrete(schedule, steps):
    # np.round and python's round both round halves to even, so these equal diffusers' integer timesteps
    return [round(t) for t in schedule.timesteps(steps)]


def _predict(model, x_in, t, i):
    out = model(x_in, float(t), i)
    if not torch.is_tensor(out) or out.shape != x_in.shape:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"model returned {got}, expected a tensor shaped {tuple(x_in.shape)}")
    return out.float()


def _eps_and_x0(schedule, out, x, abar):
    """The model's noise guess and clean-latent guess from its raw output at x = x_t, abar = abar_t."""
    if schedule.prediction == "epsilon":
        return out, (x - (1 - abar) ** 0.5 * out) / abar ** 0.5
    return abar ** 0.5 * out + (1 - abar) ** 0.5 * x, abar ** 0.5 * x - (1 - abar) ** 0.5 * out


def _noise(like, generator):
    """N(0, I) shaped like `like`, drawn as diffusers' randn_tensor does: one draw for one generator, or one draw
    per row for a list, so that row r depends on generator r only."""
    if isinstance(generator, (list, tuple)) and len(generator) > 1:
        return torch.cat([_noise(like[r:r + 1], g) for r, g in enumerate(generator)])
    g = generator[0] if isinstance(generator, (list, tuple)) else generator
    device = g.device if g is not None else like.device
    return torch.randn(like.shape, generator=g, device=device, dtype=like.dtype).to(like.device)


def _check_start(init, start, steps):
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < steps:
        raise ValueError(f"start must be a step index in 0..{steps - 1}, got {start!r}")
    if start and init is None:
        raise ValueError("start > 0 is image-to-image: give init, the image's latents")


def _add_noise(schedule, init, noise, t):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: the image's latents noised to timestep t (image-to-image)."""
    abar = schedule.alphas_cumprod[t]
    return abar ** 0.5 * init.float() + (1 - abar) ** 0.5 * noise


def _edit(edit, x, t, i, scale=1.0):
    """A latent edit before a step's model call (Attend-and-Excite moves the latents here). The edit sees and
    returns latents as the model sees them (for euler, divided by sqrt(sigma^2 + 1))."""
    if edit is None:
        return x
    return edit(x / scale, float(t), i).float() * scale


def _report(callback, i, t, x, denoised):
    if callback is not None:
        callback(dict(i=i, t=float(t), x=x, denoised=denoised))


# ---------------------------------------------------------------------------------------------------- samplers

def ddim(model, x, schedule, steps, *, generator=None, callback=None, edit=None, init=None, start=0, eta=0.0):
    """DDIM (Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16).

    Each step re-noises the model's x0 guess to the next level with the model's own eps guess, so with eta = 0 the
    path is deterministic. eta > 0 swaps part of that noise for fresh noise (eta = 1 is DDPM's ancestral step).
    Equals diffusers' DDIMScheduler(set_alpha_to_one=False, clip_sample=False), as in SD's scheduler configs.
    """
    x = _prepare(x, schedule, steps, generator)
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    _check_start(init, start, steps)
    abar = schedule.alphas_cumprod
    jump = schedule.num_train_timesteps // steps
    ts = _discrete(schedule, steps)[start:]
    if init is not None:
        x = _add_noise(schedule, init, x, ts[0])
    for i, t in enumerate(ts):
        x = _edit(edit, x, t, i)
        out = _predict(model, x, t, i)
        eps, x0 = _eps_and_x0(schedule, out, x, abar[t])
        # diffusers steps to t - T // steps, which is the next visited timestep except under linspace spacing or
        # when steps does not divide T. Past t = 0 it uses abar_0 rather than 1 (set_alpha_to_one=False), so the
        # result keeps the faint noise of level 0.
        prev = t - jump
        abar_prev = abar[prev] if prev >= 0 else abar[0]
        std = eta * ((1 - abar_prev) / (1 - abar[t]) * (1 - abar[t] / abar_prev)) ** 0.5
        x = abar_prev ** 0.5 * x0 + (1 - abar_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            x = x + std * _noise(x, generator)
        _report(callback, i, t, x, x0)
    return x


def euler(model, x, schedule, steps, *, generator=None, callback=None, edit=None, init=None, start=0):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma, in the form of Karras et al.
    2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (their Algorithm 1 without the
    second-order correction); here x = x_t / sqrt(abar_t), whose noise level is sigma.

    The UNet was trained on x_t, so it is fed x / sqrt(sigma^2 + 1). Equals diffusers' EulerDiscreteScheduler
    (its defaults: sigmas interpolated linearly at float timesteps, final sigma 0).
    """
    x = _prepare(x, schedule, steps, generator)
    _check_start(init, start, steps)
    ts = [float(np.float32(t)) for t in schedule.timesteps(steps)][start:]  # diffusers keeps them in float32
    sigmas = [schedule.sigma_at(t) for t in ts] + [torch.tensor(0.0)]
    if init is not None:   # in the sigma view x = x0 + sigma eps (diffusers' add_noise)
        x = init.float() + sigmas[0] * x
    else:
        # diffusers' init_noise_sigma: the true std of x_T, sqrt(sigma^2 + 1), for "leading", but sigma alone for
        # "linspace" and "trailing". We keep both so that seeds reproduce.
        x = x * (sigmas[0] if schedule.spacing in ("linspace", "trailing") else (sigmas[0] ** 2 + 1) ** 0.5)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = _edit(edit, x, t, i, (sigma ** 2 + 1) ** 0.5)
        out = _predict(model, x / (sigma ** 2 + 1) ** 0.5, t, i)
        if schedule.prediction == "epsilon":
            x0 = x - sigma * out
        else:  # v written in the sigma view: x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)
            x0 = x / (sigma ** 2 + 1) - out * sigma / (sigma ** 2 + 1) ** 0.5
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        _report(callback, i, t, x, x0)
    return x


def dpmpp_2m(model, x, schedule, steps, *, generator=None, callback=None, edit=None, init=None, start=0):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2).

    In log-SNR time lambda = log(sqrt(abar) / sqrt(1 - abar)) the ODE's linear part is solved exactly and only the
    x0 guess is approximated: as a constant over the step (first order, = DDIM) on the first step, and as a line
    through this and the previous step's guesses afterwards. The last step goes to sigma = 0 and returns the x0
    guess itself. Equals diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero"), the scheduler the Attention
    Regulation authors used.
    """
    x = _prepare(x, schedule, steps, generator)
    if steps >= schedule.num_train_timesteps and schedule.spacing != "trailing":
        raise ValueError(f"dpmpp_2m takes at most {schedule.num_train_timesteps - 1} steps")
    # diffusers lays out steps + 1 timesteps and replaces the lowest by sigma = 0 for "leading" and "linspace",
    # but only `steps` for "trailing": for 50 leading steps that is 951, 932, ..., 20 (not DDIM's 981..1).
    _check_start(init, start, steps)
    ts = _discrete(schedule, steps) if schedule.spacing == "trailing" else _discrete(schedule, steps + 1)[:-1]
    ts = ts[start:]
    if init is not None:
        x = _add_noise(schedule, init, x, ts[0])
    abar = schedule.alphas_cumprod
    x0_old = h_old = None
    for i, t in enumerate(ts):
        x = _edit(edit, x, t, i)
        out = _predict(model, x, t, i)
        _, x0 = _eps_and_x0(schedule, out, x, abar[t])
        if i == len(ts) - 1:
            x = x0  # the update with sigma_next = 0 reduces to this
        else:
            a, a_next = abar[t], abar[ts[i + 1]]
            h = _log_snr(a_next) - _log_snr(a)
            # x0 guess extrapolated to the step's midpoint in lambda (the "midpoint" 2M variant)
            d = x0 if x0_old is None else x0 + 0.5 * (h / h_old) * (x0 - x0_old)
            x = ((1 - a_next) / (1 - a)) ** 0.5 * x - a_next ** 0.5 * torch.expm1(-h) * d
            x0_old, h_old = x0, h
        _report(callback, i, t, x, x0)
    return x


def plms(model, x, schedule, steps, *, generator=None, callback=None, edit=None, init=None, start=0):
    """PLMS, the pseudo linear multistep method (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
    Manifolds", eq. 9 and 12) as the original SD release ran it (no Runge-Kutta warm-up).

    Every step is a DDIM jump, but with eps extrapolated from the last predictions by the Adams-Bashforth formulas
    (orders 1..4 as history builds up). The first step has no history, so it calls the model twice: at the start and
    at a provisional DDIM result one step on, and averages the two (a Heun step). Equals diffusers'
    PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False), the scheduler SD 1.x ships with. Image-to-image
    starts afresh at step `start` (its first step is the two-call one); diffusers' img2img slices PNDM's timestep
    list, which repeats one timestep, at the same index, and so starts one level noisier and evaluates the model
    at timesteps one behind its latents: there it does not equal diffusers.
    """
    x = _prepare(x, schedule, steps, generator)
    _check_start(init, start, steps)
    abar = schedule.alphas_cumprod
    jump = schedule.num_train_timesteps // steps
    ts = _discrete(schedule, steps)[start:]
    if init is not None:
        x = _add_noise(schedule, init, x, ts[0])

    def jump_to(x, out, t, prev):
        eps, x0 = _eps_and_x0(schedule, out, x, abar[t])
        abar_prev = abar[prev] if prev >= 0 else abar[0]  # as ddim, set_alpha_to_one=False
        return abar_prev ** 0.5 * x0 + (1 - abar_prev) ** 0.5 * eps, x0

    # raw model outputs of the steps so far: like diffusers we combine v predictions raw, then convert at the current x
    outs = []
    for i, t in enumerate(ts):
        x = _edit(edit, x, t, i)
        out = _predict(model, x, t, i)
        if i == 0 and len(ts) > 1:
            x_provisional, _ = jump_to(x, out, t, t - jump)
            out2 = _predict(model, x_provisional, ts[1], i)
            outs.append(out)
            # diffusers evaluates at the next visited timestep but steps from it + T // steps to it: the same as
            # from t to t - jump except where the spacing is uneven.
            x, x0 = jump_to(x, (out + out2) / 2, ts[1] + jump, ts[1])
        else:
            outs = outs[-3:] + [out]
            x, x0 = jump_to(x, _adams_bashforth(outs), t, t - jump)
        _report(callback, i, t, x, x0)
    return x


def _log_snr(abar):
    """lambda = log(alpha / sigma) of the noisy latent sqrt(abar) x0 + sqrt(1 - abar) eps: DPM-Solver's time."""
    return 0.5 * torch.log(abar / (1 - abar))


def _adams_bashforth(outs):
    """Extrapolate the next value from up to 4 past ones (oldest first), with the Adams-Bashforth weights."""
    e = outs[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


SAMPLERS = {"ddim": ddim, "euler": euler, "dpmpp_2m": dpmpp_2m, "plms": plms}


# ------------------------------------------------------------------------------------- rectified flow (SD 3)

@dataclass
class FlowSchedule:
    """SD 3's rectified flow (Esser et al. 2024; Liu et al. 2022, "Flow Straight and Fast"): x_sigma =
    (1 - sigma) x0 + sigma eps for sigma in [0, 1], and the model predicts the velocity v = eps - x0, read at the
    timestep t = 1000 sigma. The shift moves the visited sigmas towards the noisy end, sigma -> shift sigma /
    (1 + (shift - 1) sigma): 3.0 for SD 3.5 (high resolutions need more steps at high noise).

    `sigmas(steps)`: as Stability's reference (ModelSamplingDiscreteFlow + get_sigmas) and diffusers'
    FlowMatchEulerDiscreteScheduler both lay them out: t evenly from 1000 to 1000 shift(1/1000) (the shifted end
    is shifted again, in both), each shifted, then 0 appended; computed in float64, kept in float32."""
    shift: float = 3.0
    num_train_timesteps: int = 1000

    def shifted(self, s):
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigmas(self, steps):
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        T = self.num_train_timesteps
        lo = float(np.float32(self.shifted(np.float32(1 / T))))  # the table's smallest sigma, in float32 as both
        s = self.shifted(np.linspace(T, lo * T, steps) / T)
        return torch.tensor(np.append(s, 0.0), dtype=torch.float32)


def _flow_prepare(x, schedule, steps, generator, init, start):
    """(starting x, the sigmas of the steps that run and the one after). Image-to-image: the image's latents
    noised to the first sigma that runs, x = (1 - sigma) init + sigma noise (Stability's noise_scaling, diffusers'
    scale_noise)."""
    if not isinstance(schedule, FlowSchedule):
        raise TypeError(f"schedule must be a samplers.FlowSchedule, got {type(schedule).__name__}")
    _check_batch(x, generator)
    sigmas = schedule.sigmas(steps)
    _check_start(init, start, steps)
    sigmas = sigmas[start:]
    x = x.float()
    if init is not None:
        x = (1 - sigmas[0]) * init.float() + sigmas[0] * x
    return x, sigmas


def flow_euler(model, x, schedule, steps, *, generator=None, callback=None, edit=None, init=None, start=0):
    """Euler's method on the flow ODE dx/dsigma = v: x <- x + (sigma_next - sigma) v. Starts from x = eps (sigma
    = 1). `model(x, t, i)` returns v at t = 1000 sigma. Equals diffusers' FlowMatchEulerDiscreteScheduler (SD 3's
    pipeline) and Stability's `sample_euler`."""
    x, sigmas = _flow_prepare(x, schedule, steps, generator, init, start)
    for i in range(len(sigmas) - 1):
        sigma, t = sigmas[i], float(sigmas[i] * schedule.num_train_timesteps)
        x = _edit(edit, x, t, i)
        v = _predict(model, x, t, i)
        x0 = x - sigma * v
        x = x + (sigmas[i + 1] - sigma) * v
        _report(callback, i, t, x, x0)
    return x


def flow_dpmpp_2m(model, x, schedule, steps, *, generator=None, callback=None, edit=None, init=None, start=0):
    """DPM-Solver++(2M) as Stability's reference runs it on SD 3 (`sample_dpmpp_2m`, its default sampler): k-diffusion's
    form in lambda = -log sigma applied to the flow's sigmas and the model's clean-latent guess x0 = x - sigma v;
    the first step, and the step to sigma = 0, are first order."""
    x, sigmas = _flow_prepare(x, schedule, steps, generator, init, start)
    x0_old = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, t = sigmas[i], sigmas[i + 1], float(sigmas[i] * schedule.num_train_timesteps)
        x = _edit(edit, x, t, i)
        x0 = x - sigma * _predict(model, x, t, i)
        if sigma_next == 0:
            x_new = x0
        else:
            h = torch.log(sigma) - torch.log(sigma_next)
            d = x0
            if x0_old is not None:
                r = (torch.log(sigmas[i - 1]) - torch.log(sigma)) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_old
            x_new = (sigma_next / sigma) * x - torch.expm1(-h) * d
        x, x0_old = x_new, x0
        _report(callback, i, t, x, x0)
    return x


FLOW_SAMPLERS = {"euler": flow_euler, "dpmpp_2m": flow_dpmpp_2m}
