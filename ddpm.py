"""ddpm.py — Denoising Diffusion Probabilistic Models, in one readable file.

Paper: Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
Official code: github.com/hojonathanho/diffusion (TensorFlow). Public weights: the diffusers port
`google/ddpm-cifar10-32` (a `UNet2DModel`), loadable here with `--from-diffusers`.

Idea: a fixed forward process adds Gaussian noise over T = 1000 steps,
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s),
and a U-Net learns to undo it by predicting the noise: L_simple = E_{t, x_0, eps} |eps - eps_theta(x_t, t)|^2
with t uniform. Sampling runs the learned reverse chain from x_T ~ N(0, I) (or any faster sampler from common.py).
The defaults are the paper's CIFAR-10 run: 35.7 M-parameter U-Net, linear beta 1e-4 -> 0.02, Adam 2e-4 with
5000 warm-up steps, batch 128, grad-norm clip 1, EMA 0.9999, horizontal flips, 800k steps.

Usage:
    python ddpm.py train --dataset cifar10                       # the paper's run (GPU; bf16: --bf16)
    torchrun --nproc_per_node 8 ddpm.py train --dataset cifar10  # the same on 8 GPUs (global batch 128)
    python ddpm.py train --preset tiny --dataset shapes          # CPU demo: a few minutes on 2 cores
    python ddpm.py train --preset tiny --dataset shapes --steps 20   # CPU smoke run: ~20 s
    python ddpm.py train --preset tiny --resume runs/ddpm-shapes-...  # continue a run exactly
    python ddpm.py sample --ckpt runs/ddpm-shapes-.../ckpt.pt --sampler ddim --steps 50 --n 64 --out grid.png
    python ddpm.py sample --from-diffusers diffusion_pytorch_model.safetensors --sampler ddpm --steps 1000
    python ddpm.py sample --ckpt RUN/ckpt.pt --n 50000 --npz 50000   # uint8 NHWC .npz for the ADM FID evaluator
    python ddpm.py evaluate --ckpt RUN/ckpt.pt --n 1000               # shapes FD / accuracy / precision / recall
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# =====================================================================================================
# config
# =====================================================================================================


@dataclass
class DDPMConfig:
    # data
    dataset: str = field(default="cifar10", metadata={"help": "cifar10 | shapes | folder:PATH"})
    img_size: int = field(default=32, metadata={"help": "image side; must be divisible by 2^(len(ch_mult)-1)"})
    data_root: str = field(default="data", metadata={"help": "where datasets are downloaded / cached"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips (paper: slightly better samples)"})
    # U-Net (paper CIFAR-10: 128, (1,2,2,2), 2 blocks, attention at 16x16, dropout 0.1)
    ch: int = field(default=128, metadata={"help": "base channel count of the U-Net"})
    ch_mult: tuple = field(default=(1, 2, 2, 2), metadata={"help": "channel multiplier per resolution"})
    num_res_blocks: int = field(default=2, metadata={"help": "residual blocks per resolution (down path)"})
    attn_res: tuple = field(default=(16,), metadata={"help": "resolutions that get self-attention"})
    dropout: float = field(default=0.1, metadata={"help": "dropout inside residual blocks"})
    norm_groups: int = field(default=32, metadata={"help": "GroupNorm groups (paper: 32)"})
    class_cond: bool = field(default=False, metadata={"help": "add a label embedding to the time embedding"})
    label_dropout: float = field(default=0.1, metadata={"help": "label -> null label rate (for CFG)"})
    # diffusion
    schedule: str = field(default="linear", metadata={"help": "beta schedule: linear | cosine"})
    timesteps: int = field(default=1000, metadata={"help": "number of diffusion steps T"})
    beta_start: float = field(default=1e-4, metadata={"help": "linear schedule beta_1"})
    beta_end: float = field(default=0.02, metadata={"help": "linear schedule beta_T"})
    pred: str = field(default="eps", metadata={"help": "network target: eps | x0 | v"})
    # optimisation
    steps: int = field(default=800_000, metadata={"help": "training steps (paper: 800k)"})
    batch_size: int = field(default=128, metadata={"help": "global batch size (split over DDP ranks)"})
    lr: float = field(default=2e-4, metadata={"help": "Adam learning rate"})
    warmup: int = field(default=5000, metadata={"help": "linear lr warm-up steps (official code)"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay of the sampling weights"})
    seed: int = field(default=0, metadata={"help": "seed of data order, init, noise and dropout"})
    # runtime
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the forward pass (GPU)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the U-Net"})
    # logging, checkpoints, samples, evaluation
    log_every: int = field(default=100, metadata={"help": "print/log loss every N steps"})
    ckpt_every: int = field(default=10_000, metadata={"help": "atomic checkpoint every N steps (and at the end)"})
    sample_every: int = field(default=10_000, metadata={"help": "EMA sample grid every N steps (0: only at end)"})
    sample_n: int = field(default=64, metadata={"help": "images in the sample grid"})
    sample_sampler: str = field(default="ddpm", metadata={"help": "sampler for in-training grids (ddpm: the "
                                                                 "paper's ancestral sampler, clips x0)"})
    sample_steps: int = field(default=100, metadata={"help": "sampler steps for in-training grids"})
    eval_every: int = field(default=0, metadata={"help": "shapes metrics every N steps (0: off)"})
    eval_n: int = field(default=500, metadata={"help": "samples per in-training evaluation"})


PRESETS = {
    # Ho et al. (2020) CIFAR-10: exactly the defaults above.
    "cifar10": DDPMConfig(),
    # Small U-Net that learns `shapes` on 2 CPU cores in ~4-5 minutes (`make demo`): 16 px (shapes are drawn natively
    # at that size; 16 -> 8 -> 4, attention at 4x4) and class-conditional, so the final grid (10x10, label = column)
    # shows recognisable shapes after ~2000 steps. EMA 0.995: a ~200-step window, short enough for a short run.
    "tiny": DDPMConfig(dataset="shapes", img_size=16, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_res=(4,),
                       dropout=0.0, norm_groups=8, class_cond=True, steps=2000, batch_size=32, lr=2e-3, warmup=50,
                       ema_decay=0.995, log_every=100, ckpt_every=1000, sample_every=0, sample_n=100, eval_every=0,
                       eval_n=500),
}

# Which fields define the network and the diffusion: a checkpoint only fits a config that agrees on them.
MODEL_FIELDS = ("img_size", "ch", "ch_mult", "num_res_blocks", "attn_res", "norm_groups", "class_cond",
                "schedule", "timesteps", "beta_start", "beta_end", "pred", "dataset")

GN_EPS = 1e-6          # GroupNorm epsilon of the official code (diffusers default 1e-5 would differ)
MAX_PERIOD = 10_000    # sinusoidal embedding period (Transformer, Vaswani et al. 2017)


def check_config(cfg: DDPMConfig) -> None:
    """Raise a ValueError naming the flag for every invalid value, before any work is done."""
    if not (cfg.dataset in ("cifar10", "shapes") or cfg.dataset.startswith("folder:")):
        raise ValueError(f"--dataset {cfg.dataset!r} is unknown; use cifar10, shapes or folder:PATH")
    common.check_ranges(cfg, positive=("img_size", "ch", "num_res_blocks", "norm_groups", "timesteps", "steps",
                                       "batch_size", "lr", "grad_clip", "log_every", "ckpt_every", "sample_n",
                                       "sample_steps", "eval_n"),
                        non_negative=("warmup", "sample_every", "eval_every"), unit=("ema_decay",),
                        rate=("dropout", "label_dropout"))
    if not cfg.ch_mult or min(cfg.ch_mult) <= 0:
        raise ValueError(f"--ch-mult needs positive multipliers, got {' '.join(map(str, cfg.ch_mult))}")
    if cfg.schedule == "linear":
        common.check_linear_betas(cfg.beta_start, cfg.beta_end)
    down = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.img_size % down:
        raise ValueError(f"--img-size {cfg.img_size} must be divisible by {down} = 2^(len(--ch-mult)-1) "
                         f"for --ch-mult {' '.join(map(str, cfg.ch_mult))}")
    for c in sorted({cfg.ch * m for m in cfg.ch_mult}):
        if c % cfg.norm_groups:
            raise ValueError(f"--norm-groups {cfg.norm_groups} must divide every U-Net width (got {c})")
    if cfg.schedule not in ("linear", "cosine"):
        raise ValueError(f"--schedule {cfg.schedule!r}: use linear or cosine")
    if cfg.pred not in ("eps", "x0", "v"):
        raise ValueError(f"--pred {cfg.pred!r}: use eps, x0 or v")
    if cfg.eval_every and (cfg.dataset != "shapes" or cfg.img_size not in (8, 16, 32)):
        raise ValueError("--eval-every scores samples with the shapes classifier: it needs --dataset shapes and "
                         "--img-size 32, 16 or 8 (use --npz and the ADM evaluator for CIFAR-10 FID)")
    if cfg.sample_sampler not in SAMPLERS:
        raise ValueError(f"--sample-sampler {cfg.sample_sampler!r}: use one of {', '.join(SAMPLERS)}")


SAMPLERS = common.SAMPLERS  # what common.sample implements (it checks the name, too)

# =====================================================================================================
# U-Net blocks (module names follow diffusers' UNet2DModel so the public weights load by name)
# =====================================================================================================


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [sin(t f) | cos(t f)], f_i = 10000^(-i / (dim/2 - 1)) (official code; sin first).
    t: (B,) float timesteps (fractional allowed). Built in float32, as the official code does."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


class TimestepMLP(nn.Module):
    """Linear(ch -> 4ch), SiLU, Linear(4ch -> 4ch) on the sinusoidal embedding."""

    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.linear_1 = nn.Linear(ch, temb_ch)
        self.linear_2 = nn.Linear(temb_ch, temb_ch)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResBlock(nn.Module):
    """h = conv1(SiLU(GN(x))) + W SiLU(e);  out = skip(x) + conv2(Dropout(SiLU(GN(h)))).  x: (B, cin, H, W)."""

    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=GN_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=GN_EPS)
        self.dropout = dropout
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # 1x1 conv on the skip path only when the width changes (official "nin_shortcut").
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """temb_act: SiLU(time embedding), (B, temb_ch), computed once per U-Net call."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = F.dropout(F.silu(self.norm2(h)), self.dropout, self.training)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + self.conv2(h)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual: x + proj(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=GN_EPS)
        self.qkv = nn.Linear(ch, 3 * ch)  # = diffusers to_q, to_k, to_v stacked along the output dim
        self.proj_out = nn.Linear(ch, ch)  # = diffusers to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, L, C), token = y*W + x
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)       # each (B, 1, L, C): one head of width C
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)    # (B, L, C), scale 1/sqrt(C)
        h = self.proj_out(h).transpose(1, 2)                      # (B, C, L)
        return (x.view(B, C, H * W) + h).view(B, C, H, W)


class Downsample(nn.Module):
    """3x3 conv with stride 2 after zero-padding right and bottom by one (TF 'SAME'; torch padding=1 differs)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (official)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class DownBlock(nn.Module):
    """One resolution of the encoder: resnets[i] (+ attentions[i]), then an optional downsampler."""

    def __init__(self, resnets, attentions, downsample: bool):
        super().__init__()
        self.resnets, self.attentions = nn.ModuleList(resnets), nn.ModuleList(attentions)
        self.downsamplers = nn.ModuleList([Downsample(resnets[-1].conv2.out_channels)] if downsample else [])


class UpBlock(nn.Module):
    """One resolution of the decoder: resnets[i] on [h, skip] (+ attentions[i]), then an optional upsampler."""

    def __init__(self, resnets, attentions, upsample: bool):
        super().__init__()
        self.resnets, self.attentions = nn.ModuleList(resnets), nn.ModuleList(attentions)
        self.upsamplers = nn.ModuleList([Upsample(resnets[-1].conv2.out_channels)] if upsample else [])


class MidBlock(nn.Module):
    """ResBlock -> Attention -> ResBlock at the lowest resolution."""

    def __init__(self, ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, temb_ch, dropout, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(ch, groups)])


# =====================================================================================================
# U-Net
# =====================================================================================================


class UNet(nn.Module):
    """The DDPM U-Net (PixelCNN++-like, GroupNorm, attention at chosen resolutions).

    Defaults = the paper's CIFAR-10 model: 35,746,307 parameters (35.7 M in the paper)."""

    def __init__(self, img_size: int = 32, in_ch: int = 3, ch: int = 128, ch_mult=(1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_res=(16,), dropout: float = 0.1, norm_groups: int = 32,
                 num_classes: int = 0):
        super().__init__()
        temb_ch = 4 * ch
        self.ch, self.in_ch, self.num_classes = ch, in_ch, num_classes
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.time_embedding = TimestepMLP(ch, temb_ch)
        # Class conditioning: an embedding added to the time embedding; index num_classes is the null label (CFG).
        self.class_embedding = nn.Embedding(num_classes + 1, temb_ch) if num_classes else None

        # Encoder: record the width of every tensor pushed on the skip stack.
        skip_ch, cur, res = [ch], ch, img_size
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            resnets, attns = [], []
            for _ in range(num_res_blocks):
                resnets.append(ResBlock(cur, ch * mult, temb_ch, dropout, norm_groups))
                cur = ch * mult
                if res in attn_res:
                    attns.append(Attention(cur, norm_groups))
                skip_ch.append(cur)
            last = level == len(ch_mult) - 1
            self.down_blocks.append(DownBlock(resnets, attns, downsample=not last))
            if not last:
                skip_ch.append(cur)
                res //= 2
        self.mid_block = MidBlock(cur, temb_ch, dropout, norm_groups)
        # Decoder (lowest resolution first): num_res_blocks + 1 blocks per level, each eats one skip.
        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            resnets, attns = [], []
            for _ in range(num_res_blocks + 1):
                resnets.append(ResBlock(cur + skip_ch.pop(), ch * mult, temb_ch, dropout, norm_groups))
                cur = ch * mult
                if res in attn_res:
                    attns.append(Attention(cur, norm_groups))
            self.up_blocks.append(UpBlock(resnets, attns, upsample=level != 0))
            res *= 2 if level != 0 else 1
        self.conv_norm_out = nn.GroupNorm(norm_groups, cur, eps=GN_EPS)
        self.conv_out = nn.Conv2d(cur, in_ch, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Official code: every conv/dense weight Glorot-uniform (fans include the kernel area), biases 0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Layers that end a residual branch (and the output conv) start near zero: variance scale 1e-10,
        # i.e. gain sqrt(1e-10), so each block starts close to the identity.
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.xavier_uniform_(m.conv2.weight, gain=1e-5)
            if isinstance(m, Attention):
                nn.init.xavier_uniform_(m.proj_out.weight, gain=1e-5)
        nn.init.xavier_uniform_(self.conv_out.weight, gain=1e-5)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) timesteps in [0, T-1] (float ok); y: (B,) labels or None.
        Returns (B, C, H, W): the eps / x0 / v prediction."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embedding(timestep_embedding(t, self.ch).to(self.conv_in.weight.dtype))  # (B, 4ch)
        if self.class_embedding is not None:
            assert y is not None, "class-conditional UNet needs labels y (use num_classes for the null label)"
            emb = emb + self.class_embedding(y)
        temb_act = F.silu(emb)  # every ResBlock applies SiLU before its projection: do it once

        h = self.conv_in(x)
        hs = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, temb_act)
                if len(block.attentions):
                    h = block.attentions[i](h)
                hs.append(h)
            for down in block.downsamplers:
                h = down(h)
                hs.append(h)
        mid = self.mid_block
        h = mid.resnets[1](mid.attentions[0](mid.resnets[0](h, temb_act)), temb_act)
        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, hs.pop()], dim=1), temb_act)  # order [current, skip]
                if len(block.attentions):
                    h = block.attentions[i](h)
            for up in block.upsamplers:
                h = up(h)
        assert not hs, f"{len(hs)} skip tensors left over"
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# =====================================================================================================
# DDPM: U-Net + noise schedule; training loss and sampling
# =====================================================================================================


class DDPM(nn.Module):
    """Holds the U-Net and the schedule. `model(x0, y)` / `model.loss(x0, y)` is the training loss;
    `model.sample(n, sampler=..., steps=...)` draws images in [-1, 1]."""

    def __init__(self, cfg: DDPMConfig, num_classes: int = 0):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.num_classes = num_classes if cfg.class_cond else 0
        if cfg.class_cond and num_classes <= 0:
            raise ValueError("--class-cond needs a labelled dataset (num_classes > 0)")
        self.net = UNet(cfg.img_size, 3, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.dropout,
                        cfg.norm_groups, self.num_classes)
        # float64 table on the CPU (MPS has no float64); a pure function of the config, so never checkpointed.
        self.alphas_cumprod = common.make_alphas_cumprod(cfg.schedule, cfg.timesteps, cfg.beta_start,
                                                         cfg.beta_end).to(torch.float64).cpu()

    @property
    def device(self) -> torch.device:
        return self.net.conv_in.weight.device

    def forward(self, x0: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L_simple: mean over batch and pixels of (target - net(x_t, t))^2 with t ~ U{0..T-1}. x0: (B, C, H, W)."""
        B = x0.shape[0]
        t = torch.randint(0, self.cfg.timesteps, (B,), device=x0.device)
        eps = torch.randn_like(x0)
        abar = self.alphas_cumprod[t.cpu()].float().to(x0.device)[:, None, None, None]  # float64 -> float32
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x_t = a * x0 + s * eps  # q(x_t | x_0)
        if self.num_classes:
            # Label dropout: the null label num_classes trains the unconditional model used by CFG.
            drop = torch.rand(B, device=x0.device) < self.cfg.label_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        out = self.net(x_t, t.float(), y if self.num_classes else None)
        target = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.cfg.pred]  # v: Salimans & Ho (2022)
        return F.mse_loss(out.float(), target)

    loss = forward

    @torch.no_grad()
    def sample(self, n: int, sampler: str = "ddim", steps: int = 50, y: Optional[torch.Tensor] = None,
               guidance: float = 0.0, generator: Optional[torch.Generator] = None, **sampler_options):
        """Draw n images (n, C, H, W) in [-1, 1]. Returns (images, nfe). Class-conditional models take labels y
        (default: 0, 1, 2, ... cycling); guidance w gives eps = (1+w) eps(x, y) - w eps(x, null)."""
        if guidance and not self.num_classes:
            raise ValueError("--guidance needs a class-conditional model (train with --class-cond)")
        device = self.device
        shape = (n, self.net.in_ch, self.cfg.img_size, self.cfg.img_size)
        noise = torch.randn(shape, generator=generator, device=device)
        y_null = None
        if self.num_classes:
            y = torch.arange(n, device=device) % self.num_classes if y is None else y.to(device)
            y_null = torch.full_like(y, self.num_classes)
        return common.sample(self.net, noise, self.alphas_cumprod, sampler=sampler, steps=steps, pred=self.cfg.pred,
                             y=y, y_null=y_null, guidance=guidance, generator=generator, **sampler_options)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# =====================================================================================================
# loading the diffusers port of the paper's weights (google/ddpm-cifar10-32, UNet2DModel)
# =====================================================================================================

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path) -> dict:
    """Minimal safetensors reader: 8-byte little-endian header size, a JSON header, then raw tensor bytes."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        buf = bytearray(data[8 + n + begin: 8 + n + end])
        out[name] = torch.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"]).clone()
    return out


WANT_DIFFUSERS = "want diffusion_pytorch_model.safetensors or .bin from the google/ddpm-cifar10-32 repository"


def load_state_dict_file(path) -> dict:
    path = Path(path)
    if path.suffix != ".safetensors":
        return common.torch_load(path, want=WANT_DIFFUSERS)
    if not path.is_file():
        raise common.CheckpointError(f"no checkpoint file at {path}; {WANT_DIFFUSERS}")
    try:
        return read_safetensors(path)
    except Exception as e:  # truncated or foreign bytes fail in many ways (struct, json, dtype, reshape)
        raise common.CheckpointError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}); "
                                     f"{WANT_DIFFUSERS}") from e


def convert_diffusers(sd: dict) -> dict:
    """diffusers UNet2DModel state dict -> UNet state dict. All names agree except the attention projections:
    to_q/to_k/to_v (older uploads: query/key/value) stack into `qkv`; to_out.0 (older: proj_attn) is `proj_out`."""
    rename = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    sd = dict(sd)
    for k in list(sd):
        prefix, _, rest = k.partition(".attentions.")
        if rest:
            idx, name, param = rest.split(".", 1)[0], *rest.split(".", 1)[1].rsplit(".", 1)
            if name in rename:
                sd[f"{prefix}.attentions.{idx}.{rename[name]}.{param}"] = sd.pop(k)
    out = {}
    for k, v in sd.items():
        if ".to_q." in k:
            base, param = k.split(".to_q.")
            out[f"{base}.qkv.{param}"] = torch.cat([v, sd[f"{base}.to_k.{param}"], sd[f"{base}.to_v.{param}"]], 0)
        elif ".to_k." in k or ".to_v." in k:
            continue
        else:
            out[k.replace(".to_out.0.", ".proj_out.")] = v
    return out


def load_diffusers_into(model: DDPM, path) -> None:
    sd = load_state_dict_file(path)
    try:
        model.net.load_state_dict(convert_diffusers(sd), strict=True)
    except (KeyError, ValueError, RuntimeError) as e:  # another model's weights: missing keys or other shapes
        raise common.CheckpointError(f"--from-diffusers {path}: not the paper's CIFAR-10 UNet2DModel "
                                     f"({common.one_line(e)}); {WANT_DIFFUSERS}") from e


# =====================================================================================================
# checkpoints
# =====================================================================================================


def config_from_checkpoint(ckpt: dict) -> DDPMConfig:
    names = {f.name for f in dataclasses.fields(DDPMConfig)}
    saved = ckpt["config"]
    if set(saved) != names:
        raise common.CheckpointError(f"checkpoint config does not match DDPMConfig (unknown: "
                                     f"{sorted(set(saved) - names)}, missing: {sorted(names - set(saved))})")
    tuples = {f.name for f in dataclasses.fields(DDPMConfig) if isinstance(f.default, tuple)}
    return DDPMConfig(**{k: tuple(v) if k in tuples else v for k, v in saved.items()})


def check_same_model(cfg: DDPMConfig, saved: DDPMConfig) -> None:
    diff = [f"{common.flag(k)} {getattr(saved, k)} (checkpoint) vs {getattr(cfg, k)} (now)"
            for k in MODEL_FIELDS if tuple_or(getattr(cfg, k)) != tuple_or(getattr(saved, k))]
    if diff:
        raise common.CheckpointError("checkpoint was trained with another config: " + "; ".join(diff))


def tuple_or(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def load_model(ckpt_path, device, use_ema: bool = True):
    """Rebuild a DDPM from a ddpm.py checkpoint (a run folder or its ckpt.pt). Returns (model, cfg, ckpt)."""
    path = Path(ckpt_path)
    path = path / "ckpt.pt" if path.is_dir() else path
    ckpt = common.load_checkpoint(path, kind="ddpm")
    cfg = config_from_checkpoint(ckpt)
    model = DDPM(cfg, ckpt.get("num_classes", 0))
    model.net.load_state_dict(ckpt["ema" if use_ema else "model"], strict=True)
    return model.to(device).eval(), cfg, ckpt


# =====================================================================================================
# training
# =====================================================================================================


def train_step(model: DDPM, opt: torch.optim.Optimizer, x: torch.Tensor, y, cfg: DDPMConfig, step: int,
               ddp_model: Optional[nn.Module] = None, device=None) -> dict:
    """One optimizer step: warm-up lr -> loss -> backward -> clip -> Adam. Returns metrics."""
    # Official code: lr = 2e-4 * min(step / 5000, 1) with the step count *before* the update (first lr is 0).
    lr = cfg.lr * min(step / cfg.warmup, 1.0) if cfg.warmup else cfg.lr
    for g in opt.param_groups:
        g["lr"] = lr
    with common.autocast(device or x.device, cfg.bf16):
        loss = (ddp_model or model)(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # The TPU code clipped each replica's gradient before averaging; DDP averages first (same for 1 GPU).
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def save_samples(ema: DDPM, cfg: DDPMConfig, path, seed: int) -> None:
    g = torch.Generator(device=ema.device).manual_seed(seed)
    x, _ = ema.sample(cfg.sample_n, sampler=cfg.sample_sampler, steps=cfg.sample_steps, generator=g)
    common.save_image_grid(x.cpu(), path)


def evaluate_model(ema: DDPM, n: int, sampler: str, steps: int, guidance: float, seed: int, batch: int = 250,
                   cache_dir: str = "data") -> dict:
    """Sample n images (labels cycling through the classes when conditional) and score them with common.py."""
    g = torch.Generator(device=ema.device).manual_seed(seed)
    images, labels = [], []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        y = (torch.arange(i, i + m) % ema.num_classes) if ema.num_classes else None
        x, _ = ema.sample(m, sampler=sampler, steps=steps, y=y, guidance=guidance, generator=g)
        images.append(common.to_uint8(x.cpu()))
        labels.append(y)
    fake = torch.cat(images)
    return common.evaluate_samples(fake, torch.cat(labels) if ema.num_classes else None, cache_dir)


def train(cfg: DDPMConfig, resume: Optional[str] = None) -> Path:
    check_config(cfg)
    dist = common.setup_ddp(cfg.device)
    device = dist.device
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} DDP ranks")
    ckpt = None
    if resume:
        run_dir = Path(resume)
        ckpt = common.load_checkpoint(run_dir / "ckpt.pt", kind="ddpm")
        check_same_model(cfg, config_from_checkpoint(ckpt))
    data = common.load_dataset(cfg.dataset, root=cfg.data_root, image_size=cfg.img_size)
    if cfg.class_cond and not data.num_classes:
        raise ValueError(f"--class-cond needs labels, but dataset {cfg.dataset!r} has none")

    common.seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = DDPM(cfg, data.num_classes).to(device)
    ema = common.make_ema(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, **common.fused_adam(device))  # betas, eps: TF1 defaults
    start = 0
    if ckpt is not None:
        model.net.load_state_dict(ckpt["model"])
        ema.net.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        common.set_rng_state(ckpt["rng"])
    elif dist.is_main:
        run_dir = common.make_run_dir("ddpm", cfg.dataset.replace("folder:", "folder-").replace("/", "_"))
    if dist.world_size > 1:  # every rank writes to rank 0's folder
        names = [str(run_dir) if dist.is_main else None]
        torch.distributed.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    common.maybe_compile(model.net, cfg.compile)  # in place: state_dict names are unchanged
    ddp_model = common.wrap_ddp(model, dist)
    log = common.MetricsLog(run_dir) if dist.is_main else None
    if dist.is_main:
        print(f"DDPM U-Net: {num_params(model.net):,} parameters | {cfg.dataset}: {len(data.images)} images | "
              f"device {device} x {dist.world_size} | run {run_dir}")
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    def checkpoint(step):
        common.save_checkpoint(run_dir / "ckpt.pt", {
            "kind": "ddpm", "config": dataclasses.asdict(cfg), "num_classes": model.num_classes,
            "model": model.net.state_dict(), "ema": ema.net.state_dict(), "opt": opt.state_dict(),
            "step": step, "rng": common.rng_state()})

    progress = common.Progress(cfg.steps, unit="img", start_step=start)
    per_rank = cfg.batch_size // dist.world_size
    model.train()
    for step in range(start, cfg.steps):
        x, y = common.get_batch(data, step, per_rank, cfg.seed, flip=cfg.flip, rank=dist.rank,
                                world_size=dist.world_size)
        x, y = x.to(device), (y.to(device) if y is not None and cfg.class_cond else None)
        # t, noise, dropout and label dropout come from the global RNG, re-seeded from (seed, rank, step):
        # every rank draws its own noise, and a resumed run draws exactly what an uninterrupted one would.
        torch.manual_seed(step_seed(cfg.seed, dist.rank, step))
        metrics = train_step(model, opt, x, y, cfg, step, ddp_model, device)
        common.ema_update(ema, model, cfg.ema_decay)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics["loss"] = common.all_reduce_mean(metrics["loss"], dist)  # a collective: every rank calls it
            if dist.is_main:
                print(progress.line(done, metrics["loss"], cfg.batch_size), flush=True)
                log.log(step=done, **metrics)
        if dist.is_main and cfg.sample_every and done % cfg.sample_every == 0:
            save_samples(ema, cfg, run_dir / f"samples_{done:07d}.png", cfg.seed)
        if dist.is_main and cfg.eval_every and done % cfg.eval_every == 0:  # shapes only (check_config)
            res = evaluate_model(ema, cfg.eval_n, cfg.sample_sampler, cfg.sample_steps, 0.0, cfg.seed,
                                 cache_dir=cfg.data_root)
            log.log(step=done, **{f"eval/{k}": v for k, v in res.items()})
            print(f"step {done} eval: " + " | ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)
        if dist.is_main and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            checkpoint(done)
    if dist.is_main:
        save_samples(ema, cfg, run_dir / f"samples_{cfg.steps:07d}.png", cfg.seed)
        print(f"done: {run_dir}/ckpt.pt, {run_dir}/samples_{cfg.steps:07d}.png")
    common.cleanup_ddp()
    return run_dir


# =====================================================================================================
# command line
# =====================================================================================================


def parse_train_args(argv) -> tuple[DDPMConfig, Optional[str]]:
    """Flags default to the chosen preset (or, with --resume, to the run's saved config)."""
    pre = common.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cifar10")
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset not in PRESETS:
        raise ValueError(f"--preset {known.preset!r}: use one of {', '.join(PRESETS)}")
    base = PRESETS[known.preset]
    if known.resume:  # the run's config becomes the default; flags that change the model are refused
        base = config_from_checkpoint(common.load_checkpoint(Path(known.resume) / "ckpt.pt", kind="ddpm"))
    parser = common.ArgumentParser(prog="ddpm.py train", description="Train a DDPM.")
    parser.add_argument("--preset", default="cifar10", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--resume", default=None, help="run folder to continue exactly")
    common.add_config_args(parser, base)
    cfg = common.config_from_args(base, parser.parse_args(argv))
    cfg = dataclasses.replace(cfg, ch_mult=tuple(cfg.ch_mult), attn_res=tuple(cfg.attn_res))
    check_config(cfg)
    return cfg, known.resume


def sample_parser(prog: str) -> argparse.ArgumentParser:
    p = common.ArgumentParser(prog=prog)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="ddpm.py checkpoint (RUN/ckpt.pt or RUN)")
    src.add_argument("--from-diffusers", help="google/ddpm-cifar10-32 UNet2DModel weights (.safetensors/.bin)")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=1000, help="sampler steps (network evaluations for ddpm/ddim)")
    p.add_argument("--guidance", type=float, default=0.0, help="CFG weight w (class-conditional models only)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--variance", default=None, choices=("small", "large"),
                   help="ddpm sampler: sigma^2 = beta_tilde (small) or beta (large; the default, as officially)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp every predicted x0 to [-1, 1] (default: the ddpm sampler clips, as the official "
                        "code; the others do not)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    return p


def load_for_sampling(args, device):
    if args.from_diffusers:
        model, ckpt, run_dir = DDPM(PRESETS["cifar10"]).to(device), None, None
        load_diffusers_into(model, args.from_diffusers)
        model.eval()
    else:
        model, _, ckpt = load_model(args.ckpt, device, use_ema=not args.no_ema)
        run_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    if args.guidance and not model.num_classes:  # fail before any sampling work
        raise ValueError("--guidance needs a class-conditional model (train with --class-cond)")
    return model, ckpt, run_dir


def draw(model: DDPM, args, n: int, g: torch.Generator):
    """n images in batches. Returns (float images in [-1, 1] on cpu, labels or None, total NFE)."""
    opts = common.sampler_kwargs(args)
    if args.sampler == "ddpm":  # sigma^2 = beta: the official CIFAR-10 sampling (fixedlarge)
        opts.setdefault("variance", "large")
    xs, ys, nfe = [], [], 0
    for i in range(0, n, args.batch_size):
        m = min(args.batch_size, n - i)
        y = (torch.arange(i, i + m) % model.num_classes) if model.num_classes else None
        x, k = model.sample(m, sampler=args.sampler, steps=args.steps, y=y, guidance=args.guidance, generator=g,
                            **opts)
        xs.append(x.cpu()), ys.append(y)
        nfe += k
    return torch.cat(xs), (torch.cat(ys) if model.num_classes else None), nfe


def cmd_sample(argv) -> None:
    p = sample_parser("ddpm.py sample")
    p.add_argument("--n", type=int, default=64, help="images in the grid")
    p.add_argument("--out", default="samples.png", help="grid PNG path")
    p.add_argument("--npz", type=int, default=0, help="also write N samples as uint8 NHWC arr_0 (ADM layout)")
    args = p.parse_args(argv)
    common.check_ranges(args, positive=("n", "batch_size"), non_negative=("npz",))
    device = common.pick_device(args.device)
    model, _, _ = load_for_sampling(args, device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.time()
    x, _, nfe = draw(model, args, args.n, g)
    common.save_image_grid(x, args.out)
    print(f"{args.n} samples, {args.sampler} {args.steps} steps, {nfe} network calls, {time.time() - t0:.1f} s "
          f"-> {args.out}")
    if args.npz:
        x, y, _ = draw(model, args, args.npz, g)
        path = common.save_npz(x, y, Path(args.out).with_suffix(".npz"))
        print(f"{args.npz} samples -> {path} (arr_0 uint8 (N, H, W, 3), arr_1 labels if conditional)")


def cmd_evaluate(argv) -> None:
    p = sample_parser("ddpm.py evaluate")
    p.set_defaults(sampler="ddim", steps=50)
    p.add_argument("--n", type=int, default=1000, help="samples to score")
    p.add_argument("--cache-dir", default="data", help="where the reference classifier is cached")
    args = p.parse_args(argv)
    common.check_ranges(args, positive=("n", "batch_size"))
    device = common.pick_device(args.device)
    model, ckpt, run_dir = load_for_sampling(args, device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    x, y, nfe = draw(model, args, args.n, g)
    res = common.evaluate_samples(common.to_uint8(x), y, args.cache_dir)
    print(f"{'metric':<12} value   ({args.n} samples, {args.sampler} {args.steps} steps, guidance {args.guidance})")
    for k, v in res.items():
        print(f"{k:<12} {v:.4f}")
    if run_dir is not None:
        common.MetricsLog(run_dir).log(step=ckpt["step"], **{f"eval/{k}": v for k, v in res.items()},
                                       sampler=args.sampler, sampler_steps=args.steps, n=args.n)


COMMANDS = {"train": (lambda argv: train(*parse_train_args(argv)), "train a DDPM (the default command)"),
            "sample": (lambda argv: cmd_sample(argv), "draw a grid of samples from a checkpoint (and an .npz)"),
            "evaluate": (lambda argv: cmd_evaluate(argv), "score samples: shapes FD, accuracy, precision, recall")}


def main(argv=None) -> None:
    common.dispatch(sys.argv[1:] if argv is None else argv, "ddpm.py", COMMANDS)


if __name__ == "__main__":
    common.run_cli(main)
