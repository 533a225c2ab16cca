"""common.py — what ddpm.py, dit.py and diamond.py share.

Each section is small and self-contained, so a piece can be lifted into other code:
  1. config <-> command line     dataclass fields become argparse flags
  2. noise schedules              linear / cosine beta, alpha-bar tables in float64
  3. samplers and guidance        one denoiser interface; DDPM, DDIM, Euler, Heun, DPM-Solver++(2M); CFG
  4. EDM pieces                   Karras et al. (2022) preconditioning, sigma schedule, log-normal sigmas
  5. runtime                      seeding, device/dtype, torch.compile, DDP for torchrun, EMA
  6. data                         CIFAR-10 (verified, safely unpickled), image folders, synthetic `shapes`
  7. images and GIFs
  8. checkpoints and run folders  atomic saves, weights_only loads, metrics.jsonl, progress lines
  9. sample-quality metrics       shapes classifier, Frechet distance, precision/recall
 10. diffusion runs               the loss, run loop, sample and evaluate commands of ddpm.py and dit.py
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import functools
import hashlib
import io
import json
import math
import os
import pickle
import random
import sys
import tarfile
import time
import typing
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

# =====================================================================================================
# 1. config <-> command line
# =====================================================================================================

# A config is one dataclass whose every field is a flag, so `--help` lists every knob with its default and
# nothing is configured by globals or exec.


def _scalar_parser(hint, default):
    """The argparse `type` of one value: the hint's (Optional[X] -> X; 'none' gives None) or the default's."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    base = hint if hint in (int, float, str, bool) else type(default) if default is not None else str
    if base is bool:
        base = lambda s: s.lower() in ("1", "true", "yes", "y")  # noqa: E731  (a bool inside a list)
    if not optional:
        return base
    return lambda s: None if s.lower() == "none" else base(s)


def flag(name: str) -> str:
    """The flag of a config field: IMG_SIZE or img_size -> --img-size."""
    return "--" + name.lower().replace("_", "-")


def field(default, help: str, **metadata):
    """A config field with its --help text (add_config_args makes it a flag) and any other metadata; a list
    default is copied per instance."""
    metadata = {"help": help, **metadata}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_config_args(parser: argparse.ArgumentParser, cfg) -> argparse.ArgumentParser:
    """One flag per dataclass field of the instance `cfg` (dest = field name, default = its value): bools get
    --x / --no-x, lists and tuples nargs='+'; help is field(metadata={"help": ...}), else the type."""
    try:  # `from __future__ import annotations` leaves f.type a string
        hints = typing.get_type_hints(type(cfg))
    except (NameError, TypeError, AttributeError):  # an unresolvable annotation costs the hint, not the flag
        hints = {}
    for f in dataclasses.fields(cfg):
        default = getattr(cfg, f.name)
        hint = hints.get(f.name, f.type)
        type_name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        # a field that only changes an inherited default keeps the help of the class it comes from
        helps = [g.metadata["help"] for c in type(cfg).__mro__ if dataclasses.is_dataclass(c)
                 for g in dataclasses.fields(c) if g.name == f.name and "help" in g.metadata]
        help_text = (helps[0] if helps else type_name).replace("%", "%%")  # argparse %-formats help
        kwargs = dict(dest=f.name, default=default, help=help_text + " (default: %(default)r)")
        if hint is bool or isinstance(default, bool):
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, (list, tuple)) or typing.get_origin(hint) in (list, tuple):
            elem_hints = [a for a in typing.get_args(hint) if a is not Ellipsis]
            convert = _scalar_parser(elem_hints[0] if elem_hints else None, default[0] if default else None)
            parser.add_argument(flag(f.name), nargs="+", type=convert, **kwargs)
        else:
            parser.add_argument(flag(f.name), type=_scalar_parser(hint, default), **kwargs)
    return parser


def config_from_args(cfg, args: argparse.Namespace):
    """A new dataclass instance: `cfg` with the parsed flag values (tuple fields stay tuples)."""
    changes = {}
    for f in dataclasses.fields(cfg):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            as_tuple = isinstance(getattr(cfg, f.name), tuple) and isinstance(value, list)
            changes[f.name] = tuple(value) if as_tuple else value
    return dataclasses.replace(cfg, **changes)


def check_ranges(obj, positive=(), non_negative=(), unit=(), rate=()) -> None:
    """Before any work: a ValueError naming the flag of the first field of `obj` (a config or parsed flags)
    out of range: `positive` > 0, `non_negative` >= 0, `unit` in [0, 1], `rate` in [0, 1) (a dropout rate:
    1 would drop everything). None (a default derived later) is skipped."""
    bounds = ((positive, lambda v: v > 0, "must be positive"),
              (non_negative, lambda v: v >= 0, "must be >= 0"),
              (unit, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
              (rate, lambda v: 0 <= v < 1, "must be in [0, 1)"))
    for names, ok, want in bounds:
        for name in names:
            value = getattr(obj, name)
            if value is not None and not ok(value):
                raise ValueError(f"{flag(name)} {want}, got {value}")


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every command line here: no prefix matching (`--ckpt` never silently means
    `--ckpt-every`), defaults shown in --help, and an unknown flag answered with the closest known ones."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            known = [o for action in self._actions for o in action.option_strings]
            hints = []
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], known, n=2) if arg[0] == "-" else []
                hints += [f"{arg}: did you mean {' or '.join(close)}?"] if close else []
            message += " (" + "; ".join(hints) + ")" if hints else ""
        super().error(message)


def dispatch(argv, prog: str, commands: dict, default: str = "train"):
    """Run the sub-command argv[0] (else `default`) of commands {name: (function(argv), one-line help)};
    an unknown one ends with the closest names, and `prog --help` lists them first."""
    argv = list(argv)
    if argv and argv[0] in commands:
        name = argv.pop(0)
    elif argv and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], list(commands), n=1, cutoff=0.5)
        raise ValueError(f"unknown command {argv[0]!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" (commands: {', '.join(commands)}; see {prog} --help)")
    else:
        name = default
        if any(a in ("-h", "--help") for a in argv):
            width = max(map(len, commands))
            print(f"usage: {prog} [COMMAND] [flags]   (COMMAND defaults to {default})\ncommands:\n"
                  + "".join(f"  {n:<{width}}  {text}\n" for n, (_, text) in commands.items())
                  + f"`{prog} COMMAND --help` lists a command's flags. The flags of {default}:\n")
    return commands[name][0](argv)


def expand_path(path) -> Path:
    """`~` expanded, also where the shell does not (`--dataset folder:~/pics`, `--out=~/x.png`)."""
    return Path(os.path.expanduser(str(path)))


def checkpoint_file(path) -> Path:
    """--ckpt / --resume take a run folder or its ckpt.pt: the checkpoint file either way."""
    path = expand_path(path)
    return path / "ckpt.pt" if path.is_dir() or not path.suffix else path


def run_folder(path) -> Path:
    """--ckpt / --resume take a run folder or its ckpt.pt: the run folder either way."""
    path = expand_path(path)
    return path if path.is_dir() or not path.suffix else path.parent


def check_image_path(path, flag_name: str = "--out") -> Path:
    """Before any work: an output picture path whose extension pillow can write (.png, .jpg, ...)."""
    path = expand_path(path)
    Image.init()
    if path.suffix.lower() not in Image.EXTENSION or path.suffix.lower() in (".pdf", ".eps", ".ps"):
        raise ValueError(f"{flag_name} {path}: give a picture file name ending in .png "
                         "(or .jpg, .gif, .webp)")
    return path


def run_cli(main) -> None:
    """Run a script's main(). A user error (bad flags, missing data, a corrupt or foreign checkpoint) is a
    ValueError raised by this project's code, whose message names the fix: it ends the run as that one line,
    exit status 1. A ValueError raised inside a library keeps its traceback (a bug)."""
    try:
        main()
    except ValueError as e:
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        if Path(tb.tb_frame.f_code.co_filename).resolve().parent != Path(__file__).resolve().parent:
            raise
        sys.exit(f"error: {e}")


# =====================================================================================================
# 2. noise schedules
# =====================================================================================================

# DDPM (Ho et al. 2020) uses beta_t linear in t; improved DDPM (Nichol & Dhariwal 2021) makes alpha-bar
# follow a squared cosine so that less of the chain is spent at (near-)pure noise. Tables are float64, as in
# the official code; samplers gather from them and cast per batch. Index t = 0..T-1 is the paper's t = 1..T.

COSINE_S = 0.008  # Nichol & Dhariwal (2021) eq. 17: offset s keeps beta near t = 0 from vanishing
MAX_BETA = 0.999  # their clamp on beta, which avoids the singularity of the cosine at t = T


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """(T,) float64: beta_t evenly spaced from beta_start to beta_end (DDPM §4; also DiT's schedule)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def check_linear_betas(beta_start: float, beta_end: float) -> None:
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"need 0 < --beta-start < --beta-end < 1, got {beta_start}, {beta_end}")


def cosine_betas(T: int = 1000, s: float = COSINE_S, max_beta: float = MAX_BETA) -> torch.Tensor:
    """(T,) float64: f(u) = cos((u + s) / (1 + s) * pi/2)^2, beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta),
    i.e. alpha-bar_t = f((t+1)/T) / f(0) up to the clamp (diffusers' "squaredcos_cap_v2")."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def make_alphas_cumprod(schedule: str = "linear", T: int = 1000, beta_start: float = 1e-4,
                        beta_end: float = 0.02) -> torch.Tensor:
    """(T,) float64 alpha-bar_t = prod_{s<=t} (1 - beta_s) for --schedule linear|cosine."""
    if schedule == "linear":
        betas = linear_betas(T, beta_start, beta_end)
    elif schedule == "cosine":
        betas = cosine_betas(T)
    else:
        raise ValueError(f"--schedule {schedule!r}: use 'linear' or 'cosine'")
    return torch.cumprod(1 - betas, dim=0)


# =====================================================================================================
# 3. samplers and guidance
# =====================================================================================================

# Two views of one forward process (Kingma et al. 2021; Karras et al. 2022 §2), at t with alpha-bar a_t:
#   VP (what the network sees):      x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
#   VE (what ODE samplers integrate): x = x_t / sqrt(a_t) = x0 + sigma eps,   sigma_t = sqrt((1 - a_t) / a_t)
# `Denoiser` serves both views to the samplers. Shapes: B batch, C channels, H, W; `t` and `sigma` are (B,).

SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp")
PREDICTIONS = ("eps", "x0", "v")
SPACINGS = ("leading", "trailing", "linspace")


def append_dims(x: torch.Tensor, n: int) -> torch.Tensor:
    """Append singleton dims until x has n dims: a (B,) coefficient broadcasts against (B, C, H, W)."""
    return x.reshape(x.shape + (1,) * (n - x.dim()))


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """N(0, I) shaped like x, drawn in float32 on the generator's device and then cast, so one seed gives
    the same noise whatever the dtype of x (float64 tests reproduce float32 runs)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x)


def abar_to_sigma(abar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - abar) / abar)."""
    return ((1 - abar) / abar).sqrt()


def sigma_to_abar(sigma: torch.Tensor) -> torch.Tensor:
    """abar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma ** 2)


def t_to_sigma(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma at (possibly fractional) timesteps t in [0, T-1]: log sigma interpolated linearly between table
    entries (k-diffusion DiscreteSchedule.t_to_sigma)."""
    log_sigmas = abar_to_sigma(alphas_cumprod).log()                    # (T,) increasing in t
    t = torch.as_tensor(t, device=log_sigmas.device).to(log_sigmas.dtype).clamp(0, len(log_sigmas) - 1)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def sigma_to_t(sigma: torch.Tensor, alphas_cumprod: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """The inverse of t_to_sigma, clamped to [0, T-1] (diffusers' _sigma_to_t, k-diffusion's sigma_to_t).
    quantize=True rounds to the nearest integer timestep (for nets that only know integer t)."""
    log_sigmas = abar_to_sigma(alphas_cumprod).log()                    # (T,)
    log_sigma = torch.as_tensor(sigma, device=log_sigmas.device).to(log_sigmas.dtype).clamp(min=1e-10).log()
    low = ((log_sigma[..., None] >= log_sigmas).sum(-1) - 1).clamp(0, len(log_sigmas) - 2)  # entry <= sigma
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    t = low + ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return t.round() if quantize else t


def pred_to_x0_eps(out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, pred: str):
    """(x0, eps) from a prediction `out` of kind `pred` at x_t (B, C, H, W) with alpha-bar abar (B,). With
    a = sqrt(abar), b = sqrt(1 - abar), x_t = a x0 + b eps and v = a eps - b x0 (Salimans & Ho 2022):
      eps: x0 = (x_t - b eps) / a;   x0: eps = (x_t - a x0) / b;   v: x0 = a x_t - b v, eps = b x_t + a v.
    All three are affine in `out`, so guidance mixes predictions of any kind in the same way."""
    a = append_dims(abar.sqrt(), x_t.dim()).to(x_t.device, x_t.dtype)
    b = append_dims((1 - abar).sqrt(), x_t.dim()).to(x_t.device, x_t.dtype)
    if pred == "eps":
        return (x_t - b * out) / a, out
    if pred == "x0":
        return out, (x_t - a * out) / b
    if pred == "v":
        return a * x_t - b * out, b * x_t + a * out
    raise ValueError(f"--pred {pred!r}: use one of {', '.join(PREDICTIONS)}")


def cfg_net(net, y: Optional[torch.Tensor], y_null: Optional[torch.Tensor], guidance: float, channels: int):
    """Classifier-free guidance (Ho & Salimans 2022) as a wrapper f(x_t, t): the first `channels` output
    channels become (1 + w) out(x, y) - w out(x, y_null), from one batched call on [x; x]; extra
    learned-variance channels come from the conditional half (as DiT's forward_with_cfg). guidance = 0 calls
    net(x, t, y) once."""
    if guidance == 0:
        return lambda x, t: net(x, t, y)
    if y is None or y_null is None:
        raise ValueError("--guidance needs class labels y and null labels y_null")

    def guided(x, t):
        out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))   # (2B, C or 2C, H, W)
        cond, uncond = out.chunk(2)
        eps = (1 + guidance) * cond[:, :channels] - guidance * uncond[:, :channels]
        return torch.cat([eps, cond[:, channels:]], dim=1)
    return guided


class Denoiser:
    """The one interface between a network and every sampler. net(x_t, t, y) takes VP inputs at timesteps
    t in [0, T-1] and predicts `pred` (eps, x0 or v), plus C variance channels when learned_sigma. Views:
      .predict(x_t, t, abar) -> (x0, eps, v)  VP view (DDPM, DDIM); v: the variance channels or None
      denoiser(x, sigma) -> x0                VE view, k-diffusion's D(x; sigma) (Euler, Heun, DPM-Solver++):
                                              the net gets x / sqrt(1 + sigma^2) at t = sigma_to_t(sigma)
    `nfe` counts network calls; a guided evaluation is ONE batched call on 2B images (twice the FLOPs), so
    NFE is the same with and without guidance."""

    def __init__(self, net, alphas_cumprod: torch.Tensor, *, pred: str = "eps",
                 y: Optional[torch.Tensor] = None, y_null: Optional[torch.Tensor] = None,
                 guidance: float = 0.0, learned_sigma: bool = False, quantize_t: bool = False,
                 clip: bool = False):
        if pred not in PREDICTIONS:
            raise ValueError(f"--pred {pred!r}: use one of {', '.join(PREDICTIONS)}")
        self.net, self.pred, self.learned_sigma, self.quantize_t = net, pred, learned_sigma, quantize_t
        self.clip = clip  # VE view: clamp D(x; sigma) to the data range [-1, 1]
        self.y, self.y_null, self.guidance = y, y_null, guidance
        # schedule math runs on the CPU in float64 (MPS has no float64); only x lives on the device
        self.alphas_cumprod = alphas_cumprod.detach().cpu().to(torch.float64)
        sigmas = abar_to_sigma(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = sigmas[0].item(), sigmas[-1].item()   # sigma at t = 0 and t = T-1
        self.nfe = 0

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, abar: torch.Tensor):
        B, C = x_t.shape[:2]
        self.nfe += 1
        dtype = torch.promote_types(x_t.dtype, torch.float32)   # float32 t, or float64 for float64 x
        t = t.to(dtype).to(x_t.device).expand(B)
        out = cfg_net(self.net, self.y, self.y_null, self.guidance, C)(x_t, t)
        expected = (B, 2 * C if self.learned_sigma else C) + tuple(x_t.shape[2:])
        assert out.shape == expected, f"net output {tuple(out.shape)}, expected {expected} (learned_sigma?)"
        v = out[:, C:] if self.learned_sigma else None
        x0, eps = pred_to_x0_eps(out[:, :C], x_t, abar.to(dtype).to(x_t.device).expand(B), self.pred)
        return x0, eps, v

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma).detach().cpu().double().expand(x.shape[0])   # (B,)
        abar = sigma_to_abar(sigma)
        t = sigma_to_t(sigma, self.alphas_cumprod, self.quantize_t)
        scale = append_dims(abar.sqrt().to(x.dtype), x.dim()).to(x.device)   # x_t = x / sqrt(1 + sigma^2)
        x0, _, _ = self.predict(x * scale, t, abar)
        return x0.clamp(-1, 1) if self.clip else x0


def timesteps(T: int, steps: int, spacing: str = "leading") -> torch.Tensor:
    """(steps,) int64 descending subsequence of 0..T-1 that a few-step sampler visits (diffusers' names):
      leading:  t = k * (T // steps), k = steps-1..0 (official DDIM "uniform" skip; 980, 960, ..., 0 for 50)
      trailing: t = round(T - k * T / steps) - 1, k = 0..steps-1 (Lin et al. 2023; 999, 979, ..., 19)
      linspace: round(linspace(0, T-1, steps)) reversed (improved-DDPM/DiT respacing "N"; steps = T: all)"""
    if not 1 <= steps <= T:
        raise ValueError(f"--steps {steps}: must be between 1 and T = {T}")
    k = torch.arange(steps, dtype=torch.float64)
    if spacing == "leading":
        ts = (k * (T // steps)).flip(0)
    elif spacing == "trailing":
        ts = (T - k * T / steps).round() - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().flip(0)
    else:
        raise ValueError(f"--spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
    return ts.long()


@torch.no_grad()
def sample_ddpm(model: Denoiser, x: torch.Tensor, ts: torch.Tensor, *, variance: str = "large",
                clip: bool = False, generator: Optional[torch.Generator] = None,
                callback=None) -> torch.Tensor:
    """Ancestral sampling (DDPM Alg. 2, in the posterior-mean form of the official code) from x = x_T over
    the descending timesteps `ts` (all T, or a subsequence: improved-DDPM respacing, betas recomputed from
    the kept alpha-bars). With a = alpha-bar here and a' at the next kept step (1 after the last):
      beta = 1 - a/a',  beta~ = beta (1 - a') / (1 - a)  (posterior variance),
      mean = beta sqrt(a') / (1 - a) x0 + (1 - a') sqrt(1 - beta) / (1 - a) x_t,  x <- mean + sigma z,
    no noise on the last step. variance: "small" sigma^2 = beta~ | "large" sigma^2 = beta | "learned": the
    net's v in [-1, 1] gives log sigma^2 = (v+1)/2 log beta + (1-v)/2 log beta~ (Nichol & Dhariwal 2021
    eq. 15). clip clamps x0 to [-1, 1] each step (the official DDPM code does; DiT's does not)."""
    if variance not in ("small", "large", "learned"):
        raise ValueError(f"--variance {variance!r}: use 'small', 'large' or 'learned'")
    if variance == "learned" and not model.learned_sigma:
        raise ValueError("variance='learned' needs a net with learned_sigma (2C output channels)")
    abar = model.alphas_cumprod[ts.cpu()]                                   # (N,) float64, CPU
    abar_next = torch.cat([abar[1:], abar.new_ones(1)])
    beta = 1 - abar / abar_next
    beta_tilde = beta * (1 - abar_next) / (1 - abar)                        # > 0 except on the last step
    c_x0 = beta * abar_next.sqrt() / (1 - abar)
    c_xt = (1 - abar_next) * (1 - beta).sqrt() / (1 - abar)
    for i, t in enumerate(ts.tolist()):
        x0, eps, v = model.predict(x, torch.tensor(float(t)), abar[i])
        if clip:
            x0 = x0.clamp(-1, 1)
        x = c_x0[i].item() * x0 + c_xt[i].item() * x
        if i < len(ts) - 1:
            if variance == "learned":
                frac = (v + 1) / 2                                          # (B, C, H, W)
                std = (0.5 * (frac * math.log(beta[i]) + (1 - frac) * math.log(beta_tilde[i]))).exp()
            else:
                std = math.sqrt((beta if variance == "large" else beta_tilde)[i])
            x = x + std * randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x: torch.Tensor, ts: torch.Tensor, *, eta: float = 0.0, clip: bool = False,
                generator: Optional[torch.Generator] = None, callback=None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from x = x_T over the descending timesteps `ts`, a' = alpha-bar at
    the next one (1 after the last):  x <- sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z,
    s = eta sqrt((1 - a') / (1 - a) (1 - a / a')). eta = 0 is deterministic; eta = 1 has DDPM's posterior
    variance. With eta > 0 noise is drawn on every step, also the last where s = 0 (as the official code,
    which does not clip x0 either)."""
    abar = model.alphas_cumprod[ts.cpu()]
    abar_next = torch.cat([abar[1:], abar.new_ones(1)])
    for i, t in enumerate(ts.tolist()):
        x0, eps, _ = model.predict(x, torch.tensor(float(t)), abar[i])
        if clip:
            x0 = x0.clamp(-1, 1)
        a, a_next = abar[i].item(), abar_next[i].item()
        s = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - s ** 2, 0.0)) * eps
        if eta > 0:
            x = x + s * randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


def _karras_steps(denoise, x, sigmas, heun, churn, s_tmin, s_tmax, s_noise, generator, callback):
    """Karras et al. (2022) Alg. 2 over sigmas (N+1,) ending in 0. Churn (lines 4-6) first raises the noise
    level to sigma_hat = sigma (1 + gamma) with fresh noise, gamma = min(churn / N, sqrt(2) - 1) for sigma
    in [s_tmin, s_tmax]; then an Euler step of dx/dsigma = (x - D(x; sigma)) / sigma (eq. 4), and with
    `heun` the trapezoidal correction, except on the last step to sigma = 0, where it would divide by zero."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2) * randn_like(x, generator)
        d = (x - denoise(x, x.new_full((x.shape[0],), sigma_hat))) / sigma_hat   # dx/dsigma
        x_next = x + d * (sigma_next - sigma_hat)
        if heun and sigma_next != 0:
            d_2 = (x_next - denoise(x_next, x.new_full((x.shape[0],), sigma_next))) / sigma_next
            x_next = x + (d + d_2) / 2 * (sigma_next - sigma_hat)
        x = x_next
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_euler(denoise, x: torch.Tensor, sigmas: torch.Tensor, *, churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 generator: Optional[torch.Generator] = None, callback=None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (Karras et al. 2022, Alg. 2 without the correction),
    optionally with churn. VE view: x (B, C, H, W) starts at noise level sigmas[0] (the caller scales it);
    denoise(x, sigma (B,)) -> x0. NFE = N. With churn = 0 this is also DIAMOND's order-1 sampler."""
    return _karras_steps(denoise, x, sigmas, False, churn, s_tmin, s_tmax, s_noise, generator, callback)


@torch.no_grad()
def sample_heun(denoise, x: torch.Tensor, sigmas: torch.Tensor, *, churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                generator: Optional[torch.Generator] = None, callback=None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 2): the last step, to sigma = 0, stays Euler, so
    NFE = 2N - 1 (as k-diffusion and DIAMOND's order-2 sampler)."""
    return _karras_steps(denoise, x, sigmas, True, churn, s_tmin, s_tmax, s_noise, generator, callback)


@torch.no_grad()
def sample_dpmpp_2m(denoise, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in the VE view, with lambda = -log sigma (half log-SNR)
    and h = lambda_{i+1} - lambda_i:  x <- (sigma_{i+1} / sigma_i) x - expm1(-h) D,  D the denoised
    estimate extrapolated from the previous one on every step but the first:
    D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_{i-1} / h. The last step, to sigma = 0, returns D_i
    (first order; diffusers' final_sigmas_type="zero")."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, x.new_full((x.shape[0],), sigma))
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = denoised
            if old_denoised is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample(net, noise: torch.Tensor, alphas_cumprod: torch.Tensor, *, sampler: str = "ddim", steps: int = 50,
           pred: str = "eps", y: Optional[torch.Tensor] = None, y_null: Optional[torch.Tensor] = None,
           guidance: float = 0.0, eta: float = 0.0, clip: bool = False,
           generator: Optional[torch.Generator] = None, learned_sigma: bool = False, **options):
    """Draw samples from a network trained on the discrete VP process with table `alphas_cumprod` (T,).
    net(x_t, t, y): t (B,) float timesteps in [0, T-1] (fractional for euler/heun), y (B,) long or None ->
    the prediction of `pred` (B, C, H, W), or (B, 2C, H, W) when learned_sigma. Every sampler starts from
    noise = x_T ~ N(0, I) (euler/heun at sigma_max * noise as EDM, k-diffusion and diffusers; dpmpp at the
    exact VP -> VE image sqrt(1 + sigma_max^2) * noise), so one seed gives similar images across samplers.
    guidance: see cfg_net. clip clamps every predicted x0 to [-1, 1]: for an under-trained pixel model
    (whose x0 at high noise overshoots) it can matter more than the sampler; with strong guidance it can
    hurt (it also clips the push). Returns (x0 clamped to [-1, 1], nfe as counted by Denoiser).
    Options (unknown ones raise TypeError; callback(i, x) sees x after each step):
      "ddpm"  steps (respaced when < T; spacing "linspace"), variance "large" (beta, the default) |
              "small" (beta_tilde) | "learned" (the default with learned_sigma)
      "ddim"  steps, eta, spacing "leading" | "trailing" | "linspace" (default "leading")
      "euler", "heun"  Karras sigmas: rho (7), sigma_min / sigma_max (default: the table's sigma at t = 0
              and T-1), churn, s_tmin, s_tmax, s_noise; quantize_t rounds the net's t to integers
      "dpmpp" DPM-Solver++(2M) at the integer t round(linspace(T-1, 0, steps + 1))[:-1], then sigma = 0"""
    check_sampler_options(sampler, eta, options.get("variance"))
    T = len(alphas_cumprod)
    ve = sampler in ("euler", "heun", "dpmpp")  # these see the net through Denoiser.__call__, which clips
    model = Denoiser(net, alphas_cumprod, pred=pred, y=y, y_null=y_null, guidance=guidance, clip=clip and ve,
                     learned_sigma=learned_sigma, quantize_t=options.pop("quantize_t", False))

    if sampler == "ddpm":
        ts = timesteps(T, steps, options.pop("spacing", "linspace"))
        options.setdefault("variance", "learned" if learned_sigma else "large")
        x = sample_ddpm(model, noise, ts, clip=clip, generator=generator, **options)
    elif sampler == "ddim":
        ts = timesteps(T, steps, options.pop("spacing", "leading"))
        x = sample_ddim(model, noise, ts, eta=eta, clip=clip, generator=generator, **options)
    elif sampler in ("euler", "heun"):
        sigma_min = options.pop("sigma_min", None) or model.sigma_min
        sigma_max = options.pop("sigma_max", None) or model.sigma_max
        sigmas = karras_sigmas(steps, sigma_min, sigma_max, options.pop("rho", 7.0))
        step_fn = sample_euler if sampler == "euler" else sample_heun
        x = step_fn(model, noise * sigma_max, sigmas, generator=generator, **options)
    else:  # dpmpp
        t = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
        sigmas = torch.cat([t_to_sigma(t, model.alphas_cumprod), torch.zeros(1, dtype=torch.float64)])
        x = sample_dpmpp_2m(model, noise * math.sqrt(1 + sigmas[0].item() ** 2), sigmas, **options)
    return x.clamp(-1, 1), model.nfe


def check_sampler_options(sampler: str, eta: float = 0.0, variance: Optional[str] = None) -> None:
    """The sampler's name, and that an option given applies to it (by `sample`, and by the command lines
    before any work): an option that does not apply is an error, not silently ignored."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if eta and sampler != "ddim":
        raise ValueError(f"--eta only applies to --sampler ddim (got --sampler {sampler})")
    if variance is not None and sampler != "ddpm":
        raise ValueError(f"--variance only applies to --sampler ddpm (got --sampler {sampler})")


# =====================================================================================================
# 4. EDM pieces
# =====================================================================================================

# EDM (Karras et al. 2022): the network F is wrapped as D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) so
# its input and training target have unit variance at every noise level (Table 1, "Ours"). DIAMOND (Alonso
# et al. 2024) trains with offset noise x = x0 + sigma_off eps_c + sigma eps (eps_c one value per channel)
# and feeds every conditioner the total level s = sqrt(sigma^2 + sigma_off^2), in training and sampling.


def edm_precond(sigma, sigma_data: float = 0.5, sigma_offset_noise: float = 0.0):
    """(c_in, c_out, c_skip, c_noise), each shaped like sigma, with s = sqrt(sigma^2 + sigma_offset_noise^2)
    (s = sigma for plain EDM):  c_in = 1 / sqrt(s^2 + sd^2),  c_skip = sd^2 / (s^2 + sd^2),
    c_out = s sd / sqrt(s^2 + sd^2),  c_noise = ln(s) / 4;  sd = sigma_data."""
    sigma = torch.as_tensor(sigma)
    s = (sigma ** 2 + sigma_offset_noise ** 2).sqrt()
    c_in = 1 / (s ** 2 + sigma_data ** 2).sqrt()
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s * c_skip.sqrt()            # = s sd / sqrt(s^2 + sd^2), written as DIAMOND does (bit-identical)
    c_noise = s.log() / 4
    return c_in, c_out, c_skip, c_noise


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, dtype=torch.float64,
                  device=None) -> torch.Tensor:
    """(n+1,) noise levels of Karras et al. (2022) eq. 5, descending from sigma_max to sigma_min, then 0:
    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1.
    rho = 7 spends more steps at low noise. dtype=torch.float32 reproduces DIAMOND's table bit for bit."""
    ramp = torch.linspace(0, 1, n, dtype=dtype, device=device)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sample_lognormal_sigma(n: int, loc: float, scale: float, sigma_min: float = 0.0,
                           sigma_max: float = math.inf, generator: Optional[torch.Generator] = None,
                           device=None) -> torch.Tensor:
    """(n,) training noise levels ln sigma ~ N(loc, scale^2), clamped to [sigma_min, sigma_max] (EDM: loc
    -1.2, scale 1.2, no clamp; DIAMOND: loc -0.4, scale 1.2, [0.002, 20]). One randn(n) draw, as DIAMOND."""
    device = generator.device if generator is not None else device
    log_sigma = torch.randn(n, generator=generator, device=device) * scale + loc
    return log_sigma.exp().clamp(sigma_min, sigma_max)


# =====================================================================================================
# 5. runtime: seeding, device, compile, DDP, EMA
# =====================================================================================================

def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU). The data order does not depend on these global
    RNGs: get_batch draws from its own seeded generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps (Apple GPU), else cpu; any other name is used as given."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (use auto | cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device, enabled: bool = True):
    """bf16 autocast on GPUs that support it (Ampere+: bf16 needs no loss scaling, unlike fp16); a no-op
    elsewhere (CPU bf16 autocast exists but is usually slower than fp32)."""
    device = torch.device(device)
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile the module's forward in place (nn.Module.compile), so state_dict keys keep their
    names (no `_orig_mod.` prefix) and checkpoints load into an uncompiled model."""
    if enabled:
        module.compile()
    return module


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly 1-process) data-parallel job."""
    rank: int = 0         # global process index, 0..world_size-1
    world_size: int = 1   # number of processes
    local_rank: int = 0   # index on this machine (picks the GPU)
    device: torch.device = torch.device("cpu")
    is_main: bool = True  # rank 0: prints, logs, writes checkpoints


def setup_ddp(device: str = "auto") -> Dist:
    """Join the process group that `torchrun` sets up in the environment: NCCL with one GPU per process,
    else gloo on CPU. Outside torchrun: world_size 1, no process group, device = pick_device(device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=pick_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and (device == "auto" or device.startswith("cuda")):  # one GPU per process
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, dev, rank == 0)


def wrap_ddp(model: nn.Module, dist: Dist) -> nn.Module:
    """DistributedDataParallel when world_size > 1 (gradients are averaged over ranks in backward), else
    the model itself. Save the unwrapped model's state_dict, not the wrapper's."""
    if dist.world_size == 1:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def cleanup_ddp() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_mean(value: float, dist: Dist) -> float:
    """Average a scalar (e.g. the loss of the progress line) over all ranks; identity without DDP."""
    if dist.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=dist.device if dist.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t)
    return t.item() / dist.world_size


def fused_adam(device) -> dict:
    """{"fused": True} where torch has the fused Adam/AdamW kernel (CUDA, CPU): the same update, one pass."""
    return {"fused": True} if torch.device(device).type in ("cuda", "cpu") else {}


# EMA of weights (Polyak averaging): theta_ema <- decay * theta_ema + (1 - decay) * theta. Samples come
# from the EMA model; the official DDPM and DiT use decay 0.9999.

def make_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy in eval mode that ema_update keeps averaging."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """In place, matching by name: float parameters and buffers are averaged; integer buffers (e.g.
    BatchNorm's num_batches_tracked) are copied."""
    source = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in [*ema.named_parameters(), *ema.named_buffers()]:
        if t.dtype.is_floating_point:
            t.lerp_(source[name], 1.0 - decay)
        else:
            t.copy_(source[name])


# =====================================================================================================
# 6. data
# =====================================================================================================

class DataError(ValueError):
    """The dataset is missing, corrupt or unsafe; the message says how to fix it."""


@dataclasses.dataclass
class Dataset:
    """A whole dataset in memory (CIFAR-10's 50k images are 150 MB as uint8)."""
    images: torch.Tensor                    # uint8 (N, 3, H, W)
    labels: Optional[torch.Tensor] = None   # int64 (N,), or None when unlabelled
    num_classes: int = 0                    # 0 when unlabelled
    class_names: Optional[list] = None      # label index -> name, when known


# --- synthetic `shapes`: offline, class-conditional, deterministic --------------------------------------
# Ten classes, each one shape in its own colour, drawn at a random position, size and slight rotation on
# a random dark, slightly tinted gradient background. Shapes are drawn from signed distance functions
# (SDFs, < 0 inside) in the shape's own unit frame, with a one-pixel soft edge (anti-aliasing).

SHAPES_CLASSES = ["circle", "square", "triangle", "plus", "ring",
                  "diamond", "frame", "x", "half_disc", "bar"]
SHAPES_COLORS = [(0.92, 0.16, 0.16), (0.20, 0.85, 0.25), (0.25, 0.40, 0.97), (0.95, 0.85, 0.20),
                 (0.90, 0.25, 0.85), (0.20, 0.85, 0.90), (0.98, 0.55, 0.10), (0.95, 0.95, 0.95),
                 (0.60, 0.30, 0.95), (0.98, 0.55, 0.70)]  # RGB in [0, 1], one per class
SHAPES_TRAIN_N = 10_000  # images of load_dataset("shapes") (seed 0)


def _box(u, v, half_u, half_v):
    """Approximate SDF of an axis-aligned box (exact outside along the axes; fine for 1-px edges)."""
    return torch.maximum(u.abs() - half_u, v.abs() - half_v)


def _shape_sdf(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDF of one class in unit coordinates (the shape spans about [-1, 1]; v points down)."""
    r = torch.sqrt(u * u + v * v)
    if name == "circle":
        return r - 1.0
    if name == "square":
        return _box(u, v, 0.8, 0.8)
    if name == "triangle":  # apex (0, -1), base v = 0.7 between u = +-1: each slanted edge is a half-plane
        return torch.maximum(v - 0.7, (1.7 * u.abs() - v - 1.0) / math.hypot(1.7, 1.0))
    if name == "plus":
        return torch.minimum(_box(u, v, 0.3, 0.95), _box(u, v, 0.95, 0.3))
    if name == "ring":
        return (r - 0.72).abs() - 0.25
    if name == "diamond":
        return (u.abs() + v.abs() - 1.0) / math.sqrt(2)
    if name == "frame":  # hollow square
        m = torch.maximum(u.abs(), v.abs())
        return torch.maximum(m - 0.9, 0.5 - m)
    if name == "x":  # the plus turned by 45 degrees
        a, b = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        return torch.minimum(_box(a, b, 0.25, 1.0), _box(a, b, 1.0, 0.25))
    if name == "half_disc":  # upper half of a disc
        return torch.maximum(r - 1.0, v - 0.2)
    if name == "bar":
        return _box(u, v, 1.0, 0.3)
    raise ValueError(f"unknown shape {name!r}")


def make_shapes(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of the synthetic `shapes` data: (uint8 (n, 3, size, size), int64 labels (n,)), balanced
    classes (n // 10 or n // 10 + 1 each) in random order; a function of (n, seed, size) only."""
    g = torch.Generator().manual_seed(seed)
    k = len(SHAPES_CLASSES)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731  (uniform [0, 1))
    # per-image draws (all drawn up front so every image depends only on the seed and its index)
    center = (0.32 + 0.36 * rand(n, 2)) * size                     # shape centre in pixels
    radius = (0.20 + 0.10 * rand(n)) * size                        # half-extent in pixels
    angle = (rand(n) - 0.5) * 0.6                                  # +-17 degrees
    brightness = 0.8 + 0.25 * rand(n, 1)
    fg_tint = (rand(n, 3) - 0.5) * 0.1
    bg_gray = 0.05 + 0.30 * rand(n, 1)
    bg_tint = (rand(n, 3) - 0.5) * 0.12
    bg_slope = (rand(n, 2) - 0.5) * 0.3                            # background gradient across the image
    colors = torch.tensor(SHAPES_COLORS)[labels]
    fg = (colors * brightness + fg_tint).clamp(0, 1)               # (n, 3)
    bg0 = (bg_gray + bg_tint).clamp(0, 1)                          # (n, 3)

    # Everything before the shape is separable: a pixel's offset from the centre is a column term plus a
    # row term, so u, v and the background ramp cost one full-size pass each.
    pix = torch.arange(size, dtype=torch.float32) + 0.5           # pixel centres
    dx = (pix - center[:, :1])[:, None, :] / radius[:, None, None]  # (n, 1, size): column offset in radii
    dy = (pix - center[:, 1:])[:, :, None] / radius[:, None, None]  # (n, size, 1): row offset
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u, v = cos * dx + sin * dy, cos * dy - sin * dx                # (n, size, size): rotated shape frame
    sdf = torch.empty(n, size, size)
    for c, name in enumerate(SHAPES_CLASSES):
        idx = (labels == c).nonzero().squeeze(1)
        sdf[idx] = _shape_sdf(name, u[idx], v[idx])
    alpha = (0.5 - sdf * radius[:, None, None]).clamp_(0, 1)[:, None]  # (n, 1, size, size): soft edge
    ramp = (pix / size - 0.5) * bg_slope[:, :, None]               # (n, 2, size): x and y gradients
    bg = (bg0[:, :, None, None] + ramp[:, None, 0, None, :]) + ramp[:, None, 1, :, None]
    img = torch.lerp(bg.clamp_(0, 1), fg[:, :, None, None].expand_as(bg), alpha)  # (n, 3, size, size)
    return img.mul_(255).round_().to(torch.uint8), labels.long()


# --- CIFAR-10 ------------------------------------------------------------------------------------------
# The official python-format archive (Krizhevsky, 2009): cifar-10-batches-py/data_batch_1..5 (10k train
# images each) and test_batch, each a Python 2 pickle of {"data": uint8 (10000, 3072) array (rows are
# R, G, B planes of 32x32), "labels": list of ints, ...}. Unpickling normally runs any code the file
# names, so the archive is (1) checked against the official MD5, (2) extracted member by member with
# anything but plain files and folders inside the target refused, and (3) read with an unpickler that
# can build only numpy arrays and dtypes.

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the dataset page
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def file_md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest) -> Path:
    """Stream url to dest through a temporary file (an interrupted download never looks complete)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        os.replace(tmp, dest)
    except OSError as e:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        raise DataError(f"could not download {url} ({e}); download it by hand and put it at {dest}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def safe_extract(archive, dest) -> dict:
    """Extract a .tar(.gz) into dest after checking EVERY member first: absolute paths, '..' parts,
    symbolic and hard links, devices and FIFOs are refused with DataError (nothing is written then). Only
    file contents are written (no modes, owners or times). Returns {member name: md5} of the files."""
    dest = Path(dest).resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name.replace("\\", "/")).parts
                if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts:
                    raise DataError(f"{archive}: unsafe member path {m.name!r} (absolute or with '..'); "
                                    f"refusing to extract — delete the archive and download it again")
                if not (m.isfile() or m.isdir()):
                    kind = "link" if (m.issym() or m.islnk()) else "device or special file"
                    raise DataError(f"{archive}: member {m.name!r} is a {kind}; refusing to extract — "
                                    f"delete the archive and download it again")
                if not (dest / m.name).resolve().is_relative_to(dest):
                    raise DataError(f"{archive}: member {m.name!r} would land outside {dest}; "
                                    "refusing to extract")
            digests = {}
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                data = tar.extractfile(m).read()
                target.write_bytes(data)
                digests[m.name] = hashlib.md5(data).hexdigest()
            return digests
    except (tarfile.TarError, EOFError, OSError) as e:  # OSError: e.g. a truncated gzip stream
        raise DataError(f"{archive} is not a readable tar archive ({e}); "
                        "delete it and download it again") from e


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR-10 batch references: numpy's _reconstruct (Python 2 pickles name
    numpy.core, numpy 2 pickles numpy._core), ndarray and dtype. Anything else (os.system, builtins.eval,
    ...) is refused, never imported."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            try:  # numpy's array-rebuilding function
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct

        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")


def read_cifar_batch(raw: bytes, name: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch (its bytes) -> (uint8 (N, 3, 32, 32), int64 (N,)), unpickled safely."""
    try:
        # latin1: Python 2 str objects (keys, numpy's raw array bytes) decode 1:1 to Python 3 str
        batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{name}: refused to unpickle: {e}. The file is not an official CIFAR-10 batch; "
                        f"delete the data folder and the archive and download it again") from e
    except Exception as e:  # any other parse failure means a damaged file
        raise DataError(f"{name} is corrupt ({type(e).__name__}: {e}); "
                        "delete it and download again") from e
    if not isinstance(batch, dict):
        raise DataError(f"{name}: expected a dict, got {type(batch).__name__}")
    data = batch.get("data", batch.get(b"data"))
    labels = batch.get("labels", batch.get(b"labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072 and isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(i, int) and 0 <= i < 10 for i in labels)):
        raise DataError(f"{name}: not a CIFAR-10 batch (needs uint8 data (N, 3072) and N labels in 0..9)")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels, dtype=torch.long)


def load_cifar10(root="data", train: bool = True, download: bool = True,
                 md5: Optional[str] = None, url: Optional[str] = None) -> Dataset:
    """CIFAR-10 train (50k) or test (10k) images from root/cifar-10-python.tar.gz, downloaded when missing,
    MD5-checked on every call, extracted safely once (with the digests of the extracted files recorded, so
    a damaged one is re-extracted). md5 and url default to CIFAR10_MD5 and CIFAR10_URL."""
    md5, url = md5 or CIFAR10_MD5, url or CIFAR10_URL
    root = Path(root)
    archive = root / CIFAR10_ARCHIVE
    if not archive.is_file():
        if not download:
            raise DataError(f"CIFAR-10 archive not found at {archive}: download {url} (MD5 {md5}) and put it "
                            f"there, or allow downloading")
        download_file(url, archive)
    got = file_md5(archive)
    if got != md5:
        raise DataError(f"{archive} has MD5 {got}, expected {md5}: the file is damaged or not the official "
                        f"archive. Delete it and run again to download {url}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    marker = root / CIFAR10_DIR / ".extracted.json"  # {"archive_md5": ..., "files": {member: md5}}
    digests = json.loads(marker.read_text()) if marker.is_file() else {}
    if digests.get("archive_md5") != md5:
        digests = {"archive_md5": md5, "files": safe_extract(archive, root)}
        marker.write_text(json.dumps(digests, indent=1))
    images, labels = [], []
    for name in names:
        member = f"{CIFAR10_DIR}/{name}"
        if member not in digests["files"]:
            raise DataError(f"{archive} has no member {member}: it is not the official CIFAR-10 archive")
        path = root / member
        raw = path.read_bytes() if path.is_file() else b""
        if hashlib.md5(raw).hexdigest() != digests["files"][member]:  # changed since extraction: redo it
            digests = {"archive_md5": md5, "files": safe_extract(archive, root)}
            marker.write_text(json.dumps(digests, indent=1))
            raw = path.read_bytes()
        x, y = read_cifar_batch(raw, str(path))
        images.append(x)
        labels.append(y)
    return Dataset(torch.cat(images), torch.cat(labels), 10, list(CIFAR10_CLASSES))


# --- image folders -------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _load_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB: centre-cropped to a square, resized (bicubic, antialiased by pillow)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError) as e:  # pillow: UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path}: {e}; delete or replace the file") from e
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    if s != size:
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def load_image_folder(root, image_size: int = 32) -> Dataset:
    """Every image under `root`, recursively, in sorted path order. When every image lies in a sub-folder,
    the first-level sub-folder names are the classes (sorted, like ImageFolder); else it is unlabelled."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--dataset folder:{root}: no such folder (give the path of a folder of images)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"--dataset folder:{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in it "
                        f"or its sub-folders")
    images = torch.from_numpy(np.stack([_load_image(p, image_size) for p in files])).permute(0, 3, 1, 2)
    parts = [p.relative_to(root).parts for p in files]
    if all(len(part) > 1 for part in parts):
        class_names = sorted({part[0] for part in parts})
        index = {c: i for i, c in enumerate(class_names)}
        labels = torch.tensor([index[part[0]] for part in parts], dtype=torch.long)
        return Dataset(images.contiguous(), labels, len(class_names), class_names)
    return Dataset(images.contiguous())


def load_dataset(name: str, root="data", image_size: int = 32, download: bool = True,
                 train: bool = True) -> Dataset:
    """'cifar10' (50k training or, train=False, 10k test images; downloaded to root on first use and
    checked), 'shapes' (SHAPES_TRAIN_N synthetic images, seed 0) or 'folder:PATH', at image_size."""
    if name == "shapes":
        n = SHAPES_TRAIN_N if train else SHAPES_TRAIN_N // 5
        images, labels = make_shapes(n, seed=0 if train else 1, size=image_size)
        return Dataset(images, labels, len(SHAPES_CLASSES), list(SHAPES_CLASSES))
    if name.startswith("folder:"):
        return load_image_folder(expand_path(name[len("folder:"):]), image_size)
    if name == "cifar10":
        data = load_cifar10(root, train=train, download=download)
        if image_size != data.images.shape[-1]:
            x = F.interpolate(data.images.float(), size=(image_size, image_size), mode="bicubic",
                              antialias=True, align_corners=False)
            data.images = x.round().clamp(0, 255).to(torch.uint8)
        return data
    raise DataError(f"--dataset {name!r}: use cifar10 | shapes | folder:PATH")


# --- batches -------------------------------------------------------------------------------------------
# Data order is a pure function of (seed, step, rank), not of any generator state: a resumed run at step
# s draws exactly the batches an uninterrupted run would, and no loader state needs checkpointing.


def _seed_of(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence: (1, 2) and (2, 1) differ)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


@functools.lru_cache(maxsize=4)
def _epoch_perm(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the n examples in one epoch (cached: a batch needs one or two of them)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(seed, 0, epoch)))


def get_batch(data: Dataset, step: int, batch_size: int, seed: int, flip: bool = True, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Batch `step` for process `rank`: (x float32 in [-1, 1] (B, 3, H, W), y int64 (B,) or None), B the
    per-rank batch. A step's global batch is world_size * B consecutive examples of a fresh permutation per
    epoch, rank r taking the r-th block, and flips (prob. 1/2) are drawn per global position from (seed,
    step): world_size ranks together see exactly the batch one process with B * world_size would see."""

    n = len(data.images)
    global_batch = batch_size * world_size
    pos = step * global_batch + rank * batch_size + torch.arange(batch_size)  # positions in the stream
    epochs = pos // n
    idx = torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        idx[sel] = _epoch_perm(seed, e, n)[pos[sel] % n]
    x = data.images[idx.to(data.images.device)].float() / 127.5 - 1.0
    if flip:
        g = torch.Generator().manual_seed(_seed_of(seed, 1, step))
        mirror = (torch.rand(global_batch, generator=g) < 0.5)[rank * batch_size:(rank + 1) * batch_size]
        x = torch.where(mirror.to(x.device)[:, None, None, None], x.flip(3), x)
    y = data.labels[idx.to(data.labels.device)] if data.labels is not None else None
    return x, y


# =====================================================================================================
# 7. images and GIFs
# =====================================================================================================

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, C, H, W) in [0, 255] (clamped, rounded)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_image_grid(images, path, nrow: Optional[int] = None, pad: int = 2, labels=None, class_names=None,
                    scale: int = 1) -> Path:
    """A PNG grid of images (N, 1 or 3, H, W), float in [-1, 1] or uint8, each enlarged `scale` times by
    pixel repetition. Without labels: nrow images per row (default ceil(sqrt(N))). With labels (N,): one
    block of rows per class in order of appearance, named by class_names[label] (or the number), one row
    per class whenever the largest class has at most ceil(sqrt(N)) images."""
    images = torch.as_tensor(images).detach().cpu()
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_image_grid expects (N, 1|3, H, W) images, got {tuple(images.shape)}")
    images = images if images.dtype == torch.uint8 else to_uint8(images)
    images = images.expand(-1, 3, -1, -1).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    n, _, h, w = images.shape
    if labels is None:
        nrow = nrow or math.ceil(math.sqrt(n))
        rows = [(None, list(range(i, min(i + nrow, n)))) for i in range(0, n, nrow)]
    else:
        labels = [int(v) for v in labels]
        groups = {c: [i for i in range(n) if labels[i] == c] for c in dict.fromkeys(labels)}
        nrow = min(max(map(len, groups.values())), math.ceil(math.sqrt(n)))
        rows = [((str(class_names[c]) if class_names else str(c)) if j == 0 else "", g[j:j + nrow])
                for c, g in groups.items() for j in range(0, len(g), nrow)]
    names = [name for name, _ in rows if name]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    strip = int(max(measure.textlength(name) for name in names)) + 6 if names else 0
    grid = Image.new("RGB", (strip + nrow * (w + pad) + pad, len(rows) * (h + pad) + pad))
    draw = ImageDraw.Draw(grid)
    for r, (name, idx) in enumerate(rows):
        top = pad + r * (h + pad)
        if name:
            draw.text((4, top + h // 2), name, fill=(230, 230, 230), anchor="lm")
        for c, i in enumerate(idx):
            tile = Image.fromarray(images[i].permute(1, 2, 0).numpy())
            grid.paste(tile, (strip + pad + c * (w + pad), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_npz(images: torch.Tensor, labels: Optional[torch.Tensor], path) -> Path:
    """[-1, 1] images (N, 3, H, W) in the layout of the ADM (guided-diffusion) FID evaluator: arr_0 = uint8
    (N, H, W, 3); arr_1 = labels when given (ADM's convention; its evaluator ignores them)."""
    arrays = [to_uint8(images).permute(0, 2, 3, 1).numpy()]
    if labels is not None:
        arrays.append(labels.cpu().numpy())
    path = Path(path)
    np.savez(path, *arrays)
    return path


def save_gif(frames, path, fps: float = 10, scale: int = 1) -> Path:
    """Write an animated GIF (loops forever). frames: uint8 (T, H, W, 3) numpy/tensor or a list of
    (H, W, 3) frames; float frames in [-1, 1] and (T, 3, H, W) layouts are converted. `scale` enlarges
    each frame by pixel repetition (64x64 Atari frames are tiny). Returns the path."""
    if isinstance(frames, (list, tuple)):
        frames = torch.stack([torch.as_tensor(np.asarray(f)) for f in frames])
    frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames).cpu()
    if frames.ndim != 4:
        raise ValueError(f"save_gif expects (T, H, W, 3) frames, got {tuple(frames.shape)}")
    if frames.shape[-1] != 3 and frames.shape[1] == 3:  # (T, 3, H, W) -> (T, H, W, 3)
        frames = frames.permute(0, 2, 3, 1)
    if frames.dtype != torch.uint8:
        frames = to_uint8(frames)
    if scale > 1:
        frames = frames.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pics = [Image.fromarray(f) for f in frames.numpy()]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path


CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
                 (23, 190, 207)]


def _nice_ticks(lo: float, hi: float, most: int = 6) -> list:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi], at most `most` of them."""
    raw = (hi - lo) / (most - 1)
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)
                if m * 10 ** math.floor(math.log10(raw)) >= raw)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _tick_text(v: float) -> str:
    return f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k" if abs(v) >= 1e4 else f"{v:.4g}"


def save_curves(path, panels: list, panel_size: tuple = (440, 300), columns: int = 2) -> Path:
    """Line plots with pillow only, written atomically (a viewer never sees half a file). panels: dicts with
    "title", "xlabel", "series" {name: [(x, y), ...]} and optionally "hlines" {name: y} (dashed reference
    levels); each panel gets axes with round tick values, light grid lines and a legend. Returns the path."""
    w, h = panel_size
    left, right, top, bottom = 52, 14, 40, 36  # plot-area margins: tick labels; title and legend; x label
    rows = math.ceil(len(panels) / columns)
    img = Image.new("RGB", (w * min(columns, len(panels)), h * rows), "white")
    draw = ImageDraw.Draw(img)
    text_w = lambda s: draw.textbbox((0, 0), s)[2]
    for i, panel in enumerate(panels):
        x0, y0 = (i % columns) * w + left, (i // columns) * h + top  # plot area: (x0, y0) to (x1, y1)
        x1, y1 = (i % columns + 1) * w - right, (i // columns + 1) * h - bottom
        draw.text(((x0 + x1 - text_w(panel["title"])) / 2, y0 - 36), panel["title"], fill="black")
        draw.text(((x0 + x1 - text_w(panel["xlabel"])) / 2, y1 + 18), panel["xlabel"], fill="black")
        series, hlines = panel["series"], panel.get("hlines", {})
        xs = [x for pts in series.values() for x, _ in pts]
        ys = [y for pts in series.values() for _, y in pts] + list(hlines.values())
        if not xs:
            draw.text((x0 + 8, (y0 + y1) / 2), "no data yet", fill="gray")
            continue
        (xlo, xhi), (ylo, yhi) = [(min(v), max(v)) if max(v) > min(v) else (min(v) - 1, max(v) + 1)
                                  for v in (xs, ys)]
        xlo, xhi = xlo - 0.03 * (xhi - xlo), xhi + 0.03 * (xhi - xlo)  # keep points off the frame
        ylo, yhi = ylo - 0.05 * (yhi - ylo), yhi + 0.05 * (yhi - ylo)
        px = lambda x: x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)
        py = lambda y: y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)
        for t in _nice_ticks(xlo, xhi):
            draw.line([(px(t), y0), (px(t), y1)], fill=(230, 230, 230))
            draw.text((px(t) - text_w(_tick_text(t)) / 2, y1 + 3), _tick_text(t), fill="black")
        for t in _nice_ticks(ylo, yhi):
            draw.line([(x0, py(t)), (x1, py(t))], fill=(230, 230, 230))
            draw.text((x0 - 4 - text_w(_tick_text(t)), py(t) - 6), _tick_text(t), fill="black")
        draw.rectangle([x0, y0, x1, y1], outline="black")
        legend = []
        for k, (name, pts) in enumerate(series.items()):
            colour, pts = CURVE_COLOURS[k % len(CURVE_COLOURS)], sorted(pts)
            if len(pts) > 1:
                draw.line([(px(x), py(y)) for x, y in pts], fill=colour, width=2)
            for x, y in pts:
                draw.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=colour)
            legend.append((name, colour))
        for k, (name, y) in enumerate(hlines.items(), start=len(series)):
            colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
            for xa in range(int(x0), int(x1), 8):  # dashed
                draw.line([(xa, py(y)), (min(xa + 4, x1), py(y))], fill=colour, width=2)
            legend.append((f"{name} ({y:.4g})", colour))
        lx = x0  # the legend: one row between the title and the plot, never over the data
        for name, colour in legend:
            draw.line([(lx, y0 - 12), (lx + 14, y0 - 12)], fill=colour, width=2)
            draw.text((lx + 18, y0 - 18), name, fill="black")
            lx += 30 + text_w(name)
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


# =====================================================================================================
# 8. checkpoints, run folders, metrics log
# =====================================================================================================

class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe (holds pickled code) or of another kind."""


_PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_plain(obj, where: str = "state") -> None:
    """Refuse at save time what torch.load(weights_only=True) would refuse at load time (e.g. a dataclass
    or argparse.Namespace: store dataclasses.asdict(cfg) instead)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_TYPES):
        raise TypeError(f"{where} is a {type(obj).__name__}: checkpoints hold only dicts, lists, tuples, "
                        f"str/int/float/bool/None and tensors, so they load with weights_only=True")


def atomic_write(path, write) -> Path:
    """The one way this project writes a file that must never be seen half-written (checkpoints, episodes,
    indexes, caches): write(f) into a temporary file of the same folder, fsync, os.replace over `path`
    (atomic on POSIX and Windows), fsync the folder. A crash at any moment leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the write failed before the rename: drop the partial file, keep the old one
            tmp.unlink()
    if os.name == "posix":
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by an earlier write killed mid-way
            if not _pid_alive(stale.name.rsplit("-", 1)[1]):
                stale.unlink(missing_ok=True)
    return path


def save_checkpoint(path, state: dict) -> Path:
    """Write `state` (plain types and tensors only, so it loads with weights_only=True) with atomic_write."""
    _check_plain(state)
    return atomic_write(path, lambda f: torch.save(state, f))


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (load_state_dict's lists every key)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def torch_load(path, map_location="cpu", want: str = ""):
    """torch.load(weights_only=True): a file holding pickled code is refused, not run. A missing, corrupt
    or truncated file raises CheckpointError, its message ending with `want` (what file is expected)."""
    path, want = Path(path), f"; {want}" if want else ""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}{want}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on damage
        raise CheckpointError(f"cannot load {path} safely (corrupt, truncated, or holds pickled objects "
                              f"other than tensors and plain types): {type(e).__name__}: "
                              f"{one_line(e, 160)}{want}") from e


def load_checkpoint(path, kind: str, map_location="cpu") -> dict:
    """A checkpoint written by save_checkpoint (loaded by torch_load) whose state["kind"] == kind."""
    state = torch_load(path, map_location)
    if not isinstance(state, dict) or "kind" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'kind' entry)")
    if state["kind"] != kind:
        raise CheckpointError(f"{path} is a {state['kind']!r} checkpoint, but a {kind!r} checkpoint "
                              f"is needed (use {state['kind']}.py for it)")
    return state


def make_run_dir(kind: str, name: str, root="runs") -> Path:
    """Create runs/<kind>-<name>-<YYYYmmdd-HHMMSS>/ (-2, -3... if taken) on the main rank only."""
    base = Path(root) / f"{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            i += 1
            path = base.with_name(f"{base.name}-{i}")


class MetricsLog:
    """Appends one JSON object per .log() call to run_dir/metrics.jsonl; tensors become floats."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, **metrics) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()})
        with open(self.path, "a") as f:

            f.write(json.dumps(row) + "\n")


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Progress lines: `.line(step, loss, items)` -> "step 100/800000 | loss 0.0312 | 512.3 img/s |
    ETA 3h12m", where items = items (images, frames...) processed per step, e.g. the global batch
    size. Speed and ETA are measured since the previous line (or since construction)."""

    def __init__(self, total_steps: int, unit: str = "img", start_step: int = 0):
        self.total_steps, self.unit = total_steps, unit
        self.last_step, self.last_time = start_step, time.perf_counter()

    def line(self, step: int, loss: float, items: int = 1) -> str:
        now = time.perf_counter()
        dt, dsteps = max(now - self.last_time, 1e-9), step - self.last_step
        self.last_step, self.last_time = step, now
        rate = dsteps * items / dt
        eta = (self.total_steps - step) * dt / dsteps if dsteps > 0 else float("nan")
        eta_text = _format_duration(eta) if math.isfinite(eta) else "?"
        return (f"step {step}/{self.total_steps} | loss {float(loss):.4f} | {rate:.1f} {self.unit}/s | "
                f"ETA {eta_text}")


# =====================================================================================================
# 9. sample-quality metrics
# =====================================================================================================

# Offline stand-ins for FID and precision/recall on the synthetic `shapes` data. FID (Heusel et al., 2017)
# compares Inception-v3 pool features, whose weights cannot be downloaded here; a small CNN trained on real
# `shapes` plays Inception's role. Its pooled last conv layer (like Inception's pool3) is the feature space of
#   - shapes-FD: the FID formula ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)),
#   - precision / recall of Kynkaanniemi et al. (2019), from k-NN balls around feature vectors,
# and its logits give the class accuracy of class-conditional samples. Trained on recoloured images, it
# reads the class from the shape, and its features are fairly colour-blind (N=500 held-out real images:
# FD 0.26; with R,G,B channels swapped: 0.84; blurred: 10; two classes only: 65; uniform noise: 100).
# FD and the k-NN metrics are biased in the number of samples: compare at the same N and classifier key.
# For real FID on CIFAR-10, write samples with `--npz` and use the ADM evaluator (see README).

SHAPES_CLF_VERSION = 2       # bump when the recipe changes; it enters the cache key
SHAPES_CLF_TRAIN_SEED = 101  # make_shapes seed of the classifier's training images
SHAPES_CLF_TRAIN_N = 4000    # training images, seen SHAPES_CLF_EPOCHS times
SHAPES_CLF_EPOCHS = 3
SHAPES_CLF_GRAY_P = 0.25     # colour augmentation: channels always permuted, grayscale with this probability
SHAPES_CLF_LR = 3e-3         # Adam, decayed linearly to 0
SHAPES_CLF_BATCH = 128
SHAPES_REAL_SEED = 202       # held-out make_shapes seed of the real reference set (never trained on)
SHAPES_FEAT_DIM = 128        # width of the feature layer

_SHAPES_MEMO: dict = {}      # in-process cache of the classifier and real features, by cache key


def shapes_classifier_net(num_classes: int, feat_dim: int = SHAPES_FEAT_DIM) -> nn.Sequential:
    """Four conv-BN-ReLU layers (32 -> 16 -> 8 -> 4 pixels), global average pool, linear head. x (N, 3, H, W)
    in [-1, 1]: net[:-1](x) -> (N, feat_dim) features, net(x) -> logits. BatchNorm is what makes the short
    training enough: without it the same recipe reached 58% held-out accuracy instead of 99.7%."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(
        *block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
        *block(64, feat_dim), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (N, feat_dim): this metric's "pool3"
        nn.Linear(feat_dim, num_classes),
    )


def shapes_cache_key() -> str:
    """Hash of the recipe and of a few generated images: a change to either gives a new key (and cache
    file), so a stale classifier is never loaded."""
    images, labels = make_shapes(16, seed=0, size=32)
    recipe = (SHAPES_CLF_VERSION, SHAPES_CLF_TRAIN_SEED, SHAPES_CLF_TRAIN_N, SHAPES_CLF_EPOCHS,
              SHAPES_CLF_GRAY_P, SHAPES_CLF_LR, SHAPES_CLF_BATCH, SHAPES_FEAT_DIM, len(SHAPES_CLASSES))
    h = hashlib.sha256(repr(recipe).encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:12]


def recolour(x: torch.Tensor, g: torch.Generator, gray_p: float = SHAPES_CLF_GRAY_P) -> torch.Tensor:
    """Colour augmentation of (B, 3, H, W) images: a random RGB permutation per image, and grayscale with
    probability gray_p. Every `shapes` class has its own colour, so without this the classifier learns
    colour only (100% on real images, 37% once their channels are permuted, 19% in grayscale)."""
    perm = torch.rand(len(x), 3, generator=g).argsort(1)                 # (B, 3) channel orders
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gray = torch.rand(len(x), generator=g) < gray_p
    return torch.where(gray[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)


def train_shapes_classifier(seed: int = SHAPES_CLF_TRAIN_SEED) -> nn.Sequential:
    """The reference classifier trained on make_shapes(SHAPES_CLF_TRAIN_N, seed), deterministically. The
    global RNG is left as it was (a training loop that evaluates still resumes exactly), and gradients are
    on even when the caller evaluates under no_grad / inference_mode."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        images, labels = make_shapes(SHAPES_CLF_TRAIN_N, seed=seed, size=32)
        x = images.float() / 127.5 - 1
        g = torch.Generator().manual_seed(seed)  # batch order and augmentation
        torch.manual_seed(seed)  # weight init
        net = shapes_classifier_net(len(SHAPES_CLASSES))
        opt = torch.optim.Adam(net.parameters(), lr=SHAPES_CLF_LR)
        total = SHAPES_CLF_EPOCHS * math.ceil(len(x) / SHAPES_CLF_BATCH)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total)
        for _ in range(SHAPES_CLF_EPOCHS):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), SHAPES_CLF_BATCH):
                idx = perm[i:i + SHAPES_CLF_BATCH]
                loss = F.cross_entropy(net(recolour(x[idx], g)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net.eval().requires_grad_(False)


def shapes_classifier(cache_dir: Optional[str] = None) -> nn.Sequential:
    """The reference classifier (eval mode, CPU): memoised, else loaded weights_only from
    cache_dir/shapes_classifier-KEY.pt, else trained (and then written there when cache_dir is given)."""
    key = shapes_cache_key()
    path = Path(cache_dir) / f"shapes_classifier-{key}.pt" if cache_dir is not None else None
    if ("clf", key) not in _SHAPES_MEMO:
        if path is not None and path.exists():
            net = shapes_classifier_net(len(SHAPES_CLASSES))
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            net.eval().requires_grad_(False)
        else:
            net = train_shapes_classifier()
        _SHAPES_MEMO[("clf", key)] = net
    net = _SHAPES_MEMO[("clf", key)]
    if path is not None and not path.exists():
        atomic_write(path, lambda f: torch.save(net.state_dict(), f))
    return net


@torch.no_grad()
def shapes_features(net: nn.Sequential, images: torch.Tensor, batch_size: int = 500):
    """uint8 images (N, 3, H, W) -> (features float64 (N, D), logits float32 (N, classes))."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    feats, logits = [], []
    for chunk in images.cpu().split(batch_size):
        f = net[:-1](chunk.float() / 127.5 - 1)
        feats.append(f.double())
        logits.append(net[-1](f))
    return torch.cat(feats), torch.cat(logits)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose argmax class is the class they were generated for."""
    assert labels.shape == logits.shape[:1], f"labels {tuple(labels.shape)} vs logits {tuple(logits.shape)}"
    return (logits.argmax(1) == labels.cpu()).double().mean().item()


def frechet_distance_gaussians(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
        d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).
    sigma1 sigma2 is not symmetric, but it is similar to M = sigma1^(1/2) sigma2 sigma1^(1/2), which is
    symmetric PSD, so Tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(M)). Two symmetric eigh calls are
    stable even for singular covariances (no scipy sqrtm, no complex parts to discard)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64)
                                for a in (mu1, mu2, sigma1, sigma2))
    evals, evecs = torch.linalg.eigh(sigma1)
    sqrt1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T  # sigma1^(1/2)
    m = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return d2.item()


def frechet_distance(feats_a, feats_b) -> float:
    """The FID formula on feature sets (N, D) and (M, D): Gaussians with the mean and unbiased covariance
    (as FID's np.cov) of each."""
    a = torch.as_tensor(feats_a, dtype=torch.float64)
    b = torch.as_tensor(feats_b, dtype=torch.float64)
    return frechet_distance_gaussians(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def _knn_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (column 0 of the sorted row is itself)."""
    return torch.cat([torch.cdist(f, feats).kthvalue(k + 1, dim=1).values for f in feats.split(chunk)])


def _in_manifold(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024):
    """For each query row: does it fall inside at least one ball B(support_j, radii_j)?"""
    return torch.cat([(torch.cdist(q, support) <= radii).any(1) for q in query.split(chunk)])


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019). The real manifold is the union of balls
    around each real feature with radius = distance to its k-th nearest real neighbour; precision = the
    fraction of fake samples inside it (are samples realistic?), recall = the fraction of real samples
    inside the fake manifold (is the data's variety covered?)."""
    real = torch.as_tensor(real_feats, dtype=torch.float64)
    fake = torch.as_tensor(fake_feats, dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall needs more than k={k} samples per set, "
                         f"got {len(real)} and {len(fake)}")
    precision = _in_manifold(fake, real, _knn_radii(real, k)).double().mean().item()
    recall = _in_manifold(real, fake, _knn_radii(fake, k)).double().mean().item()
    return precision, recall


def evaluate_samples(fake_uint8: torch.Tensor, fake_labels: Optional[torch.Tensor] = None,
                     cache_dir: Optional[str] = None, n_real: Optional[int] = None) -> dict:
    """Sample quality of generated `shapes` images against n_real (default: as many) held-out real images:
    {"shapes_fd", "precision", "recall"}, plus "class_acc" given the classes the samples were generated
    for; the global RNG is not touched. Use N in the hundreds: with few samples the k-NN balls in 128-d
    are huge (random gray images: precision 0.67 at N=30, 0.06 at N=500). 16 and 8 px images are scored
    against real ones of their size, both nearest-upsampled to 32 px (real 16 px: 96% class accuracy)."""
    size = fake_uint8.shape[-1] if fake_uint8.ndim == 4 else 0
    if (fake_uint8.dtype != torch.uint8 or fake_uint8.ndim != 4 or fake_uint8.shape[1] != 3
            or fake_uint8.shape[2] != size or not 0 < size <= 32 or 32 % size):
        raise ValueError(f"evaluate_samples expects uint8 (N, 3, S, S) images with S = 32, 16 or 8, "
                         f"got {fake_uint8.dtype} {tuple(fake_uint8.shape)} (convert with to_uint8)")
    net = shapes_classifier(cache_dir)
    to32 = lambda x: x.repeat_interleave(32 // size, 2).repeat_interleave(32 // size, 3)  # noqa: E731
    n_real = len(fake_uint8) if n_real is None else n_real
    real_key = ("real", shapes_cache_key(), n_real, size)
    if real_key not in _SHAPES_MEMO:
        real = make_shapes(n_real, seed=SHAPES_REAL_SEED, size=size)[0]
        _SHAPES_MEMO[real_key] = shapes_features(net, to32(real))[0]
    real_feats = _SHAPES_MEMO[real_key]
    fake_feats, logits = shapes_features(net, to32(fake_uint8))
    precision, recall = precision_recall(real_feats, fake_feats, k=3)
    metrics = {"shapes_fd": frechet_distance(real_feats, fake_feats)}
    if fake_labels is not None:
        metrics["class_acc"] = class_accuracy(logits, fake_labels)
    metrics.update(precision=precision, recall=recall)
    return metrics


def format_metrics_table(rows: list) -> str:
    """A Markdown table of dicts: columns in first-seen order, floats to 4 significant digits."""

    columns = list(dict.fromkeys(key for row in rows for key in row))
    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    table = [columns, ["---"] * len(columns)] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |" for r in table)


# =====================================================================================================
# 10. diffusion runs: the training loss, run folders, sampling and evaluation commands of ddpm.py and dit.py
# =====================================================================================================

SAMPLE_SETTINGS = ("sampler", "steps", "guidance", "clip")  # a run's grid settings: sample's defaults


def grid_settings(cfg) -> dict:
    """What a run's grids are drawn with (its RunConfig's sample_* fields and seed): the sample command's
    defaults, so `sample --ckpt RUN` redraws the run's last grid."""
    return dict(sampler=cfg.sample_sampler, steps=cfg.sample_steps, guidance=cfg.sample_guidance,
                clip=cfg.sample_clip, n=cfg.sample_n, seed=cfg.seed)


@dataclasses.dataclass
class RunConfig:
    """The fields ddpm.py and dit.py share, with one meaning in both (each script's config adds its network's
    fields and sets its own defaults)."""
    # data
    dataset: str = field("cifar10", "cifar10 | shapes | folder:PATH")
    data_root: str = field("data", "where datasets are downloaded / cached")
    img_size: int = field(32, "image side (pixels)")
    flip: bool = field(True, "random horizontal flips (the only augmentation)")
    label_dropout: float = field(0.1, "label -> null label rate in training (classifier-free guidance)")
    # diffusion
    schedule: str = field("linear", "beta schedule: linear | cosine")
    timesteps: int = field(1000, "diffusion steps T")
    beta_start: float = field(1e-4, "linear schedule beta_1")
    beta_end: float = field(0.02, "linear schedule beta_T")
    pred: str = field("eps", "what the network predicts: eps (both papers) | x0 | v")
    # optimisation
    batch_size: int = field(128, "global batch size (split over DDP ranks)")
    steps: int = field(0, "training steps")
    lr: float = field(1e-4, "learning rate")
    ema_decay: float = field(0.9999, "EMA decay of the sampling weights")
    seed: int = field(0, "seed of init, data order, noise, dropout and label dropout")
    # runtime
    device: str = field("auto", "auto | cpu | cuda | mps")
    bf16: bool = field(False, "bf16 autocast (GPU)")
    compile: bool = field(False, "torch.compile the network")
    # logging, checkpoints, sample grids (their settings are the sample command's defaults), evaluation
    log_every: int = field(100, "print/log the loss every N steps")
    ckpt_every: int = field(5000, "atomic checkpoint every N steps (and at the end)")
    sample_every: int = field(5000, "EMA sample grid every N steps (0: only at the end)")
    sample_n: int = field(64, "images per grid (one block of rows per class when conditional)")
    sample_sampler: str = field("ddim", "sampler of the grids: " + " | ".join(SAMPLERS))
    sample_steps: int = field(50, "sampler steps of the grids")
    sample_guidance: float = field(0.0, "CFG weight w of the grids: (1 + w) eps(x, y) - w eps(x, null)")
    sample_clip: bool = field(False, "clamp every predicted x0 to [-1, 1] in the grids")
    eval_every: int = field(0, "shapes metrics every N steps (0: off)")
    eval_n: int = field(500, "samples per in-training evaluation")


def check_run_config(cfg, guidance_ok: bool) -> None:
    """The checks of the RunConfig fields; guidance_ok: the model is trained with a null label, so its
    grids may use --sample-guidance."""
    if not (cfg.dataset in ("cifar10", "shapes") or cfg.dataset.startswith("folder:")):
        raise ValueError(f"--dataset {cfg.dataset!r} is unknown; use cifar10, shapes or folder:PATH")
    check_ranges(cfg, positive=("img_size", "timesteps", "batch_size", "lr", "log_every", "ckpt_every",
                                "sample_n", "sample_steps", "eval_n"),
                 non_negative=("sample_every", "eval_every"), unit=("ema_decay",), rate=("label_dropout",))
    if cfg.schedule not in ("linear", "cosine"):
        raise ValueError(f"--schedule {cfg.schedule!r}: use linear or cosine")
    if cfg.schedule == "linear":
        check_linear_betas(cfg.beta_start, cfg.beta_end)
    if cfg.pred not in PREDICTIONS:
        raise ValueError(f"--pred {cfg.pred!r}: use one of {', '.join(PREDICTIONS)}")
    if cfg.sample_sampler not in SAMPLERS:
        raise ValueError(f"--sample-sampler {cfg.sample_sampler!r}: use one of {', '.join(SAMPLERS)}")
    if cfg.sample_guidance and not guidance_ok:
        raise ValueError(f"--sample-guidance {cfg.sample_guidance} needs the null label of a "
                         "class-conditional model trained with --label-dropout > 0; add --sample-guidance 0")
    if cfg.eval_every:
        check_evaluable(cfg.dataset, cfg.img_size, cfg.eval_n, "--eval-every", "--eval-n")


def parse_train_args(argv, prog: str, description: str, kind: str, config_of, preset_config, check,
                     presets: dict):
    """The train command line: one flag per config field, defaulting to preset_config(pre-read flags) (the
    --preset's values), or with --resume to the run's saved config (config_of(checkpoint of `kind`)), so flags
    given now change only what they name. --epochs without --steps decides the length (a preset's step count
    would silently win)."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--resume")
    pre.add_argument("--model")
    known, _ = pre.parse_known_args(argv)
    base = (config_of(load_checkpoint(checkpoint_file(known.resume), kind)) if known.resume
            else preset_config(known))
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--resume", help="a run to continue exactly: its folder or RUN/ckpt.pt")
    if "preset" not in {f.name for f in dataclasses.fields(base)}:
        parser.add_argument("--preset", default="cifar10", help=f"base values: {' | '.join(presets)}")
    add_config_args(parser, base)
    cfg = config_from_args(base, parser.parse_args(argv))
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if "--epochs" in given and "--steps" in given:
        raise ValueError("give --steps or --epochs, not both")
    if "--epochs" in given:
        cfg = dataclasses.replace(cfg, steps=0)
    if cfg.dataset.lower() in ("cifar10", "shapes"):  # folder paths keep their case
        cfg = dataclasses.replace(cfg, dataset=cfg.dataset.lower())
    if cfg.dataset.startswith("folder:"):  # recorded absolute, so a resume finds it from anywhere
        cfg = dataclasses.replace(cfg, dataset="folder:" + str(expand_path(cfg.dataset[7:]).absolute()))
    check(cfg)
    return cfg, known.resume


def device_table(table: torch.Tensor, device) -> torch.Tensor:
    """A float64 schedule table on the training device (on the CPU for MPS, which has no float64)."""
    return table.to(device) if torch.device(device).type != "mps" else table.cpu()


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The randomness of one training step (t, noise, label dropout; dropout through the re-seeded global
    RNG) as a function of (seed, step, rank), like get_batch's data order: a resumed run repeats an
    uninterrupted one exactly, and every DDP rank draws its own noise."""
    key = _seed_of(seed, 2, step, rank)
    torch.manual_seed(key)
    return torch.Generator(device=device).manual_seed(key)


def diffusion_loss(net, x0: torch.Tensor, alphas_cumprod: torch.Tensor, y: Optional[torch.Tensor] = None,
                   *, null_label: Optional[int] = None, label_dropout: float = 0.0, pred: str = "eps",
                   generator: Optional[torch.Generator] = None):
    """L_simple (Ho et al. 2020, eq. 14) per sample: t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(a_t) x0 +
    sqrt(1 - a_t) eps, and the mean over pixels of (target - out)^2, out the first C channels of
    net(x_t, t, y), target eps, x0 or v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022). Label
    dropout (y -> null_label) trains CFG's unconditional model. x0 (B, C, H, W); alphas_cumprod (T,)
    float64, on x0's device to spare a host sync per step (device_table).
    Returns (mse (B,), out (B, C_out, H, W) in float32, x_t, t)."""
    B, C = x0.shape[:2]
    t = torch.randint(0, len(alphas_cumprod), (B,), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    if y is not None and label_dropout > 0:
        drop = torch.rand(B, device=x0.device, generator=generator) < label_dropout
        y = torch.where(drop, torch.full_like(y, null_label), y)
    abar = alphas_cumprod[t.to(alphas_cumprod.device)]  # gathered in float64, then cast (as official)
    a, s = (append_dims(v.to(x0.device, x0.dtype), 4) for v in (abar.sqrt(), (1 - abar).sqrt()))
    x_t = a * x0 + s * eps
    out = net(x_t, t, y).float()
    target = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[pred]
    return (target - out[:, :C]).square().mean(dim=(1, 2, 3)), out, x_t, t


@dataclasses.dataclass
class DiffusionNet:
    """A trained network as sampling and evaluation see it (each script builds one from its model)."""
    net: nn.Module                   # net(x_t (B, C, H, W), t (B,), y (B,) or None) -> (B, C or 2C, H, W)
    alphas_cumprod: torch.Tensor     # (T,) float64 table of its training schedule
    img_size: int
    pred: str = "eps"                # what the first C output channels predict: eps | x0 | v
    learned_sigma: bool = False      # C more output channels: the improved-DDPM variance interpolation
    num_classes: int = 0             # 0: unconditional
    null_label: Optional[int] = None  # the "no class" label of classifier-free guidance, if trained with one
    class_names: Optional[list] = None
    defaults: dict = dataclasses.field(default_factory=dict)  # the run's grid settings (SAMPLE_SETTINGS)
    in_channels: int = 3

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def balanced_labels(n: int, num_classes: int, cls: Optional[int] = None) -> Optional[torch.Tensor]:
    """(n,) labels sorted by class, each n // K or n // K + 1 times (the first classes get the extra ones);
    all `cls` when given; None for an unconditional model."""
    if not num_classes:
        return None
    return torch.full((n,), cls) if cls is not None else torch.arange(n) * num_classes // n


def run_default(model: DiffusionNet, key: str, value, fallback):
    """A flag's value, or (None) the run's own from model.defaults, or fallback for a model without one."""
    return value if value is not None else model.defaults.get(key, fallback)


def settings_of(model: DiffusionNet, **given) -> dict:
    """The sampler settings to use: each given value, or (None) the run's own from model.defaults.
    Guidance needs the model's null label."""
    opts = {k: run_default(model, k, given.get(k), None) for k in SAMPLE_SETTINGS}
    if opts["guidance"] and model.null_label is None:
        raise ValueError("--guidance needs a class-conditional model trained with label dropout "
                         "(a null label)")
    return opts


@torch.no_grad()
def sample_images(model: DiffusionNet, n: int, labels: Optional[torch.Tensor] = None, *, sampler=None,
                  steps=None, guidance=None, clip=None, eta: float = 0.0, variance: Optional[str] = None,
                  generator: Optional[torch.Generator] = None, batch_size: int = 256):
    """n images (n, C, H, W) in [-1, 1] on the CPU, their labels (balanced_labels by default; None when
    unconditional) and the network calls. Settings left at None are the run's own (settings_of), so Python,
    the sample command and the evaluate command draw the same pictures by default."""
    opts = settings_of(model, sampler=sampler, steps=steps, guidance=guidance, clip=clip)
    labels = balanced_labels(n, model.num_classes) if labels is None and model.num_classes else labels
    if labels is not None and (int(labels.min()) < 0 or int(labels.max()) >= model.num_classes):
        raise ValueError(f"--class must be in 0..{model.num_classes - 1}, got {labels.unique().tolist()}")
    extra = {"variance": variance} if variance is not None else {}
    was_training = model.net.training
    model.net.eval()
    xs, nfe, device = [], 0, model.device
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        noise = torch.randn((m, model.in_channels, model.img_size, model.img_size), generator=generator,
                            device=device)
        y = labels[i:i + m].to(device) if labels is not None else None
        has_null = y is not None and model.null_label is not None
        y_null = torch.full_like(y, model.null_label) if has_null else None
        x, k = sample(model.net, noise, model.alphas_cumprod, sampler=opts["sampler"], steps=opts["steps"],
                      pred=model.pred, y=y, y_null=y_null, guidance=opts["guidance"], generator=generator,
                      learned_sigma=model.learned_sigma, clip=opts["clip"],
                      eta=eta if opts["sampler"] == "ddim" else 0.0, **extra)
        xs.append(x.cpu())
        nfe += k
    model.net.train(was_training)
    return torch.cat(xs), labels, nfe


def describe_settings(opts: dict) -> str:
    return (f"sampler {opts['sampler']}, {opts['steps']} steps, guidance {opts['guidance']}, "
            f"clip {'on' if opts['clip'] else 'off'}")


def save_samples(model: DiffusionNet, path, n: int, generator: torch.Generator, cls: Optional[int] = None,
                 **settings) -> int:
    """The picture of a run: n samples, one block of rows per class (named), upscaled to >= 64 px tiles.
    Returns the network calls."""
    x, y, nfe = sample_images(model, n, balanced_labels(n, model.num_classes, cls), generator=generator,
                              **settings)
    save_image_grid(x, path, labels=y, class_names=model.class_names, scale=max(1, 64 // model.img_size))
    return nfe


def evaluate_model(model: DiffusionNet, n: int, seed: int, cache_dir="data", batch_size: int = 250,
                   **settings) -> dict:
    """Sample n class-balanced images and score them against real `shapes` (shapes-FD, accuracy, P/R)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    x, y, _ = sample_images(model, n, generator=g, batch_size=batch_size, **settings)
    return evaluate_samples(to_uint8(x), y, cache_dir)


def check_evaluable(dataset: str, img_size: int, n: int, what: str = "evaluate",
                    flag_name: str = "--n") -> None:
    """Before any sampling: evaluation scores `shapes` images of 8, 16 or 32 px, with more samples than
    the k = 3 nearest neighbours of precision/recall."""
    if dataset != "shapes" or img_size not in (8, 16, 32):
        raise ValueError(f"{what} scores samples with the shapes classifier: it needs a model trained on "
                         "--dataset shapes at --img-size 32, 16 or 8 (for CIFAR-10 FID write samples with "
                         "--npz and use the ADM evaluator)")
    if n < 10:
        raise ValueError(f"{flag_name} {n}: {what} needs at least 10 samples (k-NN precision/recall, FD)")


def config_from_dict(cls, saved: dict, aliases: Optional[dict] = None):
    """The one checkpoint-to-config path: a config dataclass from a saved dict, with old field names renamed
    (aliases) and fields added since then at their defaults; an unknown name means another kind of file."""
    saved = {(aliases or {}).get(k, k): v for k, v in saved.items()}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - set(names))
    if unknown:
        raise CheckpointError(f"checkpoint config has fields {cls.__name__} does not know: {unknown}")
    tuples = {n for n, f in names.items() if isinstance(f.default, tuple)}
    return cls(**{k: tuple(v) if k in tuples else v for k, v in saved.items()})


def load_run(path, kind: str, config_of, build, view, device="cpu", use_ema: bool = True):
    """A run (its folder or ckpt.pt) -> (view of the network with the EMA (or raw) weights, config,
    checkpoint). config_of(ckpt) -> config; build(cfg, num_classes) -> network; view(net, cfg, names)."""
    ckpt = load_checkpoint(checkpoint_file(path), kind)
    cfg = config_of(ckpt)
    net = build(cfg, ckpt["num_classes"])
    net.load_state_dict(ckpt["ema" if use_ema else "model"], strict=True)
    return view(net.to(device).eval(), cfg, ckpt.get("class_names")), cfg, ckpt


class Run:
    """What a training loop does around its steps: the run folder (new, or the one it resumes, shared over
    DDP ranks), config.json, progress lines, metrics.jsonl, and the gated grids, evaluations and
    checkpoints. `save_state(step)` -> the checkpoint dict; `model_view()` -> the EMA DiffusionNet."""

    def __init__(self, kind: str, cfg, total: int, dist: Dist, resume: Optional[str], load_config,
                 model_fields):
        self.kind, self.cfg, self.total, self.dist = kind, cfg, total, dist
        self.ckpt, self.start = None, 0
        if cfg.batch_size % dist.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} "
                             "DDP ranks")
        if resume:
            self.dir = run_folder(resume)
            self.ckpt = load_checkpoint(checkpoint_file(resume), kind)
            saved, self.start = load_config(self.ckpt), self.ckpt["step"]
            diff = [f"{flag(k)} {getattr(saved, k)} (checkpoint) vs {getattr(cfg, k)} (now)"
                    for k in model_fields if getattr(saved, k) != getattr(cfg, k)]
            if diff:
                raise CheckpointError("--resume: the run was trained with another model: " + "; ".join(diff))
            if total <= self.start:
                more = "it is finished" if total == self.start else f"--steps {total} is below it"
                raise ValueError(f"--resume {self.dir}: the run is at step {self.start} and {more}; give "
                                 f"--steps above {self.start} to train longer")
        elif dist.is_main:
            self.dir = make_run_dir(kind, cfg.dataset.replace("folder:", "folder-").replace("/", "_"))
        if dist.world_size > 1:  # every rank writes to rank 0's folder
            names = [str(self.dir) if dist.is_main else None]
            torch.distributed.broadcast_object_list(names, src=0)
            self.dir = Path(names[0])
        self.progress = Progress(total, unit="img", start_step=self.start)
        self.log = MetricsLog(self.dir) if dist.is_main else None
        if dist.is_main:
            text = json.dumps(dataclasses.asdict(cfg), indent=1)
            atomic_write(self.dir / "config.json", lambda f: f.write(text.encode()))

    def after_step(self, done: int, metrics: dict, save_state, model_view) -> None:
        cfg, last = self.cfg, done == self.total

        if done % cfg.log_every == 0 or last:
            metrics["loss"] = all_reduce_mean(metrics["loss"], self.dist)  # a collective: every rank calls it
            if self.dist.is_main:
                print(self.progress.line(done, metrics["loss"], cfg.batch_size), flush=True)
                self.log.log(step=done, **metrics)
        if not self.dist.is_main:
            return
        if cfg.eval_every and done % cfg.eval_every == 0:  # shapes only (checked by check_run_config)
            res = evaluate_model(model_view(), cfg.eval_n, cfg.seed, cfg.data_root)
            self.log.log(step=done, **{f"eval/{k}": v for k, v in res.items()})
            print(f"step {done} eval: " + " | ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)
        if done % cfg.log_every == 0 or last:
            self.draw_curves()
        if (cfg.sample_every and done % cfg.sample_every == 0) or last:
            model = model_view()
            g = torch.Generator(device=model.device).manual_seed(cfg.seed)
            save_samples(model, self.dir / f"samples_{done:07d}.png", cfg.sample_n, g)
        if done % cfg.ckpt_every == 0 or last:
            save_checkpoint(self.dir / "ckpt.pt", save_state(done))
        if last:
            print(f"done: {self.dir}/ckpt.pt, {self.dir}/samples_{done:07d}.png")

    def draw_curves(self) -> None:
        """curves.png from metrics.jsonl (a resumed run draws its whole history): the loss, and the
        sample-quality metrics of the evaluations, against training steps."""
        rows = [json.loads(line) for line in self.log.path.read_text().splitlines()]
        rows = [r for r in rows if "sample_sampler" not in r]  # not the rows of later `evaluate` commands
        panels = [("training loss", ["loss"]), ("shapes-FD (lower is better)", ["eval/shapes_fd"]),
                  ("class accuracy, precision, recall", ["eval/class_acc", "eval/precision", "eval/recall"])]
        panels = [{"title": title, "xlabel": "training step",
                   "series": {k.split("/")[-1]: [(r["step"], r[k]) for r in rows if k in r] for k in keys}}
                  for title, keys in panels[:3 if self.cfg.eval_every else 1]]
        save_curves(self.dir / "curves.png", panels, columns=3)



def sample_parser(prog: str, sources: dict) -> ArgumentParser:
    """The flags of the sample and evaluate commands. sources: {flag: help} of the required, mutually
    exclusive ways to name the model (--ckpt, ...). Sampler settings default to None: the run's own."""
    p = ArgumentParser(prog=prog, description="Sampler settings default to the run's own grid settings "
                                              "(stored in its checkpoint); flags override them.")
    group = p.add_mutually_exclusive_group(required=True)
    for name, text in sources.items():
        group.add_argument(name, help=text)
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="sampler (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG weight w: (1 + w) eps(x, y) - w eps(x, null) (default: the run's)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp every predicted x0 to [-1, 1] (default: the run's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--variance", default=None, choices=("small", "large", "learned"),
                   help="ddpm sampler: sigma^2 = beta_tilde (small), beta (large) or the model's own "
                        "(learned); default: learned for --learn-sigma models, else large")
    p.add_argument("--class", dest="cls", default=None,
                   help="draw only this class (a number or a class name)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=None, help="seed of the initial noise and of the sampler's "
                                                           "noise (default: the run's)")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampler call")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    return p


def parse_class(cls: Optional[str], model: DiffusionNet) -> Optional[int]:
    """--class as a number or a class name (before any work)."""
    if cls is None:
        return None
    if not model.num_classes:
        raise ValueError("--class needs a class-conditional model")
    names = [str(c) for c in (model.class_names or [])]
    if cls in names:
        return names.index(cls)
    if not cls.lstrip("-").isdigit() or not 0 <= int(cls) < model.num_classes:
        close = difflib.get_close_matches(cls, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f": {', '.join(names)}" if names else ""
        raise ValueError(f"--class {cls!r}: use 0..{model.num_classes - 1} or a class name" + hint)
    return int(cls)


def checked_settings(args, model: DiffusionNet) -> dict:
    """The sampler settings of a command line (flags over the run's own), checked before any work."""
    opts = settings_of(model, sampler=args.sampler, steps=args.steps, guidance=args.guidance, clip=args.clip)
    check_sampler_options(opts["sampler"], args.eta, args.variance)
    if opts["steps"] is None or opts["steps"] < 1:
        raise ValueError(f"--steps must be positive, got {opts['steps']}")
    if args.variance == "learned" and not model.learned_sigma:
        raise ValueError("--variance learned needs a model trained with --learn-sigma")
    return dict(opts, eta=args.eta, variance=args.variance)


def sample_command(args, load) -> None:
    """`sample`: a grid of --n images and optionally --npz samples. load(args) -> (DiffusionNet, run folder
    or None, step, dataset)."""
    check_ranges(args, positive=("n", "batch_size"), non_negative=("npz",))
    if args.out is not None:
        check_image_path(args.out)
    model, run_dir, _, _ = load(args)
    out = check_image_path(args.out or (run_dir or Path(".")) / "samples.png")
    cls, opts = parse_class(args.cls, model), checked_settings(args, model)
    n, seed = run_default(model, "n", args.n, 64), run_default(model, "seed", args.seed, 0)
    print(f"{describe_settings(opts)}, {n} images, seed {seed} (flags over the run's own settings)",
          flush=True)
    g = torch.Generator(device=model.device).manual_seed(seed)
    t0, existed = time.time(), out.exists()
    nfe = save_samples(model, out, n, g, cls, batch_size=args.batch_size, **opts)
    print(f"{n} samples, {nfe} network calls, {time.time() - t0:.1f} s -> {out}"
          + (" (replaced the file that was there)" if existed else ""))
    if args.npz:
        x, y, _ = sample_images(model, args.npz, balanced_labels(args.npz, model.num_classes, cls),
                                generator=g, batch_size=args.batch_size, **opts)
        path = save_npz(x, y, out.with_suffix(".npz"))
        print(f"{args.npz} samples -> {path} (arr_0 uint8 (N, H, W, 3), arr_1 labels if conditional)")


def evaluate_command(args, load) -> dict:
    """`evaluate`: score --n samples against real `shapes`, print a table, append it to metrics.jsonl."""
    check_ranges(args, positive=("n", "batch_size"))
    if args.cls is not None:
        raise ValueError("evaluate scores all classes; drop --class")
    model, run_dir, step, dataset = load(args)
    check_evaluable(dataset, model.img_size, args.n)
    opts = checked_settings(args, model)
    print(f"{describe_settings(opts)} (flags over the run's own settings)", flush=True)
    t0 = time.time()
    seed = run_default(model, "seed", args.seed, 0)
    res = evaluate_model(model, args.n, seed, args.cache_dir, args.batch_size, **opts)
    print(format_metrics_table([{"step": step, **opts, "n": args.n, **res}]))
    print(f"({time.time() - t0:.1f} s)")
    if run_dir is not None:
        MetricsLog(run_dir).log(step=step or 0, **{f"eval/{k}": v for k, v in res.items()}, n=args.n,
                                **{f"sample_{k}": v for k, v in opts.items()})
    return res


def diffusion_commands(prog: str, what: str, train, sources: dict, load) -> dict:
    """The sub-commands of ddpm.py and dit.py for dispatch: train (the script's own), sample, evaluate.
    sources: the flags naming a model (see sample_parser); load: see sample_command."""
    def sample(argv):
        p = sample_parser(f"{prog} sample", sources)
        p.add_argument("--n", type=int, default=None, help="images in the grid, one block of rows per class "
                                                            "(default: the run's grid size)")
        p.add_argument("--out", default=None, help="grid picture (default: RUN/samples.png)")
        p.add_argument("--npz", type=int, default=0,
                       help="also write N samples as uint8 NHWC arr_0 (ADM layout)")

        sample_command(p.parse_args(argv), load)

    def evaluate(argv):
        p = sample_parser(f"{prog} evaluate", sources)
        p.add_argument("--n", type=int, default=1000, help="samples to score")
        p.add_argument("--cache-dir", default="data", help="where the reference classifier is cached")
        return evaluate_command(p.parse_args(argv), load)

    return {"train": (train, f"train {what} (the default command)"),
            "sample": (sample, "draw a grid of samples from a checkpoint (and an .npz for FID)"),
            "evaluate": (evaluate, "score samples on `shapes`: FD, class accuracy, precision, recall")}
