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
    torchrun --nproc_per_node 8 dit.py --dataset cifar10 --bf16     # the same on 8 GPUs (global batch 128)
    python dit.py --preset tiny                                     # CPU demo, `shapes` (3000 steps; minutes)
    python dit.py --preset tiny --steps 20                          # CPU smoke run: well under a minute
    python dit.py --model DiT-B/4 --adaln adaln-single --learn-sigma --dataset folder:~/pics
    python dit.py --resume runs/dit-shapes-... --steps 6000         # continue a run exactly, train longer
    python dit.py sample --ckpt runs/dit-shapes-...                 # a grid with the run's sampler settings
    python dit.py sample --ckpt RUN --class plus --n 16 --guidance 2 --out plus.png
    python dit.py sample --ckpt RUN --sampler ddpm --steps 250 --npz 50000  # uint8 NHWC for ADM FID evaluator
    python dit.py evaluate --ckpt RUN --n 1000                      # shapes FD, accuracy, precision, recall
    python dit.py --help                                            # commands; `dit.py sample --help`: flags
Python:
    import common, dit
    cfg = dit.get_dit_config(DATASET="CIFAR10", BATCH=128, EPOCHS=100, IMG_SIZE=32, WIDTH=384, DEPTH=6)
    model = dit.build_model(cfg, num_classes=10)        # a DiT; dit.DiT takes the official constructor args
    print(dit.num_params(model), dit.num_params(model, trainable=True))  # 16,568,112 / 16,543,536 (fixed pos)
    images, labels, nfe = common.sample_images(dit.diffusion_net(model, cfg), 16, steps=5)   # (16, 3, 32, 32)
    # model, cfg, ckpt = dit.load("runs/dit-shapes-...")            # a trained run, with its EMA weights
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
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

ADALN_VARIANTS = ("adaln-zero", "adaln", "adaln-single", "adaln-diagonal")


@dataclass
class DiTConfig(common.RunConfig):
    """The data, diffusion, optimisation and logging fields are common.RunConfig's (shared with ddpm.py); the
    defaults are the official recipe (AdamW 1e-4, no weight decay, constant lr, EMA 0.9999, eps-MSE on the
    linear schedule)."""
    # model (named sizes: --model DiT-S/4 fills patch, width, depth, heads)
    model: Optional[str] = common.field(None, "named size DiT-{S,B,L,XL}/{2,4,8}, or none")
    patch: int = common.field(4, "patch side p: (img_size/p)^2 tokens")
    width: int = common.field(384, "hidden size D; divisible by --heads and by 4")
    depth: int = common.field(6, "number of DiT blocks")
    heads: int = common.field(6, "attention heads")
    mlp_ratio: float = common.field(4.0, "MLP hidden size / width")
    adaln: str = common.field("adaln-zero", "conditioning: " + " | ".join(ADALN_VARIANTS))
    learn_sigma: bool = common.field(False, "also predict the variance (improved-DDPM L_vlb)")
    uncond: bool = common.field(False, "ignore labels (unconditional model)")
    # optimisation
    epochs: int = common.field(100, "passes over the dataset (when --steps is 0)")
    weight_decay: float = common.field(0.0, "AdamW weight decay")
    preset: str = common.field("cifar10", "base values: cifar10 | tiny")
    sample_n: int = 80


# Official `DiT_models` sizes (paper Table 1): (depth, width, heads); each with patch 2, 4 or 8.
DIT_SIZES = {"DiT-S": (12, 384, 6), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16), "DiT-XL": (28, 1152, 16)}
DIT_MODELS = {f"{name}/{p}": dict(depth=d, width=w, heads=h, patch=p)
              for name, (d, w, h) in DIT_SIZES.items() for p in (2, 4, 8)}

PRESETS = {
    # The CIFAR-10 default of this project: exactly the dataclass defaults.
    "cifar10": {},
    # CPU demo on `shapes` (`make demo`), ~3 min on 2 cores: 16 px, patch 2 (64 tokens of 12 values each; at
    # 32 px / patch 4 the same budget gave speckled blobs), many small steps (a pixel DiT needs thousands of
    # updates; lr 2e-3 diverged); the grid uses the paper's sample-figure guidance s = 4, i.e. w = s - 1 = 3.
    "tiny": dict(dataset="shapes", img_size=16, patch=2, width=96, depth=3, heads=4, batch_size=16,
                 steps=3000, lr=1e-3, ema_decay=0.995, log_every=250, ckpt_every=1000, sample_every=0,
                 sample_n=80, sample_steps=50, sample_guidance=3.0),
}

# Fields that define the network and the diffusion: a checkpoint fits only a config that agrees on them.
MODEL_FIELDS = ("img_size", "patch", "width", "depth", "heads", "mlp_ratio", "adaln", "learn_sigma", "uncond",
                "label_dropout", "schedule", "timesteps", "beta_start", "beta_end", "pred", "dataset")
# Field names of configs (get_dit_config keywords, checkpoints) written before the names were unified.
OLD_NAMES = {"BATCH": "batch_size", "CLASS_DROPOUT": "label_dropout", "GUIDANCE": "sample_guidance"}

FREQ_DIM = 256          # timestep sinusoid size (official `frequency_embedding_size`)
MAX_PERIOD = 10_000     # sinusoid period (Vaswani et al. 2017), also of the 2-D position code
LN_EPS = 1e-6           # LayerNorm epsilon of the official blocks


def check_config(cfg: DiTConfig) -> None:
    """Raise a ValueError naming the flag for every invalid or inconsistent value, before any work."""
    common.check_run_config(cfg, guidance_ok=not cfg.uncond and cfg.label_dropout > 0)
    if cfg.preset not in PRESETS:
        raise ValueError(f"--preset {cfg.preset!r} is unknown; use one of {', '.join(PRESETS)}")
    if cfg.model is not None:
        if cfg.model not in DIT_MODELS:
            raise ValueError(f"--model {cfg.model!r} is unknown; use one of {', '.join(DIT_MODELS)}")
        bad = [f"{common.flag(k)} {getattr(cfg, k)} (it has {v})" for k, v in DIT_MODELS[cfg.model].items()
               if getattr(cfg, k) != v]
        if bad:
            raise ValueError(f"--model {cfg.model} contradicts " + ", ".join(bad) + "; drop one of them")
    if cfg.adaln not in ADALN_VARIANTS:
        raise ValueError(f"--adaln {cfg.adaln!r} is unknown; use one of {', '.join(ADALN_VARIANTS)}")
    if cfg.img_size % cfg.patch:
        raise ValueError(f"--img-size {cfg.img_size} must be divisible by --patch {cfg.patch}")
    if cfg.width % cfg.heads:
        raise ValueError(f"--width {cfg.width} must be divisible by --heads {cfg.heads}")
    if cfg.width % 4:
        raise ValueError(f"--width {cfg.width} must be divisible by 4 (2-D sin-cos position code)")
    common.check_ranges(cfg, positive=("patch", "width", "depth", "heads", "mlp_ratio"),
                        non_negative=("weight_decay", "steps"))
    if cfg.steps == 0 and cfg.epochs <= 0:
        raise ValueError(f"--steps {cfg.steps} / --epochs {cfg.epochs}: give a positive number of either")


def get_dit_config(**overrides) -> DiTConfig:
    """DiTConfig from keyword fields, e.g. get_dit_config(dataset="cifar10", width=384, depth=6); the
    upper-case names of older versions work too (DATASET="CIFAR10", BATCH=128, IMG_SIZE=32, WIDTH=384, ...).
    Order: dataclass defaults <- preset's values <- model's sizes <- the given keywords; then checked. epochs
    given without steps decide the length. Unknown keys and contradictions raise ValueError."""
    names = [f.name for f in dataclasses.fields(DiTConfig)]
    overrides = {OLD_NAMES.get(k, k.lower() if k.isupper() else k): v for k, v in overrides.items()}
    for key in overrides:
        if key not in names:
            hint = difflib.get_close_matches(key.lower(), names, n=1)
            raise ValueError(f"get_dit_config: unknown field {key!r}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else f"; fields: {', '.join(names)}"))
    preset = overrides.get("preset", "cifar10")
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    model = overrides.get("model", PRESETS[preset].get("model"))
    sizes = DIT_MODELS.get(model, {}) if model is not None else {}  # from the name unless given (checked)
    values = {**PRESETS[preset], **sizes, **overrides}
    if "epochs" in overrides and "steps" not in overrides:
        values["steps"] = 0
    if isinstance(values.get("dataset"), str) and values["dataset"].lower() in ("cifar10", "shapes"):
        values["dataset"] = values["dataset"].lower()  # "CIFAR10" == "cifar10"; folder paths keep their case
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
        # contiguous: the residual stream keeps this layout; a transposed one costs a copy in every LayerNorm
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
        # q, k, v are strided views of the qkv output (no copies); SDPA reads them as is. Unbinding dim 2
        # (not a permuted dim 0, as timm) lets backward stack dq, dk, dv into qkv's layout: one copy less.
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, D // self.heads).unbind(2)   # (N, T, H, hd) each
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).reshape(N, T, D))  # o: (N, H, T, hd)


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

    def __init__(self, input_size: int = 32, patch_size: int = 4, in_channels: int = 3,
                 hidden_size: int = 384, depth: int = 6, num_heads: int = 6, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 10, learn_sigma: bool = False,
                 adaln: str = "adaln-zero"):
        super().__init__()
        if not isinstance(input_size, int):
            raise TypeError("DiT takes the official constructor arguments (input_size, patch_size, ...); "
                            "build the model of a config with dit.build_model(cfg, num_classes)")
        if adaln not in ADALN_VARIANTS:
            raise ValueError(f"--adaln {adaln!r}: use one of {', '.join(ADALN_VARIANTS)}")
        if input_size % patch_size or hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"need input_size % patch_size == 0 and hidden_size divisible by num_heads "
                             f"and 4, got {input_size}, {patch_size}, {hidden_size}, {num_heads}")
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
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, adaln)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels,
                                      single=adaln == "adaln-single")
        self.initialize_weights()

    @property
    def null_class(self) -> Optional[int]:
        """Index of the null label (for CFG), or None when the model has no null row."""
        has_null = (self.y_embedder is not None
                    and self.y_embedder.embedding_table.num_embeddings > self.num_classes)
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
        if self.adaln == "adaln-single":  # PixArt: t_block N(0, 0.02^2); tables randn/sqrt(D) in __init__
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


def build_model(cfg: DiTConfig, num_classes: int, in_channels: int = 3) -> DiT:
    """The DiT of a config (the documented way to build one); num_classes = 0 or cfg.uncond: unconditional."""
    return DiT(cfg.img_size, cfg.patch, in_channels, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio,
               cfg.label_dropout, 0 if cfg.uncond else num_classes, cfg.learn_sigma, cfg.adaln)


def num_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def param_table(cfg: DiTConfig, num_classes: int) -> str:
    """Parameter counts of all four conditioning variants at this size (on the meta device: no memory)."""
    rows = []
    with torch.device("meta"):
        for v in ADALN_VARIANTS:
            n = num_params(build_model(dataclasses.replace(cfg, adaln=v), num_classes), trainable=True)
            rows.append(f"{v}{' (this run)' if v == cfg.adaln else ''} {n:,}")
    return "trainable parameters by --adaln: " + " | ".join(rows)


# =====================================================================================================
# diffusion: the training loss (common.diffusion_loss's eps-MSE, + improved-DDPM L_vlb with --learn-sigma)
# =====================================================================================================


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


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
    """The posterior tables of the improved-DDPM variational bound, in float64 (gathered per sample, then
    cast, as official), for an alpha-bar table: q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, beta~_t)."""

    def __init__(self, alphas_cumprod: torch.Tensor, device="cpu"):
        abar = alphas_cumprod.to(torch.float64).cpu()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = 1 - abar / abar_prev
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)                 # beta_tilde_t
        self.alphas_cumprod = common.device_table(abar, device)
        # log beta_tilde with the t=0 entry (which is 0) replaced by t=1's ("clipped", as ADM)
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])).to(device)
        self.log_betas = betas.log().to(device)
        self.post_c0 = (betas * abar_prev.sqrt() / (1.0 - abar)).to(device)                  # coeff. of x_0
        self.post_ct = ((1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)).to(device)  # coeff. of x_t

    @staticmethod
    def _at(table, t, like):
        return table[t].to(like.dtype)[:, None, None, None]

    def vlb_terms(self, x0, x_t, t, x0_hat, v):
        """Per-sample L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL at t = 0,
        where p has mean c0 x0_hat + ct x_t and variance exp(frac log beta_t + (1 - frac) log beta~_t),
        frac = (v+1)/2."""
        frac = (v + 1) / 2
        logvar = frac * self._at(self.log_betas, t, x0) + (1 - frac) * self._at(self.post_logvar, t, x0)
        mean = self._at(self.post_c0, t, x0) * x0_hat + self._at(self.post_ct, t, x0) * x_t
        true_mean = self._at(self.post_c0, t, x0) * x0 + self._at(self.post_ct, t, x0) * x_t
        kl = (normal_kl(true_mean, self._at(self.post_logvar, t, x0), mean, logvar).mean(dim=(1, 2, 3))
              / math.log(2.0))
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def loss(self, net, x0, y=None, null_label: Optional[int] = None, label_dropout: float = 0.0,
             learn_sigma: bool = False, pred: str = "eps", generator: Optional[torch.Generator] = None):
        """DiT training loss: the mean over the batch of common.diffusion_loss's MSE, plus L_vlb with
        --learn-sigma, where only the variance output gets the L_vlb gradient (the mean prediction detached,
        as official; L_vlb = E_t[L_t], i.e. IDDPM's L_hybrid with lambda = 1/T). Returns (loss, metrics)."""
        mse, out, x_t, t = common.diffusion_loss(net, x0, self.alphas_cumprod, y, null_label=null_label,
                                                 label_dropout=label_dropout, pred=pred, generator=generator)
        metrics = {"mse": mse.mean().detach()}
        if not learn_sigma:
            return mse.mean(), metrics
        C = x0.shape[1]
        x0_hat, _ = common.pred_to_x0_eps(out[:, :C].detach(), x_t,
                                          self.alphas_cumprod[t.to(self.alphas_cumprod.device)], pred)
        vb = self.vlb_terms(x0, x_t, t, x0_hat, out[:, C:])
        metrics["vb"] = vb.mean().detach()
        return (mse + vb).mean(), metrics


# =====================================================================================================
# training
# =====================================================================================================


def alphas_cumprod(cfg: DiTConfig) -> torch.Tensor:
    """(T,) float64 alpha-bar table of the config's schedule (official DiT: linear 1e-4 -> 0.02, T = 1000)."""
    return common.make_alphas_cumprod(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end)


def diffusion_net(model: DiT, cfg: DiTConfig, class_names=None) -> common.DiffusionNet:
    """The DiT as the samplers see it, with the run's grid settings as its sampling defaults."""
    return common.DiffusionNet(model, alphas_cumprod(cfg), cfg.img_size, cfg.pred, model.out_channels > 3,
                               model.num_classes, model.null_class, class_names,
                               common.grid_settings(cfg))


def config_from_checkpoint(ckpt: dict) -> DiTConfig:
    saved = {OLD_NAMES.get(k, k.lower()): v for k, v in ckpt["config"].items()}
    return common.config_from_dict(DiTConfig, saved)


def load(path, device="cpu", use_ema: bool = True):
    """A dit.py run (its folder or ckpt.pt) -> (DiffusionNet with the EMA weights, config, checkpoint)."""
    return common.load_run(path, "dit", config_from_checkpoint, build_model, diffusion_net, device, use_ema)


def train_step(model: DiT, opt: torch.optim.Optimizer, diffusion: Diffusion, x, y, cfg: DiTConfig,
               generator: Optional[torch.Generator] = None, net: Optional[nn.Module] = None) -> dict:
    """One optimizer step (loss -> backward -> AdamW); `net` is the DDP/compiled wrapper when there is one."""
    with common.autocast(x.device, cfg.bf16):
        loss, metrics = diffusion.loss(net or model, x, y, model.null_class, cfg.label_dropout,
                                       cfg.learn_sigma, cfg.pred, generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}


def train(cfg: DiTConfig, resume: Optional[str] = None) -> Path:
    check_config(cfg)
    dist = common.setup_ddp(cfg.device)
    device = dist.device
    data = common.load_dataset(cfg.dataset, root=cfg.data_root, image_size=cfg.img_size)
    total = cfg.steps or math.ceil(cfg.epochs * len(data.images) / cfg.batch_size)
    run = common.Run("dit", cfg, total, dist, resume, config_from_checkpoint, MODEL_FIELDS)
    num_classes = 0 if cfg.uncond else data.num_classes

    common.seed_everything(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg, num_classes).to(device)
    ema = common.make_ema(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, **common.fused_adam(device))
    diffusion = Diffusion(alphas_cumprod(cfg), device)
    if run.ckpt is not None:
        model.load_state_dict(run.ckpt["model"])
        ema.load_state_dict(run.ckpt["ema"])
        opt.load_state_dict(run.ckpt["opt"])
    net = common.wrap_ddp(common.maybe_compile(model, cfg.compile), dist)
    if dist.is_main:
        print(f"DiT ({cfg.model or 'custom'}: D={cfg.width}, depth {cfg.depth}, {cfg.heads} heads, patch "
              f"{cfg.patch}, {cfg.adaln}): {num_params(model):,} parameters ({num_params(model, True):,} "
              f"trainable) | {cfg.dataset}: {len(data.images)} images, {num_classes or 'no'} classes | "
              f"{total} steps | device {device} x {dist.world_size} | run {run.dir}")
        print(param_table(cfg, num_classes))
        print("config:", json.dumps(dataclasses.asdict(cfg)))

    def state(step):
        return {"kind": "dit", "config": dataclasses.asdict(cfg), "num_classes": num_classes,
                "class_names": data.class_names if num_classes else None, "model": model.state_dict(),
                "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step}

    per_rank = cfg.batch_size // dist.world_size
    model.train()
    for step in range(run.start, total):
        x, y = common.get_batch(data, step, per_rank, cfg.seed, flip=cfg.flip, rank=dist.rank,
                                world_size=dist.world_size)
        x, y = x.to(device), (y.to(device) if num_classes else None)
        metrics = train_step(model, opt, diffusion, x, y, cfg,
                             common.step_generator(cfg.seed, step, dist.rank, device), net)
        common.ema_update(ema, model, cfg.ema_decay)
        run.after_step(step + 1, metrics, state, lambda: diffusion_net(ema, cfg, state(0)["class_names"]))
    common.cleanup_ddp()
    return run.dir


# =====================================================================================================
# command line
# =====================================================================================================


def preset_config(known) -> DiTConfig:
    """The defaults of the train flags (without --resume): the --preset's and --model's."""
    return get_dit_config(preset=known.preset or "cifar10", **({"model": known.model} if known.model else {}))


def parse_train_args(argv) -> tuple[DiTConfig, Optional[str]]:
    return common.parse_train_args(argv, "dit.py [train]", "Train a DiT. Every DiTConfig field is a flag.",
                                   "dit", config_from_checkpoint, preset_config, check_config, PRESETS)


def load_for_sampling(args):
    model, cfg, ckpt = load(args.ckpt, common.pick_device(args.device), use_ema=not args.no_ema)
    return model, common.run_folder(args.ckpt), ckpt["step"], cfg.dataset


COMMANDS = common.diffusion_commands("dit.py", "a DiT", lambda argv: train(*parse_train_args(argv)),
                                     {"--ckpt": "a dit.py run: its folder or RUN/ckpt.pt"}, load_for_sampling)


def main(argv=None) -> None:
    common.dispatch(sys.argv[1:] if argv is None else argv, "dit.py", COMMANDS)


if __name__ == "__main__":
    common.run_cli(main)
