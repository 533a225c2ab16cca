"""dit.py — Diffusion Transformers (DiT), in one readable file, weight-compatible with the official code.

Paper: Peebles & Xie (2023), "Scalable Diffusion Models with Transformers", arXiv:2212.09748.
Official code: github.com/facebookresearch/DiT (`models.py`); parameter names here are identical, so an
official state dict loads with `load_state_dict(strict=True)` (tests/golden/dit_small.pt proves the
function is the same). adaLN-single: Chen et al. (2023), "PixArt-alpha", arXiv:2310.00426, section 2.3.

Idea: cut the image into p x p patches, embed each as a token (+ fixed 2-D sin-cos position code) and run a
plain ViT on them. The diffusion timestep t and the class y enter ONLY through adaptive LayerNorm: the sum
c = emb(t) + emb(y) regresses a per-channel shift beta, scale gamma and (adaLN-Zero) residual gate alpha,
    h <- h + alpha1 * Attn(LN(h) (1 + gamma1) + beta1),   h <- h + alpha2 * MLP(LN(h) (1 + gamma2) + beta2),
with the regressing Linear zero-initialised, so every block starts as the identity. A final adaLN + Linear
decodes each token back to a p x p patch of the noise prediction eps (and, with --learn-sigma, of the
improved-DDPM variance interpolation v). Training: eps-MSE on the linear schedule (T = 1000), AdamW 1e-4,
EMA 0.9999, label dropout 0.1 so one network is both p(x|y) and p(x) for classifier-free guidance,
    eps_guided = (1 + w) eps(x, y) - w eps(x, null).
Defaults: the CIFAR-10 model of this project (DiT-S/4 width and heads at half depth: 32x32, p=4 -> 64 tokens).

Usage:
    python dit.py --dataset cifar10                                 # train (class-conditional; GPU: --bf16)
    torchrun --nproc_per_node 8 dit.py --dataset cifar10 --bf16     # the same on 8 GPUs (global --batch 128)
    python dit.py --preset tiny --dataset shapes                    # CPU demo (3000 small steps; minutes)
    python dit.py --preset tiny --steps 20                          # CPU smoke run: well under a minute
    python dit.py --model DiT-B/4 --adaln adaln-single --learn-sigma --dataset folder:~/pics
    python dit.py --resume runs/dit-shapes-...                      # continue a run exactly
    python dit.py sample --ckpt runs/dit-shapes-... --sampler ddim --steps 50 --guidance 2 --out grid.png
    python dit.py sample --ckpt RUN --class 3 --n 16 --out threes.png
    python dit.py sample --ckpt RUN --sampler ddpm --steps 250 --npz 50000   # uint8 NHWC for the ADM FID evaluator
    python dit.py evaluate --ckpt RUN --n 1000                      # shapes FD / class accuracy / precision / recall
Python:
    from dit import DiT, DiTConfig, get_dit_config
    cfg = get_dit_config(DATASET="CIFAR10", BATCH=128, EPOCHS=100, IMG_SIZE=32, WIDTH=384, DEPTH=6)
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
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

ADALN_VARIANTS = ("adaln-zero", "adaln", "adaln-single", "adaln-diagonal")
SAMPLERS = common.SAMPLERS  # what common.sample implements (it checks the name, too)


@dataclass
class DiTConfig:
    # data
    DATASET: str = field(default="cifar10", metadata={"help": "cifar10 | shapes | folder:PATH"})
    DATA_ROOT: str = field(default="data", metadata={"help": "where datasets are downloaded / cached"})
    IMG_SIZE: int = field(default=32, metadata={"help": "image side (pixels); divisible by PATCH"})
    FLIP: bool = field(default=True, metadata={"help": "random horizontal flips (the only augmentation)"})
    # model (named sizes: --model DiT-S/4 fills PATCH, WIDTH, DEPTH, HEADS)
    MODEL: Optional[str] = field(default=None, metadata={"help": "named size DiT-{S,B,L,XL}/{2,4,8}, or none"})
    PATCH: int = field(default=4, metadata={"help": "patch side p: (IMG_SIZE/p)^2 tokens"})
    WIDTH: int = field(default=384, metadata={"help": "hidden size D; divisible by HEADS and by 4"})
    DEPTH: int = field(default=6, metadata={"help": "number of DiT blocks"})
    HEADS: int = field(default=6, metadata={"help": "attention heads"})
    MLP_RATIO: float = field(default=4.0, metadata={"help": "MLP hidden size / WIDTH"})
    ADALN: str = field(default="adaln-zero", metadata={"help": "conditioning: " + " | ".join(ADALN_VARIANTS)})
    LEARN_SIGMA: bool = field(default=False, metadata={"help": "also predict the variance (improved-DDPM L_vlb)"})
    UNCOND: bool = field(default=False, metadata={"help": "ignore labels (unconditional model)"})
    CLASS_DROPOUT: float = field(default=0.1, metadata={"help": "label -> null label rate in training (CFG)"})
    # diffusion
    TIMESTEPS: int = field(default=1000, metadata={"help": "diffusion steps T"})
    BETA_START: float = field(default=1e-4, metadata={"help": "linear schedule beta_1"})
    BETA_END: float = field(default=0.02, metadata={"help": "linear schedule beta_T"})
    # optimisation (official recipe: AdamW 1e-4, no weight decay, constant lr, EMA 0.9999)
    BATCH: int = field(default=128, metadata={"help": "global batch size (split over DDP ranks)"})
    EPOCHS: int = field(default=100, metadata={"help": "passes over the dataset (ignored when STEPS > 0)"})
    STEPS: int = field(default=0, metadata={"help": "training steps; 0 = EPOCHS epochs"})
    LR: float = field(default=1e-4, metadata={"help": "AdamW learning rate (constant)"})
    WEIGHT_DECAY: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    EMA_DECAY: float = field(default=0.9999, metadata={"help": "EMA decay of the sampling weights"})
    SEED: int = field(default=0, metadata={"help": "seed of init, data order, noise and label dropout"})
    # runtime
    DEVICE: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps"})
    BF16: bool = field(default=False, metadata={"help": "bf16 autocast (GPU)"})
    COMPILE: bool = field(default=False, metadata={"help": "torch.compile the model"})
    # logging, checkpoints, sample grids, evaluation
    LOG_EVERY: int = field(default=100, metadata={"help": "print/log the loss every N steps"})
    CKPT_EVERY: int = field(default=5000, metadata={"help": "atomic checkpoint every N steps (and at the end)"})
    SAMPLE_EVERY: int = field(default=5000, metadata={"help": "EMA sample grid every N steps (0: only at end)"})
    SAMPLE_N: int = field(default=80, metadata={"help": "images per grid (one row per class when conditional)"})
    SAMPLE_SAMPLER: str = field(default="ddim", metadata={"help": "sampler of the grids: " + " | ".join(SAMPLERS)})
    SAMPLE_STEPS: int = field(default=50, metadata={"help": "sampler steps of the grids"})
    GUIDANCE: float = field(default=0.0, metadata={"help": "CFG weight w of the grids (0: none)"})
    EVAL_EVERY: int = field(default=0, metadata={"help": "shapes metrics every N steps (0: off)"})
    EVAL_N: int = field(default=500, metadata={"help": "samples per in-training evaluation"})
    PRESET: str = field(default="cifar10", metadata={"help": "base values: cifar10 | tiny"})


# Official `DiT_models` sizes (paper Table 1): (depth, width, heads); each with patch 2, 4 or 8.
DIT_SIZES = {"DiT-S": (12, 384, 6), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16), "DiT-XL": (28, 1152, 16)}
DIT_MODELS = {f"{name}/{p}": dict(DEPTH=d, WIDTH=w, HEADS=h, PATCH=p)
              for name, (d, w, h) in DIT_SIZES.items() for p in (2, 4, 8)}

PRESETS = {
    # The CIFAR-10 default of this project: exactly the dataclass defaults.
    "cifar10": {},
    # CPU demo on `shapes` (`make demo`), ~3 min on 2 cores: 16 px with patch 2 (64 tokens of 12 values each; at
    # 32 px / patch 4 the same budget gave speckled blobs), many small steps (a pixel DiT needs thousands of updates;
    # lr 2e-3 diverged); the grid uses the paper's sample-figure guidance scale s = 4, i.e. w = s - 1 = 3 here.
    "tiny": dict(DATASET="shapes", IMG_SIZE=16, PATCH=2, WIDTH=96, DEPTH=3, HEADS=4, BATCH=16, STEPS=3000, LR=1e-3,
                 EMA_DECAY=0.995, LOG_EVERY=250, CKPT_EVERY=1000, SAMPLE_EVERY=0, SAMPLE_N=80, SAMPLE_STEPS=50,
                 GUIDANCE=3.0),
}

# Fields that define the network and the diffusion: a checkpoint fits only a config that agrees on them.
MODEL_FIELDS = ("IMG_SIZE", "PATCH", "WIDTH", "DEPTH", "HEADS", "MLP_RATIO", "ADALN", "LEARN_SIGMA", "UNCOND",
                "CLASS_DROPOUT", "TIMESTEPS", "BETA_START", "BETA_END")

FREQ_DIM = 256          # timestep sinusoid size (official `frequency_embedding_size`)
MAX_PERIOD = 10_000     # sinusoid period (Vaswani et al. 2017), also of the 2-D position code
LN_EPS = 1e-6           # LayerNorm epsilon of the official blocks


def check_config(cfg: DiTConfig) -> None:
    """Raise a ValueError naming the flag for every invalid or inconsistent value, before any work."""
    if not (cfg.DATASET in ("cifar10", "shapes") or cfg.DATASET.startswith("folder:")):
        raise ValueError(f"--dataset {cfg.DATASET!r} is unknown; use cifar10, shapes or folder:PATH")
    if cfg.PRESET not in PRESETS:
        raise ValueError(f"--preset {cfg.PRESET!r} is unknown; use one of {', '.join(PRESETS)}")
    if cfg.MODEL is not None:
        if cfg.MODEL not in DIT_MODELS:
            raise ValueError(f"--model {cfg.MODEL!r} is unknown; use one of {', '.join(DIT_MODELS)}")
        bad = [f"{common.flag(k)} {getattr(cfg, k)} (it has {v})" for k, v in DIT_MODELS[cfg.MODEL].items()
               if getattr(cfg, k) != v]
        if bad:
            raise ValueError(f"--model {cfg.MODEL} contradicts " + ", ".join(bad) + "; drop one of them")
    if cfg.ADALN not in ADALN_VARIANTS:
        raise ValueError(f"--adaln {cfg.ADALN!r} is unknown; use one of {', '.join(ADALN_VARIANTS)}")
    if cfg.EVAL_EVERY and (cfg.DATASET != "shapes" or cfg.IMG_SIZE not in (8, 16, 32)):
        raise ValueError("--eval-every scores samples with the shapes classifier: it needs --dataset shapes and "
                         "--img-size 32, 16 or 8 (use --npz and the ADM evaluator for CIFAR-10 FID)")
    if cfg.IMG_SIZE % cfg.PATCH:
        raise ValueError(f"--img-size {cfg.IMG_SIZE} must be divisible by --patch {cfg.PATCH}")
    if cfg.WIDTH % cfg.HEADS:
        raise ValueError(f"--width {cfg.WIDTH} must be divisible by --heads {cfg.HEADS}")
    if cfg.WIDTH % 4:
        raise ValueError(f"--width {cfg.WIDTH} must be divisible by 4 (2-D sin-cos position code)")
    common.check_ranges(cfg, positive=("IMG_SIZE", "PATCH", "WIDTH", "DEPTH", "HEADS", "MLP_RATIO", "BATCH",
                                       "TIMESTEPS", "LR", "LOG_EVERY", "CKPT_EVERY", "SAMPLE_N", "SAMPLE_STEPS",
                                       "EVAL_N"),
                        non_negative=("SAMPLE_EVERY", "EVAL_EVERY", "WEIGHT_DECAY"), unit=("EMA_DECAY",),
                        rate=("CLASS_DROPOUT",))
    if cfg.STEPS < 0 or (cfg.STEPS == 0 and cfg.EPOCHS <= 0):
        raise ValueError(f"--steps {cfg.STEPS} / --epochs {cfg.EPOCHS}: give a positive number of either")
    common.check_linear_betas(cfg.BETA_START, cfg.BETA_END)
    if cfg.SAMPLE_SAMPLER not in SAMPLERS:
        raise ValueError(f"--sample-sampler {cfg.SAMPLE_SAMPLER!r}: use one of {', '.join(SAMPLERS)}")
    if cfg.GUIDANCE and (cfg.UNCOND or cfg.CLASS_DROPOUT == 0):
        raise ValueError("--guidance needs the null label: drop --uncond and keep --class-dropout > 0")


def get_dit_config(**overrides) -> DiTConfig:
    """DiTConfig from keyword fields, e.g. get_dit_config(DATASET="CIFAR10", WIDTH=384, DEPTH=6).
    Order: dataclass defaults <- PRESET's values <- MODEL's sizes <- the given keywords; then checked.
    Unknown keys and contradictions (MODEL vs. an explicit WIDTH, IMG_SIZE % PATCH ...) raise ValueError."""
    names = [f.name for f in dataclasses.fields(DiTConfig)]
    for key in overrides:
        if key not in names:
            hint = difflib.get_close_matches(key.upper(), names, n=1)
            raise ValueError(f"get_dit_config: unknown field {key!r}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; fields are UPPERCASE: {', '.join(names)}")
    preset = overrides.get("PRESET", "cifar10")
    if preset not in PRESETS:
        raise ValueError(f"PRESET {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    model = overrides.get("MODEL", PRESETS[preset].get("MODEL"))
    sizes = DIT_MODELS.get(model, {}) if model is not None else {}  # from the name unless given (then checked)
    values = {**PRESETS[preset], **sizes, **overrides}
    if isinstance(values.get("DATASET"), str) and values["DATASET"].lower() in ("cifar10", "shapes"):
        values["DATASET"] = values["DATASET"].lower()  # "CIFAR10" == "cifar10"; folder paths keep their case
    cfg = DiTConfig(**values)
    check_config(cfg)
    return cfg


# =====================================================================================================
# blocks (names = official models.py, so official state dicts load strict)
# =====================================================================================================


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """(N,) possibly fractional timesteps -> (N, dim) [cos(t f) | sin(t f)], f_i = max_period^(-i/(dim/2)).
    Always float32, as the official code (`t.float()`): a float64 model casts it afterwards."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D position code (grid*grid, dim), float64. A 1-D code of position u is
    [sin(u w) | cos(u w)] with w_i = 10000^(-i/(dim/4)); token k = row*grid + col gets
    [code(col) | code(row)] (the official numpy meshgrid puts the column first)."""
    q = dim // 4
    omega = 1.0 / MAX_PERIOD ** (torch.arange(q, dtype=torch.float64) / q)
    angles = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]     # (grid, q)
    code = torch.cat([angles.sin(), angles.cos()], dim=1)                       # (grid, dim/2)
    row, col = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([code[col.flatten()], code[row.flatten()]], dim=1)         # (grid*grid, dim)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) tokens, T = (H/p)(W/p), row-major: a stride-p conv (timm PatchEmbed)."""

    def __init__(self, patch: int, in_ch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        # contiguous: the residual stream keeps this layout, and a transposed one costs a copy in every LayerNorm
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """t -> 256-d sinusoid -> Linear -> SiLU -> Linear -> (N, D)."""

    def __init__(self, dim: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y -> (N, D). With dropout > 0 the table has a null row, index num_classes, used for CFG
    (label dropout itself is done by the training loss, so the forward pass is deterministic)."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + (dropout > 0), dim)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: one fused qkv Linear, then proj). (N, T, D) -> (N, T, D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        # q, k, v are strided views of the qkv output (no copies); SDPA reads them as they are. Unbinding dim 2
        # (not a permuted dim 0, as timm) lets backward stack dq, dk, dv straight into qkv's layout: one copy less.
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, D // self.heads).unbind(2)   # (N, T, H, hd) each
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (N, H, T, hd)
        return self.proj(o.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear (timm Mlp as configured by the official code)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
    """adaLN: x (N, T, D) scaled and shifted per sample and channel, shift and scale (N, 1, D)."""
    return x * (1 + scale) + shift


# Modulation rows produced per block: adaLN-Zero (beta1, gamma1, alpha1, beta2, gamma2, alpha2); adaLN and
# adaLN-diagonal (beta1, gamma1, beta2, gamma2); adaLN-single gets its 6 rows from one shared Linear.
N_MOD = {"adaln-zero": 6, "adaln": 4, "adaln-diagonal": 4, "adaln-single": 6}


class DiTBlock(nn.Module):
    """h <- h + alpha1 * Attn(mod(LN(h))), h <- h + alpha2 * MLP(mod(LN(h))), mod(x) = x (1 + gamma) + beta.
    The gate alpha is conditional (adaln-zero, adaln-single), absent (adaln) or a learned per-channel
    vector (adaln-diagonal). forward(x (N, T, D), c) where c is the condition (N, D), or for
    adaln-single the shared modulation S (N, 6D) of the whole network."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, adaln: str = "adaln-zero"):
        super().__init__()
        self.adaln = adaln
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if adaln == "adaln-single":  # PixArt-alpha: per-block learned offset E^(i) added to the shared S
            self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, N_MOD[adaln] * dim))
        if adaln == "adaln-diagonal":  # static per-channel branch scales (LayerScale-like), zero at init
            self.layer_scale = nn.Parameter(torch.zeros(2, dim))

    def forward(self, x, c):
        N, T, D = x.shape
        if self.adaln == "adaln-single":
            mod = c.view(N, 6, D) + self.scale_shift_table       # (N, 6, D)
        else:
            mod = self.adaLN_modulation(c).view(N, -1, D)         # (N, 6 or 4, D)
        mod = mod.unsqueeze(1)                                    # (N, 1, k, D): broadcast over tokens
        if self.adaln in ("adaln-zero", "adaln-single"):
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)
        else:
            shift1, scale1, shift2, scale2 = mod.unbind(2)
            gate1, gate2 = self.layer_scale.unbind(0) if self.adaln == "adaln-diagonal" else (None, None)
        branch = self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + branch if gate1 is None else x + gate1 * branch
        branch = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + branch if gate2 is None else x + gate2 * branch


class FinalLayer(nn.Module):
    """LN -> mod(beta, gamma) -> Linear to p*p*C_out per token. beta, gamma = Linear(SiLU(c)) (official), or
    for adaln-single E_f + c (PixArt's T2IFinalLayer: a learned (2, D) table plus the raw condition)."""

    def __init__(self, dim: int, patch: int, out_ch: int, single: bool = False):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(dim, patch * patch * out_ch)
        if single:
            self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        if hasattr(self, "scale_shift_table"):
            shift, scale = (self.scale_shift_table + c[:, None]).unsqueeze(1).unbind(2)   # (N, 1, D) each
        else:
            shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# =====================================================================================================
# the model
# =====================================================================================================


class DiT(nn.Module):
    """Diffusion Transformer. forward(x, t, y) -> (N, C_out, H, W), C_out = 2C with learn_sigma
    ([eps | v] channel order, as official). num_classes = 0: unconditional (y ignored)."""

    def __init__(self, input_size: int = 32, patch_size: int = 4, in_channels: int = 3, hidden_size: int = 384,
                 depth: int = 6, num_heads: int = 6, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 10, learn_sigma: bool = False, adaln: str = "adaln-zero"):
        super().__init__()
        if adaln not in ADALN_VARIANTS:
            raise ValueError(f"--adaln {adaln!r}: use one of {', '.join(ADALN_VARIANTS)}")
        if input_size % patch_size or hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"need input_size % patch_size == 0 and hidden_size divisible by num_heads and 4, got "
                             f"{input_size}, {patch_size}, {hidden_size}, {num_heads}")
        self.in_channels, self.patch, self.adaln = in_channels, patch_size, adaln
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.grid = num_classes, input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes else None
        # A Parameter with requires_grad=False (as official): fixed, but part of the state dict and counts.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, hidden_size), requires_grad=False)
        if adaln == "adaln-single":  # one Linear regresses all blocks' modulations (PixArt `t_block`)
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, adaln) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, single=adaln == "adaln-single")
        self.initialize_weights()

    @property
    def null_class(self) -> Optional[int]:
        """Index of the null label (for CFG), or None when the model has no null row."""
        has_null = self.y_embedder is not None and self.y_embedder.embedding_table.num_embeddings > self.num_classes
        return self.num_classes if has_null else None

    def initialize_weights(self):
        D = self.pos_embed.shape[-1]
        # ViT defaults: xavier-uniform Linears (the fused qkv as one matrix), zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(D, self.grid).float()[None])
        # Patch conv as the Linear it is: xavier on its (D, C*p*p) view.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.adaln == "adaln-zero":  # adaLN-Zero: all shifts, scales and gates 0 -> every block = identity
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.adaln == "adaln-single":  # PixArt: shared Linear N(0, 0.02^2); tables randn/sqrt(D) (at construction)
            nn.init.normal_(self.t_block[1].weight, std=0.02)
        else:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        # Zero output layer (paper: "initialize the final linear layer with zeros"): output == 0 at init.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W); within a token the channel varies fastest, then column, then row."""
        N, p, G, C = x.shape[0], self.patch, self.grid, self.out_channels
        x = x.view(N, G, G, p, p, C).permute(0, 5, 1, 3, 2, 4)   # (N, C, G_row, p_row, G_col, p_col)
        return x.reshape(N, C, G * p, G * p)

    def forward(self, x, t, y=None):
        """x (N, C, H, W) noisy images, t (N,) timesteps (float ok), y (N,) labels (num_classes = null)
        -> (N, C_out, H, W). Symbols: T = (H/p)^2 tokens, D = hidden size."""
        assert x.ndim == 4 and x.shape[1] == self.in_channels, \
            f"x {tuple(x.shape)}: expected (N, {self.in_channels}, H, W)"
        h = self.x_embedder(x) + self.pos_embed                  # (N, T, D)
        c = self.t_embedder(t)                                   # (N, D)
        if self.y_embedder is not None:
            assert y is not None, "class-conditional DiT needs labels y (use null_class for unconditional)"
            c = c + self.y_embedder(y)
        cond = self.t_block(c) if self.adaln == "adaln-single" else c   # (N, 6D) shared S, or (N, D)
        for block in self.blocks:
            h = block(h, cond)
        return self.unpatchify(self.final_layer(h, c))           # (N, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale: float):
        """Official guided forward, kept for parity: only the first half of x is used (duplicated), y holds
        [labels; null labels], eps channels of both halves become eps_u + s (eps_c - eps_u), the other
        channels (learned variance) are each half's own. The official code guides channels [:3]; here the
        first in_channels (the same thing for RGB). For sampling use `guided` below instead."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def build_model(cfg: DiTConfig, num_classes: int, in_channels: int = 3) -> DiT:
    """The DiT of a config; num_classes = 0 (or cfg.UNCOND) gives an unconditional model."""
    return DiT(cfg.IMG_SIZE, cfg.PATCH, in_channels, cfg.WIDTH, cfg.DEPTH, cfg.HEADS, cfg.MLP_RATIO,
               cfg.CLASS_DROPOUT, 0 if cfg.UNCOND else num_classes, cfg.LEARN_SIGMA, cfg.ADALN)


def num_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def param_table(cfg: DiTConfig, num_classes: int) -> str:
    """Parameter counts of all four conditioning variants at this size (built on the meta device: no memory)."""
    rows = []
    with torch.device("meta"):
        for v in ADALN_VARIANTS:
            n = num_params(build_model(dataclasses.replace(cfg, ADALN=v), num_classes), trainable=True)
            rows.append(f"{v}{' (this run)' if v == cfg.ADALN else ''} {n:,}")
    return "trainable parameters by --adaln: " + " | ".join(rows)


# =====================================================================================================
# diffusion: linear schedule, training loss (eps-MSE, + improved-DDPM L_vlb with --learn-sigma)
# =====================================================================================================


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2 (the approximation ADM/DiT use)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data in [-1, 1] quantised to 256 bins (width 2/255) under N(means, e^(2 log_scales));
    the edge bins extend to -inf / +inf (Ho et al. 2020 decoder L_0)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class Diffusion:
    """Gaussian diffusion tables in float64 (gathered per sample, then cast, as the official code) and the
    DiT training loss. q(x_t|x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, device="cpu"):
        self.T = timesteps
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        abar = torch.cumprod(1.0 - betas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)                 # beta_tilde_t
        self.betas, self.alphas_cumprod = betas.to(device), abar.to(device)
        self.sqrt_abar, self.sqrt_1m_abar = abar.sqrt().to(device), (1.0 - abar).sqrt().to(device)
        # log beta_tilde with the t=0 entry (which is 0) replaced by t=1's ("clipped", as ADM)
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])).to(device)
        self.log_betas = betas.log().to(device)
        self.post_c0 = (betas * abar_prev.sqrt() / (1.0 - abar)).to(device)              # coefficient of x_0
        self.post_ct = ((1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)).to(device)  # coefficient of x_t
        self.recip_abar, self.recipm1_abar = (1.0 / abar).sqrt().to(device), (1.0 / abar - 1).sqrt().to(device)

    @staticmethod
    def _at(table, t, like):
        return table[t].to(like.dtype)[:, None, None, None]

    def q_sample(self, x0, t, noise):
        return self._at(self.sqrt_abar, t, x0) * x0 + self._at(self.sqrt_1m_abar, t, x0) * noise

    def vlb_terms(self, x0, x_t, t, eps, v):
        """Per-sample L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL at t = 0.
        p's variance is exp(frac log beta_t + (1 - frac) log beta_tilde_t), frac = (v + 1) / 2 (IDDPM)."""
        frac = (v + 1) / 2
        logvar = frac * self._at(self.log_betas, t, x0) + (1 - frac) * self._at(self.post_logvar, t, x0)
        x0_hat = self._at(self.recip_abar, t, x0) * x_t - self._at(self.recipm1_abar, t, x0) * eps
        mean = self._at(self.post_c0, t, x0) * x0_hat + self._at(self.post_ct, t, x0) * x_t
        true_mean = self._at(self.post_c0, t, x0) * x0 + self._at(self.post_ct, t, x0) * x_t
        kl = normal_kl(true_mean, self._at(self.post_logvar, t, x0), mean, logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def loss(self, net, x0, y=None, null_class: Optional[int] = None, class_dropout: float = 0.0,
             learn_sigma: bool = False, generator: Optional[torch.Generator] = None):
        """DiT training loss: mean over the batch of |eps - eps_hat|^2 (mean over pixels), plus L_vlb with
        --learn-sigma, where only the variance output gets the L_vlb gradient (eps_hat detached, as official;
        L_vlb = E_t[L_t], i.e. IDDPM's L_hybrid with lambda = 1/T). t ~ U{0..T-1}. Returns (loss, metrics)."""
        B, C = x0.shape[:2]
        t = torch.randint(0, self.T, (B,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        if y is not None and class_dropout > 0:  # label dropout: trains the unconditional model CFG needs
            drop = torch.rand(B, device=x0.device, generator=generator) < class_dropout
            y = torch.where(drop, torch.full_like(y, null_class), y)
        x_t = self.q_sample(x0, t, noise)
        out = net(x_t, t, y).float()
        mse = (noise - out[:, :C]).square().mean(dim=(1, 2, 3))
        metrics = {"mse": mse.mean().detach()}
        if not learn_sigma:
            return mse.mean(), metrics
        vb = self.vlb_terms(x0, x_t, t, out[:, :C].detach(), out[:, C:])
        metrics["vb"] = vb.mean().detach()
        return (mse + vb).mean(), metrics


# =====================================================================================================
# sampling: CFG as a wrapper around the network, samplers from common.py
# =====================================================================================================


def guided(model: DiT, guidance: float, keep_variance: bool):
    """net(x, t, y) for common.sample. With guidance w != 0 the conditional and null-label passes run as ONE
    batched forward: eps = (1 + w) eps(x, y) - w eps(x, null) on the eps channels; the learned-variance
    channels (kept only when keep_variance) are the conditional pass's, unguided."""
    C = model.in_channels

    def net(x, t, y=None):
        t = t.expand(len(x)) if t.ndim == 0 else t
        if guidance == 0 or y is None:
            out = model(x, t, y)
        else:
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.null_class)]))
            cond, uncond = both.chunk(2)
            out = torch.cat([(1 + guidance) * cond[:, :C] - guidance * uncond[:, :C], cond[:, C:]], dim=1)
        return out if keep_variance else out[:, :C]
    return net


@torch.no_grad()
def sample_images(model: DiT, diffusion: Diffusion, n: int, y: Optional[torch.Tensor] = None, sampler: str = "ddim",
                  steps: int = 50, guidance: float = 0.0, generator: Optional[torch.Generator] = None,
                  img_size: int = 32, **options):
    """n images (n, C, H, W) in [-1, 1] and the number of network calls (a guided call = one batched call of
    2n images). Conditional models take labels y (default: 0, 1, 2, ... cycling through the classes)."""
    if guidance and model.null_class is None:
        raise ValueError("--guidance needs a class-conditional model trained with --class-dropout > 0")
    device = next(model.parameters()).device
    if model.num_classes:
        y = (torch.arange(n) % model.num_classes if y is None else y).to(device)
        if int(y.min()) < 0 or int(y.max()) >= model.num_classes:
            raise ValueError(f"--class must be in 0..{model.num_classes - 1}, got {y.unique().tolist()}")
    else:
        y = None
    learned = sampler == "ddpm" and model.out_channels > model.in_channels
    noise = torch.randn((n, model.in_channels, img_size, img_size), generator=generator, device=device)
    was_training = model.training
    model.eval()
    x, nfe = common.sample(guided(model, guidance, keep_variance=learned), noise, diffusion.alphas_cumprod,
                           sampler=sampler, steps=steps, pred="eps", y=y, generator=generator,
                           learned_sigma=learned, **options)
    model.train(was_training)
    return x, nfe


# =====================================================================================================
# checkpoints
# =====================================================================================================


def config_from_checkpoint(ckpt: dict) -> DiTConfig:
    names = {f.name for f in dataclasses.fields(DiTConfig)}
    saved = ckpt["config"]
    if set(saved) != names:
        raise common.CheckpointError(f"checkpoint config does not match DiTConfig (unknown: "
                                     f"{sorted(set(saved) - names)}, missing: {sorted(names - set(saved))})")
    return DiTConfig(**saved)


def load_model(path, device="cpu", use_ema: bool = True):
    """Rebuild a DiT from a dit.py checkpoint (RUN/ckpt.pt or the run folder). Returns (model, cfg, ckpt)."""
    path = Path(path)
    path = path / "ckpt.pt" if path.is_dir() else path
    ckpt = common.load_checkpoint(path, kind="dit")
    cfg = config_from_checkpoint(ckpt)
    model = build_model(cfg, ckpt["num_classes"])
    model.load_state_dict(ckpt["ema" if use_ema else "model"], strict=True)
    return model.to(device).eval(), cfg, ckpt


# =====================================================================================================
# training
# =====================================================================================================


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The randomness of one training step (t, noise, label dropout) is a pure function of (seed, step, rank),
    like the data order of common.get_batch: a resumed run repeats an uninterrupted one exactly."""
    mixed = int(np.random.SeedSequence([seed, step, rank, 7]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device=device).manual_seed(mixed)


def train_step(model: DiT, opt: torch.optim.Optimizer, diffusion: Diffusion, x, y, cfg: DiTConfig,
               generator: Optional[torch.Generator] = None, net: Optional[nn.Module] = None) -> dict:
    """One optimizer step (loss -> backward -> AdamW); `net` is the DDP/compiled wrapper when there is one."""
    with common.autocast(x.device, cfg.BF16):
        loss, metrics = diffusion.loss(net or model, x, y, model.null_class, cfg.CLASS_DROPOUT, cfg.LEARN_SIGMA,
                                       generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}


def save_grid(ema: DiT, diffusion: Diffusion, cfg: DiTConfig, path, seed: int) -> None:
    """EMA samples, one row per class (classes 0..K-1 top to bottom) when conditional."""
    g = torch.Generator(device=next(ema.parameters()).device).manual_seed(seed)
    k = ema.num_classes
    per_row = max(1, cfg.SAMPLE_N // k) if k else None
    n = per_row * k if k else cfg.SAMPLE_N
    y = torch.arange(k).repeat_interleave(per_row) if k else None
    # Unguided grids clip x0 to [-1, 1] at every step (keeps a young model's grids from saturating); guided ones
    # do not: clipping also clips the guided push (tiny preset, w = 3: washed-out colours with it).
    x, _ = sample_images(ema, diffusion, n, y, cfg.SAMPLE_SAMPLER, cfg.SAMPLE_STEPS, cfg.GUIDANCE if k else 0.0, g,
                         cfg.IMG_SIZE, clip_denoised=not (k and cfg.GUIDANCE))
    common.save_image_grid(x.cpu(), path, nrow=per_row)


def evaluate_model(ema: DiT, diffusion: Diffusion, n: int, sampler: str, steps: int, guidance: float, seed: int,
                   img_size: int = 32, batch: int = 250, cache_dir: str = "data", **options) -> dict:
    """Sample n images (labels cycling through the classes) and score them with common.evaluate_samples."""
    g = torch.Generator(device=next(ema.parameters()).device).manual_seed(seed)
    images, labels = [], []
    for i in range(0, n, batch):
        y = torch.arange(i, min(n, i + batch)) % ema.num_classes if ema.num_classes else None
        x, _ = sample_images(ema, diffusion, min(batch, n - i), y, sampler, steps, guidance, g, img_size, **options)
        images.append(common.to_uint8(x.cpu()))
        labels.append(y)
    return common.evaluate_samples(torch.cat(images), torch.cat(labels) if ema.num_classes else None, cache_dir)


def train(cfg: DiTConfig, resume: Optional[str] = None) -> Path:
    check_config(cfg)
    dist = common.setup_ddp(cfg.DEVICE)
    device = dist.device
    if cfg.BATCH % dist.world_size:
        raise ValueError(f"--batch {cfg.BATCH} must be divisible by the {dist.world_size} DDP ranks")
    ckpt = None
    if resume:
        run_dir = Path(resume)
        ckpt = common.load_checkpoint(run_dir / "ckpt.pt", kind="dit")
        saved = config_from_checkpoint(ckpt)
        diff = [f"{common.flag(k)} {getattr(saved, k)} (checkpoint) vs {getattr(cfg, k)} (now)"
                for k in MODEL_FIELDS + ("DATASET",) if getattr(saved, k) != getattr(cfg, k)]
        if diff:
            raise common.CheckpointError("--resume: the run was trained with another model: " + "; ".join(diff))
    data = common.load_dataset(cfg.DATASET, root=cfg.DATA_ROOT, image_size=cfg.IMG_SIZE)
    num_classes = 0 if cfg.UNCOND else data.num_classes
    total = cfg.STEPS or math.ceil(cfg.EPOCHS * len(data.images) / cfg.BATCH)

    common.seed_everything(cfg.SEED)  # same initial weights on every rank
    model = build_model(cfg, num_classes).to(device)
    ema = common.make_ema(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.LR,
                            weight_decay=cfg.WEIGHT_DECAY, **common.fused_adam(device))
    diffusion = Diffusion(cfg.TIMESTEPS, cfg.BETA_START, cfg.BETA_END, device)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        common.set_rng_state(ckpt["rng"])
    elif dist.is_main:
        run_dir = common.make_run_dir("dit", cfg.DATASET.replace("folder:", "folder-").replace("/", "_"))
    if dist.world_size > 1:  # every rank writes to rank 0's folder
        names = [str(run_dir) if dist.is_main else None]
        torch.distributed.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    net = common.wrap_ddp(common.maybe_compile(model, cfg.COMPILE), dist)
    log = common.MetricsLog(run_dir) if dist.is_main else None
    if dist.is_main:
        print(f"DiT ({cfg.MODEL or 'custom'}: D={cfg.WIDTH}, depth {cfg.DEPTH}, {cfg.HEADS} heads, patch {cfg.PATCH}, "
              f"{cfg.ADALN}): {num_params(model):,} parameters ({num_params(model, True):,} trainable) | "
              f"{cfg.DATASET}: {len(data.images)} images, {num_classes or 'no'} classes | {total} steps | "
              f"device {device} x {dist.world_size} | run {run_dir}")
        print(param_table(cfg, num_classes))
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    def checkpoint(step):
        common.save_checkpoint(run_dir / "ckpt.pt", {
            "kind": "dit", "config": dataclasses.asdict(cfg), "num_classes": num_classes,
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "step": step, "rng": common.rng_state()})

    progress = common.Progress(total, unit="img", start_step=start)
    per_rank = cfg.BATCH // dist.world_size
    model.train()
    for step in range(start, total):
        x, y = common.get_batch(data, step, per_rank, cfg.SEED, flip=cfg.FLIP, rank=dist.rank,
                                world_size=dist.world_size)
        x, y = x.to(device), (y.to(device) if num_classes else None)
        metrics = train_step(model, opt, diffusion, x, y, cfg, step_generator(cfg.SEED, step, dist.rank, device), net)
        common.ema_update(ema, model, cfg.EMA_DECAY)
        done = step + 1
        if done % cfg.LOG_EVERY == 0 or done == total:
            loss = common.all_reduce_mean(metrics["loss"], dist)
            if dist.is_main:
                print(progress.line(done, loss, cfg.BATCH), flush=True)
                log.log(step=done, **{**metrics, "loss": loss})
        if dist.is_main and cfg.SAMPLE_EVERY and done % cfg.SAMPLE_EVERY == 0 and done < total:
            save_grid(ema, diffusion, cfg, run_dir / f"samples_{done:07d}.png", cfg.SEED)
        if dist.is_main and cfg.EVAL_EVERY and done % cfg.EVAL_EVERY == 0:
            res = evaluate_model(ema, diffusion, cfg.EVAL_N, cfg.SAMPLE_SAMPLER, cfg.SAMPLE_STEPS, cfg.GUIDANCE,
                                 cfg.SEED, cfg.IMG_SIZE, cache_dir=cfg.DATA_ROOT)
            log.log(step=done, **{f"eval/{k}": v for k, v in res.items()})
            print(f"step {done} eval: " + " | ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)
        if dist.is_main and (done % cfg.CKPT_EVERY == 0 or done == total):
            checkpoint(done)
    if dist.is_main:
        save_grid(ema, diffusion, cfg, run_dir / f"samples_{total:07d}.png", cfg.SEED)
        print(f"done: {run_dir}/ckpt.pt, {run_dir}/samples_{total:07d}.png")
    common.cleanup_ddp()
    return run_dir


# =====================================================================================================
# command line
# =====================================================================================================


def parse_train_args(argv) -> tuple[DiTConfig, Optional[str]]:
    """Flags default to the chosen --preset and --model (or, with --resume, to the run's saved config)."""
    pre = common.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cifar10")
    pre.add_argument("--model", default=None)
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.resume:  # the run's config becomes the default; flags that change the model are refused later
        base = config_from_checkpoint(common.load_checkpoint(Path(known.resume) / "ckpt.pt", kind="dit"))
    else:
        base = get_dit_config(PRESET=known.preset, **({"MODEL": known.model} if known.model else {}))
    parser = common.ArgumentParser(prog="dit.py [train]", description="Train a DiT. Every DiTConfig field is a flag.")
    parser.add_argument("--resume", default=None, help="run folder to continue exactly")
    common.add_config_args(parser, base)
    cfg = common.config_from_args(base, parser.parse_args(argv))
    if isinstance(cfg.DATASET, str) and cfg.DATASET.lower() in ("cifar10", "shapes"):
        cfg = dataclasses.replace(cfg, DATASET=cfg.DATASET.lower())
    check_config(cfg)
    return cfg, known.resume


def sample_parser(prog: str) -> argparse.ArgumentParser:
    p = common.ArgumentParser(prog=prog)
    p.add_argument("--ckpt", required=True, help="dit.py checkpoint (RUN/ckpt.pt or RUN)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--guidance", type=float, default=0.0, help="CFG weight w: (1+w) eps(x,y) - w eps(x,null)")
    p.add_argument("--class", dest="cls", type=int, default=None, help="draw only this class (default: all)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--variance", default=None, choices=("small", "large", "learned"),
                   help="ddpm sampler: sigma^2 = beta_tilde (small), beta (large) or the model's own (learned; "
                        "default with --learn-sigma, else small)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp every predicted x0 to [-1, 1] (default: the ddpm sampler clips, the others do not)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto")
    return p


def draw(model: DiT, diffusion: Diffusion, args, n: int, img_size: int, g: torch.Generator):
    """n images in batches: (float images in [-1, 1] on cpu, labels or None, network calls)."""
    xs, ys, nfe = [], [], 0
    for i in range(0, n, args.batch_size):
        m = min(args.batch_size, n - i)
        y = None
        if model.num_classes:
            y = torch.full((m,), args.cls) if args.cls is not None else torch.arange(i, i + m) % model.num_classes
        x, k = sample_images(model, diffusion, m, y, args.sampler, args.steps, args.guidance, g, img_size,
                             **common.sampler_kwargs(args))
        xs.append(x.cpu()), ys.append(y)
        nfe += k
    return torch.cat(xs), (torch.cat(ys) if model.num_classes else None), nfe


def load_for_sampling(args):
    if args.cls is not None and args.cls < 0:
        raise ValueError(f"--class must be >= 0, got {args.cls}")
    device = common.pick_device(args.device)
    model, cfg, ckpt = load_model(args.ckpt, device, use_ema=not args.no_ema)
    if args.cls is not None and not model.num_classes:
        raise ValueError("--class needs a class-conditional model (this one was trained with --uncond)")
    diffusion = Diffusion(cfg.TIMESTEPS, cfg.BETA_START, cfg.BETA_END, device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    return model, cfg, ckpt, diffusion, g


def cmd_sample(argv) -> None:
    p = sample_parser("dit.py sample")
    p.add_argument("--n", type=int, default=None, help="images in the grid (default: 8 per class, or 64)")
    p.add_argument("--out", default="samples.png", help="grid PNG path")
    p.add_argument("--npz", type=int, default=0, help="also write N samples as uint8 NHWC arr_0 (ADM layout)")
    args = p.parse_args(argv)
    common.check_ranges(args, positive=("n", "batch_size"), non_negative=("npz",))
    model, cfg, _, diffusion, g = load_for_sampling(args)
    per_class = model.num_classes and args.cls is None
    n = args.n or (8 * model.num_classes if per_class else 64)
    t0 = time.time()
    if per_class:  # one row per class
        per_row = max(1, n // model.num_classes)
        ys = torch.arange(model.num_classes).repeat_interleave(per_row)
        x, nfe = sample_images(model, diffusion, len(ys), ys, args.sampler, args.steps, args.guidance, g,
                               cfg.IMG_SIZE, **common.sampler_kwargs(args))
        common.save_image_grid(x.cpu(), args.out, nrow=per_row)
    else:
        x, _, nfe = draw(model, diffusion, args, n, cfg.IMG_SIZE, g)
        common.save_image_grid(x, args.out)
    print(f"{len(x)} samples, {args.sampler} {args.steps} steps, guidance {args.guidance}, {nfe} network calls, "
          f"{time.time() - t0:.1f} s -> {args.out}")
    if args.npz:
        x, y, _ = draw(model, diffusion, args, args.npz, cfg.IMG_SIZE, g)
        path = common.save_npz(x, y, Path(args.out).with_suffix(".npz"))
        print(f"{args.npz} samples -> {path} (arr_0 uint8 (N, H, W, 3), arr_1 labels if conditional)")


def cmd_evaluate(argv) -> None:
    p = sample_parser("dit.py evaluate")
    p.add_argument("--n", type=int, default=1000, help="samples to score")
    p.add_argument("--cache-dir", default="data", help="where the reference classifier is cached")
    args = p.parse_args(argv)
    common.check_ranges(args, positive=("n", "batch_size"))
    if args.cls is not None:
        raise ValueError("evaluate scores all classes; drop --class")
    model, cfg, ckpt, diffusion, g = load_for_sampling(args)
    t0 = time.time()
    x, y, nfe = draw(model, diffusion, args, args.n, cfg.IMG_SIZE, g)
    res = common.evaluate_samples(common.to_uint8(x), y, args.cache_dir)
    row = {"ckpt": str(args.ckpt), "step": ckpt["step"], "sampler": args.sampler, "steps": args.steps,
           "guidance": args.guidance, "n": args.n, **res}
    print(common.format_metrics_table([row]))
    print(f"({nfe} network calls, {time.time() - t0:.1f} s)")
    run_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    common.MetricsLog(run_dir).log(step=ckpt["step"], **{f"eval/{k}": v for k, v in res.items()},
                                   sampler=args.sampler, sampler_steps=args.steps, guidance=args.guidance, n=args.n)


COMMANDS = {"train": (lambda argv: train(*parse_train_args(argv)), "train a DiT (the default command)"),
            "sample": (lambda argv: cmd_sample(argv), "draw a grid of samples from a checkpoint (and an .npz)"),
            "evaluate": (lambda argv: cmd_evaluate(argv), "score samples: shapes FD, accuracy, precision, recall")}


def main(argv=None) -> None:
    common.dispatch(sys.argv[1:] if argv is None else argv, "dit.py", COMMANDS)


if __name__ == "__main__":
    common.run_cli(main)
