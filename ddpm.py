"""ddpm.py — Denoising Diffusion Probabilistic Models, in one readable file.

Paper: Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
Official code: github.com/hojonathanho/diffusion (TensorFlow). Public weights: the diffusers port
`google/ddpm-cifar10-32` (a `UNet2DModel`), loadable here with `--from-diffusers`.

Idea: a fixed forward process adds Gaussian noise over T = 1000 steps,
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s),
and a U-Net learns to undo it by predicting the noise: L_simple = E_{t, x_0, eps} |eps - eps_theta(x_t, t)|^2
with t uniform. Sampling runs the learned reverse chain from x_T ~ N(0, I) (or any faster sampler from
common.py). The defaults are the paper's CIFAR-10 run: 35.7 M-parameter U-Net, linear beta 1e-4 -> 0.02,
Adam 2e-4 with 5000 warm-up steps, batch 128, grad-norm clip 1, EMA 0.9999, horizontal flips, 800k steps.

Usage:
    python ddpm.py train --dataset cifar10                       # the paper's run (GPU; bf16: --bf16)
    torchrun --nproc_per_node 8 ddpm.py train --dataset cifar10  # the same on 8 GPUs (global batch 128)
    python ddpm.py train --preset tiny                           # CPU demo on `shapes`: minutes on 2 cores
    python ddpm.py train --preset tiny --steps 20                # CPU smoke run: well under a minute
    python ddpm.py train --resume runs/ddpm-shapes-... --steps 4000   # continue a run exactly, train longer
    python ddpm.py sample --ckpt runs/ddpm-shapes-...            # a grid with the run's own sampler settings
    python ddpm.py sample --ckpt RUN --sampler heun --steps 10 --class plus --out plus.png
    python ddpm.py sample --from-diffusers diffusion_pytorch_model.safetensors --steps 1000  # paper's weights
    python ddpm.py sample --ckpt RUN --n 64 --npz 50000          # uint8 NHWC .npz for the ADM FID evaluator
    python ddpm.py evaluate --ckpt RUN --n 1000                  # shapes FD / accuracy / precision / recall
    python ddpm.py --help                                        # commands; `ddpm.py sample --help`: flags
Python:
    import common, ddpm
    cfg = ddpm.PRESETS["tiny"]                          # a DDPMConfig; any field can be replaced
    net = ddpm.build_model(cfg, num_classes=10)         # the U-Net (untrained here)
    print(ddpm.num_params(net))                         # 688,051 parameters, all trainable
    model = ddpm.diffusion_net(net, cfg)                # as samplers see it: schedule, labels, grid settings
    images, labels, nfe = common.sample_images(model, 16, steps=5)   # (16, 3, 16, 16) in [-1, 1]
    # model, cfg, ckpt = ddpm.load("runs/ddpm-shapes-...")           # a trained run, with its EMA weights
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import struct
import sys
import time
from dataclasses import dataclass
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
class DDPMConfig(common.RunConfig):
    """The data, diffusion, optimisation and logging fields are common.RunConfig's (shared with dit.py); the
    defaults below are the paper's CIFAR-10 run where they differ from those."""
    # U-Net (paper CIFAR-10: 128, (1,2,2,2), 2 blocks, attention at 16x16, dropout 0.1)
    ch: int = common.field(128, "base channel count of the U-Net")
    ch_mult: tuple = common.field((1, 2, 2, 2), "channel multiplier per resolution; --img-size must be "
                                                "divisible by 2^(len(ch_mult)-1)")
    num_res_blocks: int = common.field(2, "residual blocks per resolution (down path)")
    attn_res: tuple = common.field((16,), "resolutions that get self-attention")
    dropout: float = common.field(0.1, "dropout inside residual blocks")
    norm_groups: int = common.field(32, "GroupNorm groups (paper: 32)")
    class_cond: bool = common.field(False, "add a label embedding to the time embedding")
    # optimisation: Adam with the official warm-up and clip
    warmup: int = common.field(5000, "linear lr warm-up steps (official code)")
    grad_clip: float = common.field(1.0, "global gradient-norm clip")
    steps: int = 800_000
    lr: float = 2e-4
    # grids: the paper's ancestral sampler (variance beta, x0 clipped as in official code), 100 respaced steps
    ckpt_every: int = 10_000
    sample_every: int = 10_000
    sample_sampler: str = "ddpm"
    sample_steps: int = 100
    sample_clip: bool = True


PRESETS = {
    # Ho et al. (2020) CIFAR-10: exactly the defaults above.
    "cifar10": DDPMConfig(),
    # Small U-Net that learns `shapes` on 2 CPU cores in ~4-5 minutes (`make demo`): 16 px (the size shapes
    # are drawn at; 16 -> 8 -> 4, attention at 4x4) and class-conditional, so the final grid (one row per
    # class) shows recognisable shapes after ~2000 steps. EMA 0.995: a ~200-step window, fit for a short run.
    # Grid settings: the best of the README's sampler table for this model (DDIM 50, clipped x0, CFG w = 1.5).
    "tiny": DDPMConfig(dataset="shapes", img_size=16, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                       attn_res=(4,), dropout=0.0, norm_groups=8, class_cond=True, steps=2000, batch_size=32,
                       lr=2e-3, warmup=50, ema_decay=0.995, log_every=100, ckpt_every=1000, sample_every=0,
                       sample_n=100, sample_sampler="ddim", sample_steps=50, sample_guidance=1.5,
                       sample_clip=True, eval_every=0, eval_n=500),
}

# Which fields define the network and the diffusion: a checkpoint only fits a config that agrees on them.
MODEL_FIELDS = ("img_size", "ch", "ch_mult", "num_res_blocks", "attn_res", "norm_groups", "class_cond",
                "schedule", "timesteps", "beta_start", "beta_end", "pred", "dataset")

GN_EPS = 1e-6          # GroupNorm epsilon of the official code (diffusers default 1e-5 would differ)
MAX_PERIOD = 10_000    # sinusoidal embedding period (Transformer, Vaswani et al. 2017)


def check_config(cfg: DDPMConfig) -> None:
    """Raise a ValueError naming the flag for every invalid value, before any work is done."""
    common.check_run_config(cfg, guidance_ok=cfg.class_cond and cfg.label_dropout > 0)
    common.check_ranges(cfg, positive=("ch", "num_res_blocks", "norm_groups", "steps", "grad_clip"),
                        non_negative=("warmup",), rate=("dropout",))
    if not cfg.ch_mult or min(cfg.ch_mult) <= 0:
        raise ValueError(f"--ch-mult needs positive multipliers, got {' '.join(map(str, cfg.ch_mult))}")
    down = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.img_size % down:
        raise ValueError(f"--img-size {cfg.img_size} must be divisible by {down} = 2^(len(--ch-mult)-1) "
                         f"for --ch-mult {' '.join(map(str, cfg.ch_mult))}")
    for c in sorted({cfg.ch * m for m in cfg.ch_mult}):
        if c % cfg.norm_groups:
            raise ValueError(f"--norm-groups {cfg.norm_groups} must divide every U-Net width (got {c})")


# =====================================================================================================
# U-Net blocks (module names follow diffusers' UNet2DModel so the public weights load by name)
# =====================================================================================================


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [sin(t f) | cos(t f)], f_i = 10000^(-i / (dim/2 - 1)) (official code; sin first).
    t: (B,) float timesteps (fractional allowed). Built in float32, as the official code does."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - 1))
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
    """h = conv1(SiLU(GN(x))) + W SiLU(e); out = skip(x) + conv2(Dropout(SiLU(GN(h)))). x: (B, cin, H, W)."""

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
    """Single-head self-attention over H*W positions, with residual: x + proj(softmax(q k^T / sqrt(C)) v)."""

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
    """3x3 stride-2 conv after zero-padding right and bottom by one (TF 'SAME'; torch padding=1 differs)."""

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
    """One decoder resolution: resnets[i] on [h, skip] (+ attentions[i]), then an optional upsampler."""

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
        # Class conditioning: an embedding added to the time embedding; the null label (CFG) is num_classes.
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
# DDPM: the U-Net of a config, its schedule, the training step
# =====================================================================================================


def build_model(cfg: DDPMConfig, num_classes: int = 0) -> UNet:
    """The U-Net of a config; class-conditional (with a null label for CFG) when cfg.class_cond."""
    if cfg.class_cond and num_classes <= 0:
        raise ValueError("--class-cond needs a labelled dataset (num_classes > 0)")
    return UNet(cfg.img_size, 3, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.dropout,
                cfg.norm_groups, num_classes if cfg.class_cond else 0)


def alphas_cumprod(cfg: DDPMConfig) -> torch.Tensor:
    """(T,) float64 alpha-bar table: a pure function of the config, so never checkpointed."""
    return common.make_alphas_cumprod(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end)


def diffusion_net(net: UNet, cfg: DDPMConfig, class_names=None) -> common.DiffusionNet:
    """The U-Net as the samplers see it, with the run's grid settings as its sampling defaults."""
    return common.DiffusionNet(net, alphas_cumprod(cfg), cfg.img_size, cfg.pred, num_classes=net.num_classes,
                               null_label=net.num_classes if net.num_classes else None,
                               class_names=class_names,
                               defaults=common.grid_settings(cfg))


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_step(net: UNet, opt: torch.optim.Optimizer, x: torch.Tensor, y, cfg: DDPMConfig, step: int,
               generator: torch.Generator, table: torch.Tensor, ddp_net: Optional[nn.Module] = None) -> dict:
    """One optimizer step: warm-up lr -> L_simple -> backward -> clip -> Adam. table: the alpha-bar table on
    the device (common.device_table). Returns metrics."""
    # Official code: lr = 2e-4 * min(step / 5000, 1) with the step count *before* the update (first lr is 0).
    lr = cfg.lr * min(step / cfg.warmup, 1.0) if cfg.warmup else cfg.lr
    for g in opt.param_groups:
        g["lr"] = lr
    with common.autocast(x.device, cfg.bf16):
        mse, _, _, _ = common.diffusion_loss(ddp_net or net, x, table, y, null_label=net.num_classes,
                                             label_dropout=cfg.label_dropout, pred=cfg.pred,
                                             generator=generator)
    loss = mse.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # The TPU code clipped each replica's gradient before averaging; DDP averages first (same for 1 GPU).
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    opt.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}


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
    to_q/to_k/to_v (older: query/key/value) stack into `qkv`; to_out.0 (older: proj_attn) is `proj_out`."""
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
            out[f"{base}.qkv.{param}"] = torch.cat([v, sd[f"{base}.to_k.{param}"],
                                                    sd[f"{base}.to_v.{param}"]], 0)
        elif ".to_k." in k or ".to_v." in k:
            continue
        else:
            out[k.replace(".to_out.0.", ".proj_out.")] = v
    return out


def load_diffusers_into(net: UNet, path) -> None:
    sd = load_state_dict_file(path)
    try:
        net.load_state_dict(convert_diffusers(sd), strict=True)
    except (KeyError, ValueError, RuntimeError) as e:  # another model's weights: missing keys or other shapes
        raise common.CheckpointError(f"--from-diffusers {path}: not the paper's CIFAR-10 UNet2DModel "
                                     f"({common.one_line(e)}); {WANT_DIFFUSERS}") from e


# =====================================================================================================
# training
# =====================================================================================================


def config_from_checkpoint(ckpt: dict) -> DDPMConfig:
    return common.config_from_dict(DDPMConfig, ckpt["config"])


def load(path, device="cpu", use_ema: bool = True):
    """A ddpm.py run (its folder or ckpt.pt) -> (DiffusionNet with the EMA weights, config, checkpoint)."""
    return common.load_run(path, "ddpm", config_from_checkpoint, build_model, diffusion_net, device, use_ema)


def train(cfg: DDPMConfig, resume: Optional[str] = None) -> Path:
    check_config(cfg)
    dist = common.setup_ddp(cfg.device)
    device = dist.device
    run = common.Run("ddpm", cfg, cfg.steps, dist, resume, config_from_checkpoint, MODEL_FIELDS)
    data = common.load_dataset(cfg.dataset, root=cfg.data_root, image_size=cfg.img_size)
    if cfg.class_cond and not data.num_classes:
        raise ValueError(f"--class-cond needs labels, but dataset {cfg.dataset!r} has none")

    common.seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    net = build_model(cfg, data.num_classes).to(device)
    ema = common.make_ema(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, **common.fused_adam(device))  # betas, eps as in TF1
    if run.ckpt is not None:
        net.load_state_dict(run.ckpt["model"])
        ema.load_state_dict(run.ckpt["ema"])
        opt.load_state_dict(run.ckpt["opt"])
    common.maybe_compile(net, cfg.compile)  # in place: state_dict names are unchanged
    ddp_net = common.wrap_ddp(net, dist)
    if dist.is_main:
        print(f"DDPM U-Net: {num_params(net):,} parameters (all trainable) | {cfg.dataset}: "
              f"{len(data.images)} images | device {device} x {dist.world_size} | run {run.dir}")
        print("config:", json.dumps(dataclasses.asdict(cfg)))

    def state(step):
        return {"kind": "ddpm", "config": dataclasses.asdict(cfg), "num_classes": net.num_classes,
                "class_names": data.class_names, "model": net.state_dict(), "ema": ema.state_dict(),
                "opt": opt.state_dict(), "step": step}

    per_rank, table = cfg.batch_size // dist.world_size, common.device_table(alphas_cumprod(cfg), device)
    net.train()
    for step in range(run.start, cfg.steps):
        x, y = common.get_batch(data, step, per_rank, cfg.seed, flip=cfg.flip, rank=dist.rank,
                                world_size=dist.world_size)
        x, y = x.to(device), (y.to(device) if net.num_classes else None)
        g = common.step_generator(cfg.seed, step, dist.rank, device)
        metrics = train_step(net, opt, x, y, cfg, step, g, table, ddp_net)
        common.ema_update(ema, net, cfg.ema_decay)
        run.after_step(step + 1, metrics, state, lambda: diffusion_net(ema, cfg, data.class_names))
    common.cleanup_ddp()
    return run.dir


# =====================================================================================================
# command line
# =====================================================================================================


def preset_config(known) -> DDPMConfig:
    """The defaults of the train flags (without --resume): the --preset's."""
    if (known.preset or "cifar10") not in PRESETS:
        raise ValueError(f"--preset {known.preset!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[known.preset or "cifar10"]


def parse_train_args(argv) -> tuple[DDPMConfig, Optional[str]]:
    return common.parse_train_args(argv, "ddpm.py [train]", "Train a DDPM. Every DDPMConfig field is a flag.",
                                   "ddpm", config_from_checkpoint, preset_config, check_config, PRESETS)


# the sample and evaluate commands take a ddpm.py run or the paper's weights (their diffusers port)
SOURCES = {"--ckpt": "a ddpm.py run: its folder or RUN/ckpt.pt",
           "--from-diffusers": "google/ddpm-cifar10-32 UNet2DModel weights (.safetensors or .bin)"}


def load_for_sampling(args):
    device = common.pick_device(args.device)
    if args.from_diffusers:
        net = build_model(PRESETS["cifar10"])
        load_diffusers_into(net, common.expand_path(args.from_diffusers))
        return diffusion_net(net.to(device).eval(), PRESETS["cifar10"], None), None, None, "cifar10"
    model, cfg, ckpt = load(args.ckpt, device, use_ema=not args.no_ema)
    return model, common.run_folder(args.ckpt), ckpt["step"], cfg.dataset


COMMANDS = common.diffusion_commands("ddpm.py", "a DDPM", lambda argv: train(*parse_train_args(argv)),
                                     SOURCES, load_for_sampling)


def main(argv=None) -> None:
    common.dispatch(sys.argv[1:] if argv is None else argv, "ddpm.py", COMMANDS)


if __name__ == "__main__":
    common.run_cli(main)
