"""`make bench`: speed of every model, as ratios inside one run (reported, never asserted).

For each model: training throughput (img/s or frames/s), achieved GFLOP/s (analytic FLOPs from
torch.utils.flop_counter; one training step = 3x the forward FLOPs) and its ratio to the rate of
`torch.mm` on 2048x2048 fp32, timed in turns with the training step (the MFU of this machine), sampling time per image
per network evaluation, and peak memory. Each model runs in its own subprocess so its peak memory is its
own. On a GPU the same script runs in bf16. Writes bench.json.

    python tests/bench.py                 # everything
    python tests/bench.py --only dit      # one model
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402  (the repo's, found through ROOT)
import dit  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16 = DEVICE.type == "cuda"


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, warmup=1, min_time=4.0, min_iters=3):
    """Median-free simple timer: warm up, then run until min_time and min_iters; seconds per call."""
    for _ in range(warmup):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < min_time:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n


def forward_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_mem_mb():
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=BF16)


def optimizer_step(params, loss_fn, opt_cls=torch.optim.Adam, lr=1e-4, after=None, **opt_kwargs):
    """A function doing one full training step: loss (autocast on GPU), backward, optimizer update, then
    `after()` if given (the EMA update of a training loop)."""
    opt = opt_cls([p for p in params if p.requires_grad], lr=lr, **opt_kwargs)

    def step():
        with autocast():
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after is not None:
            after()
    return step


def train_rate(model, loss_fn, batch, rounds=5, n=2048) -> dict:
    """Items/s of full optimizer steps (fused Adam where torch has it, as the training loops), forward FLOPs per
    item, and the training FLOP rate (3x forward) as a share of the n x n fp32 torch.mm rate. The step and the mm
    alternate for `rounds` rounds and each figure is a median over rounds, the share a median of per-round
    shares: this machine's speed drifts by 15% within minutes, so an mm timed once is no yardstick."""
    step = optimizer_step(model.parameters(), loss_fn, **common.fused_adam(DEVICE))
    with torch.no_grad():
        flops = forward_flops(loss_fn) / batch
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    mm = lambda: a @ b  # noqa: E731
    step(), mm(), mm()
    step_sec, mm_sec = [], []
    for _ in range(rounds):
        mm_sec.append(timeit(mm, warmup=0, min_time=0.5))
        step_sec.append(timeit(step, warmup=0, min_time=1.0, min_iters=1))
    share = [3 * flops * batch / t / (2 * n ** 3 / m) for t, m in zip(step_sec, mm_sec)]
    items_s = batch / statistics.median(step_sec)
    return {"train_items_s": items_s, "fwd_gflop_per_item": flops / 1e9, "train_gflop_s": 3 * flops * items_s / 1e9,
            "ratio_to_mm": statistics.median(share), "mm_gflop_s": 2 * n ** 3 / statistics.median(mm_sec) / 1e9}


# ----------------------------------------------------------------------------------------------------
# one function per model: returns a dict of measurements


def bench_ddpm():
    import ddpm
    torch.manual_seed(0)
    cfg = ddpm.PRESETS["cifar10"]
    model = ddpm.build_model(cfg).to(DEVICE)
    table = common.device_table(ddpm.alphas_cumprod(cfg), DEVICE)
    B = 16 if DEVICE.type == "cpu" else 128
    x = torch.randn(B, 3, 32, 32, device=DEVICE)
    train = train_rate(model, lambda: common.diffusion_loss(model, x, table)[0].mean(), B)
    model.eval()
    t = torch.full((B,), 500.0, device=DEVICE)
    with torch.no_grad(), autocast():
        nfe_sec = timeit(lambda: model(x, t), min_time=2.0)
    return {"model": "ddpm (paper CIFAR-10 U-Net)", "params_M": ddpm.num_params(model) / 1e6, "batch": B,
            **train, "unit": "img",
            "sample_ms_per_img_per_nfe": 1e3 * nfe_sec / B, **ab_ddpm(B)}


def bench_dit():
    torch.manual_seed(0)
    cfg = dit.get_dit_config(dataset="shapes")  # the CIFAR default: width 384, depth 6, 6 heads, patch 4
    model = dit.build_model(cfg, num_classes=10).to(DEVICE)
    diffusion = dit.Diffusion(dit.alphas_cumprod(cfg), DEVICE)
    B = 32 if DEVICE.type == "cpu" else 256
    x, y = torch.randn(B, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (B,), device=DEVICE)
    loss = lambda: diffusion.loss(model, x, y, model.null_class, cfg.label_dropout, cfg.learn_sigma)[0]
    train = train_rate(model, loss, B)
    model.eval()
    t = torch.full((B,), 500, device=DEVICE)
    with torch.no_grad(), autocast():
        nfe_sec = timeit(lambda: model(x, t, y), min_time=2.0)
    return {"model": "dit (CIFAR default, 384x6, patch 4)", "params_M": dit.num_params(model) / 1e6, "batch": B,
            **train, "unit": "img",
            "sample_ms_per_img_per_nfe": 1e3 * nfe_sec / B, **ab_dit(B)}


def bench_diamond():
    import numpy as np
    import diamond
    torch.manual_seed(0)
    num_actions, K = 4, 4
    den = diamond.EDMPreconditioner(diamond.DiffusionUNet(num_actions)).to(DEVICE)  # official size: [64]*4
    B = 8 if DEVICE.type == "cpu" else 64
    obs = torch.rand(B, K + 1, 3, 64, 64, device=DEVICE) * 2 - 1
    act = torch.randint(0, num_actions, (B, K + 1), device=DEVICE)
    mask = torch.ones(B, K + 1, dtype=torch.bool, device=DEVICE)
    train = train_rate(den, lambda: den.loss(obs, act, mask)[0], B)
    sampler = diamond.DiffusionSampler(den, num_steps_denoising=3)
    with autocast():
        sec1 = timeit(lambda: sampler.sample(obs[:1, :K], act[:1, :K]), min_time=2.0)
    # One actor-critic batch of imagination at this size: 32 envs x horizon 15 x 3 NFE. Measured on a
    # batch of 32 next-frame samples, times 15.
    with autocast():
        sec32 = timeit(lambda: sampler.sample(obs[:, :K].repeat(4, 1, 1, 1, 1)[:32], act[:, :K].repeat(4, 1)[:32]),
                       min_time=1.0, min_iters=1)
    env = diamond.VecEnv("Breakout-v5", num_envs=1, obs_size=64, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    n_env = 300
    t0 = time.perf_counter()
    for _ in range(n_env):
        env.step(torch.as_tensor(rng.integers(0, env.num_actions, 1)))
    env_rate = n_env / (time.perf_counter() - t0)
    return {"model": "diamond denoiser (official size, 4.4M)", "params_M": sum(p.numel() for p in den.parameters()) / 1e6,
            "batch": B, **train, "unit": "frame",
            "sample_ms_per_img_per_nfe": 1e3 * sec1 / 3,
            "extra_next_frame_3_euler_ms": 1e3 * sec1, "extra_imagination_batch_32x15_s": 15 * sec32,
            "extra_imagination_steps_s": 32 / sec32, "extra_env_steps_s": env_rate,
            **diamond_large_run_estimate(train["train_gflop_s"] * 1e9, sec32), **ab_diamond(B)}


def diamond_run_flops(preset: str) -> tuple[dict, float]:
    """Analytic FLOPs of a full run of a preset (its schedule and sizes; forward FLOPs of each network counted at
    batch 1, training = 3x forward), by part, and the denoiser's forward FLOPs per frame and network call."""
    import diamond
    cfg = diamond.DiamondConfig(preset)
    agent = diamond.Agent(cfg, num_actions=4).to(DEVICE)
    K, H, B, NB = cfg.num_steps_conditioning, cfg.imagination_horizon, cfg.batch_size, cfg.imagination_batch_size
    frame = torch.zeros(1, 1, 3, cfg.obs_size, cfg.obs_size, device=DEVICE)
    act = torch.zeros(1, K + 1, dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        f_den = forward_flops(lambda: agent.denoiser.loss(frame.expand(1, K + 1, -1, -1, -1), act,
                                                           torch.ones(1, K + 1, dtype=torch.bool, device=DEVICE)))
        f_rew_end = forward_flops(lambda: agent.rew_end_model.predict_rew_end(frame, act[:, :1], frame))
        f_ac = forward_flops(lambda: agent.actor_critic(frame[:, 0]))
    n = {m: getattr(cfg, f"{m}_steps_first_epoch") + (cfg.num_epochs - 1) * getattr(cfg, f"{m}_steps_per_epoch")
         for m in ("denoiser", "rew_end", "actor_critic")}
    return {"denoiser_training": n["denoiser"] * B * diamond.DENOISER_SEGMENT_EXTRA * 3 * f_den,
            "rew_end_training": n["rew_end"] * B * (H + K - 1) * 3 * f_rew_end,
            "imagination_next_frames": n["actor_critic"] * NB * H * cfg.num_sampling_steps * f_den,
            "imagination_rew_end_and_actor_critic": n["actor_critic"] * NB * H * (f_rew_end + 3 * f_ac)}, f_den


PAPER_LARGE_RUN_DAYS = 3  # paper: ~2.9 days per game on one RTX 4090 (quoted in eloialonso/diamond issue #1)


def diamond_large_run_estimate(train_flop_s: float, imagined_step_sec: float) -> dict:
    """Full `large` (the paper's Atari 100k schedule and sizes) and `medium` (one consumer GPU) runs from this
    run's measurements: analytic FLOPs (diamond_run_flops) and an estimated wall time, imagination's next frames
    at the FLOP rate of the measured official-size imagined step (32 envs x 3 network calls), every other part at
    the measured denoiser-training FLOP rate. Env stepping and Python overhead are left out: a lower bound.
    `medium_hours_at_paper_rate`: medium at the FLOP rate that the paper's ~3 days imply for large."""
    out, totals = {}, {}
    for preset in ("large", "medium"):
        flop, f_den = diamond_run_flops(preset)
        total = totals[preset] = sum(flop.values())
        if preset == "large":
            frame_flop_s = 32 * 3 * f_den / imagined_step_sec
            paper_flop_s = total / (PAPER_LARGE_RUN_DAYS * 86400)
            out["extra_large_run_paper_3_days_implies_tflop_s"] = paper_flop_s / 1e12
        seconds = (flop["imagination_next_frames"] / frame_flop_s
                   + (total - flop["imagination_next_frames"]) / train_flop_s)
        out.update({f"extra_{preset}_run_pflop": total / 1e15,
                    f"extra_{preset}_run_pflop_share": {k: round(v / total, 3) for k, v in flop.items()},
                    f"extra_{preset}_run_estimated_hours_here": seconds / 3600})
    out["extra_medium_run_hours_at_paper_rate"] = totals["medium"] / paper_flop_s / 3600
    return out


# ----------------------------------------------------------------------------------------------------
# A/B against the reference implementations, same weights, same numerics, alternating timed rounds


def ab_rates(steps: dict, batch: int, rounds: int) -> tuple:
    """Time named training-step functions ({"ours": f, <reference>: g}) in alternating rounds, so that drift in
    machine load hits both alike; the order flips every round (A B, B A, ...), so going first or second favours
    neither. Returns ({name: items/s at its median round}, speedup of "ours"), the speedup being the median over
    rounds of t_reference / t_ours within the same round (paired, robust to drift)."""
    for step in steps.values():
        step(), step()  # warm-up (allocator, oneDNN primitive caches)
    times = {name: [] for name in steps}
    for i in range(rounds):
        for name, step in list(steps.items())[::1 if i % 2 == 0 else -1]:
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    ref = next(name for name in steps if name != "ours")
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    speedup = median([r / o for r, o in zip(times[ref], times["ours"])])
    return {name: batch / median(t) for name, t in times.items()}, speedup


def perturb_(model, std=0.02):
    """Move every trainable weight off its (often zero) initial value, as after some training."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def official_dit_forward(m, x, t, y, train: bool):
    """DiT forward in the op order of the official models.py and the timm PatchEmbed / Attention / Mlp it uses,
    run on the parameters of our DiT `m` (same names). Label dropout happens here, as in the official forward.
    """
    def linear(layer, h):
        return torch.nn.functional.linear(h, layer.weight, layer.bias)

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def attention(a, h):
        B, N, C = h.shape
        q, k, v = linear(a.qkv, h).reshape(B, N, 3, a.heads, C // a.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        return torch.nn.functional.dropout(linear(a.proj, o.transpose(1, 2).reshape(B, N, C)), 0.0, train)

    def mlp(f, h):
        h = torch.nn.functional.dropout(torch.nn.functional.gelu(linear(f.fc1, h), approximate="tanh"), 0.0, train)
        return torch.nn.functional.dropout(linear(f.fc2, h), 0.0, train)

    h = m.x_embedder.proj(x).flatten(2).transpose(1, 2) + m.pos_embed
    if train:
        y = torch.where(torch.rand(y.shape[0], device=y.device) < 0.1, m.num_classes, y)
    c = m.t_embedder.mlp(dit.timestep_embedding(t)) + m.y_embedder.embedding_table(y)
    for b in m.blocks:
        shift1, scale1, gate1, shift2, scale2, gate2 = b.adaLN_modulation(c).chunk(6, dim=1)
        h = h + gate1.unsqueeze(1) * attention(b.attn, modulate(b.norm1(h), shift1, scale1))
        h = h + gate2.unsqueeze(1) * mlp(b.mlp, modulate(b.norm2(h), shift2, scale2))
    shift, scale = m.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    h = m.final_layer.linear(modulate(m.final_layer.norm_final(h), shift, scale))
    N, G, p, C = h.shape[0], m.grid, m.patch, m.out_channels
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(N, G, G, p, p, C))
    return h.reshape(N, C, G * p, G * p)


def ab_dit(B: int) -> dict:
    """Our DiT training step against the official op order, CIFAR default config. A step is what each train.py
    loop does: loss (official training_losses: float64 numpy tables gathered per call, mean-flat MSE), backward,
    AdamW (lr 1e-4, no weight decay), EMA update (official update_ema: mul_ then add_ per parameter; ours:
    common.ema_update, as dit.py)."""
    import copy
    import numpy as np
    torch.manual_seed(0)
    cfg = dit.get_dit_config(dataset="shapes")
    ours = dit.build_model(cfg, num_classes=10).to(DEVICE)
    perturb_(ours)
    ref = copy.deepcopy(ours)
    diffusion = dit.Diffusion(dit.alphas_cumprod(cfg), DEVICE)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    sqrt_abar, sqrt_1m_abar = np.sqrt(abar), np.sqrt(1.0 - abar)
    x, y = torch.randn(B, 3, 32, 32, device=DEVICE).clamp(-1, 1), torch.randint(0, 10, (B,), device=DEVICE)
    with torch.no_grad():
        t = torch.randint(0, 1000, (B,), device=DEVICE)
        diff = (ours.eval()(x, t, y) - official_dit_forward(ref.eval(), x, t, y, False)).abs().max().item()
    ours.train(), ref.train()

    ref_ema, ours_ema = common.make_ema(ref), common.make_ema(ours)

    @torch.no_grad()
    def official_update_ema(decay=0.9999):
        ema_params = dict(ref_ema.named_parameters())
        for name, param in ref.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    def extract(arr, t):  # the official _extract_into_tensor
        return torch.from_numpy(arr).to(t.device)[t].float()[:, None, None, None]

    def ref_loss():
        t = torch.randint(0, 1000, (B,), device=DEVICE)
        noise = torch.randn_like(x)
        x_t = extract(sqrt_abar, t) * x + extract(sqrt_1m_abar, t) * noise
        return ((noise - official_dit_forward(ref, x_t, t, y, True)) ** 2).mean(dim=[1, 2, 3]).mean()

    # weight_decay=0 on both sides: official train.py and dit.py's default (AdamW's own default is 0.01)
    rates, speedup = ab_rates({"official": optimizer_step(ref.parameters(), ref_loss, torch.optim.AdamW,
                                                          after=official_update_ema, weight_decay=0.0),
                               "ours": optimizer_step(ours.parameters(),  # the optimizer of dit.py's loop
                                                      lambda: diffusion.loss(ours, x, y, ours.null_class, 0.1)[0],
                                                      torch.optim.AdamW, weight_decay=0.0,
                                                      after=lambda: common.ema_update(ours_ema, ours, 0.9999),
                                                      **common.fused_adam(DEVICE))}, B, rounds=25)
    return {"ab_reference": "official DiT op order (models.py + timm layers)", "ab_ours_items_s": rates["ours"],
            "ab_ref_items_s": rates["official"], "ab_speedup": speedup, "ab_max_abs_diff": diff}


def ab_ddpm(B: int) -> dict:
    """Our DDPM training step against diffusers' UNet2DModel in the google/ddpm-cifar10-32 configuration, with
    the loss of diffusers' train_unconditional example (DDPMScheduler.add_noise, F.mse_loss). Needs diffusers
    (not a dependency of this project): `pip install diffusers` to run this comparison."""
    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError:
        return {"ab_reference": "diffusers UNet2DModel: not installed (pip install diffusers to compare)"}
    import ddpm
    from test_ddpm import DIFFUSERS_CONFIG
    torch.manual_seed(0)
    ref = UNet2DModel(**DIFFUSERS_CONFIG, dropout=0.1).to(DEVICE)
    perturb_(ref)
    ours = ddpm.build_model(ddpm.PRESETS["cifar10"]).to(DEVICE)
    ours.load_state_dict(ddpm.convert_diffusers(ref.state_dict()), strict=True)
    table = common.device_table(ddpm.alphas_cumprod(ddpm.PRESETS["cifar10"]), DEVICE)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x = torch.randn(B, 3, 32, 32, device=DEVICE).clamp(-1, 1)
    with torch.no_grad():
        t = torch.randint(0, 1000, (B,), device=DEVICE)
        diff = (ours.eval()(x, t.float()) - ref.eval()(x, t).sample).abs().max().item()
    ours.train(), ref.train()

    def ref_loss():
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (B,), device=DEVICE)
        return torch.nn.functional.mse_loss(ref(sched.add_noise(x, noise, t), t).sample, noise)

    rates, speedup = ab_rates({"diffusers": optimizer_step(ref.parameters(), ref_loss, lr=2e-4),
                               "ours": optimizer_step(ours.parameters(),  # ddpm.py's loss and optimizer
                                                      lambda: common.diffusion_loss(ours, x, table)[0].mean(), lr=2e-4,
                                                      **common.fused_adam(DEVICE))}, B, rounds=20)
    return {"ab_reference": f"diffusers {__import__('diffusers').__version__} UNet2DModel",
            "ab_ours_items_s": rates["ours"], "ab_ref_items_s": rates["diffusers"], "ab_speedup": speedup,
            "ab_max_abs_diff": diff}


def official_diamond_inner_forward(inner, noisy_next_obs, c_noise, obs, act):
    """InnerModel.forward in the op order of the official Atari code (eloialonso/diamond src/models/blocks.py,
    diffusion/inner_model.py), run on the parameters of our DiffusionUNet `inner` (same names). Torch modules the
    official code calls as they are (convs, Linear, Embedding, GroupNorm, Fourier features) are ours; AdaGroupNorm,
    self-attention, ResBlock(s) and the U-Net are written out in the official order."""
    F = torch.nn.functional

    def ada_group_norm(m, x, cond):  # official: normalise first, then linear(cond) (ours: linear, then normalise)
        x = F.group_norm(x, m.num_groups, eps=1e-5)
        scale, shift = m.linear(cond)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift

    def self_attention(a, x):  # official: q, k, v made contiguous, explicit softmax(q k^T / sqrt(d)) v (ours: SDPA)
        n, c, h, w = x.shape
        x = a.norm(x)
        qkv = a.qkv_proj(x).view(n, 3 * a.n_head, c // a.n_head, h * w).transpose(2, 3).contiguous()
        q, k, v = qkv.chunk(3, dim=1)
        att = F.softmax((q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1)), dim=-1)
        return x + a.out_proj((att @ v).transpose(2, 3).reshape(n, c, h, w))

    def res_blocks(blocks, x, cond, to_cat=None):
        outputs = []
        for i, b in enumerate(blocks.resblocks):
            x = x if to_cat is None else torch.cat((x, to_cat[i]), dim=1)
            r = b.proj(x)
            x = b.conv1(F.silu(ada_group_norm(b.norm1, x, cond)))
            x = b.conv2(F.silu(ada_group_norm(b.norm2, x, cond)))
            x = x + r
            x = x if isinstance(b.attn, torch.nn.Identity) else self_attention(b.attn, x)
            outputs.append(x)
        return x, outputs

    def unet(u, x, cond):  # the official also returns the level outputs (unused by InnerModel): not kept here
        h, w = x.shape[-2:]
        m = 2 ** u.num_down
        x = F.pad(x, (0, math.ceil(w / m) * m - w, 0, math.ceil(h / m) * m - h))
        d_outputs = []
        for block, down in zip(u.d_blocks, u.downsamples):
            x_down = down(x)
            x, outs = res_blocks(block, x_down, cond)
            d_outputs.append((x_down, *outs))
        x, _ = res_blocks(u.mid_blocks, x, cond)
        for block, up, skip in zip(u.u_blocks, u.upsamples, reversed(d_outputs)):
            x, _ = res_blocks(block, up(x), cond, skip[::-1])
        return x[..., :h, :w]

    cond = inner.cond_proj(inner.noise_emb(c_noise) + inner.act_emb(act))
    x = unet(inner.unet, inner.conv_in(torch.cat((obs, noisy_next_obs), dim=1)), cond)
    return inner.conv_out(F.silu(inner.norm_out(x)))


def official_diamond_conditioners(den, sigma):
    """Denoiser.compute_conditioners: (c_in, c_out, c_skip) shaped (B, 1, 1, 1), c_noise (B,)."""
    sigma = (sigma ** 2 + den.sigma_offset_noise ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + den.sigma_data ** 2).sqrt()
    c_skip = den.sigma_data ** 2 / (sigma ** 2 + den.sigma_data ** 2)
    c_out = sigma * c_skip.sqrt()
    return c_in[:, None, None, None], c_out[:, None, None, None], c_skip[:, None, None, None], sigma.log() / 4


def official_diamond_loss(den, obs, act, mask):
    """Denoiser.forward (the training loss) of the official Atari code, op for op, on our EDMPreconditioner `den`:
    per autoregressive step, sigma from the clipped log-normal, offset noise then noise (apply_noise, global RNG:
    the same draws as den.loss without a generator), conditioners, model output, MSE on the unpadded targets,
    then the next step conditions on the quantised prediction (wrap_model_output: uint8 truncation)."""
    K = den.inner_model.conv_in.in_channels // obs.size(2) - 1
    all_obs, loss = obs.clone(), 0
    for i in range(obs.size(1) - K):
        prev_obs, next_obs = all_obs[:, i:K + i], all_obs[:, K + i]
        b, t, c, h, w = prev_obs.shape
        prev_obs = prev_obs.reshape(b, t * c, h, w)
        log_sigma = torch.randn(b, device=obs.device) * den.sigma_scale + den.sigma_loc  # sample_sigma_training
        sigma = log_sigma.exp().clip(den.sigma_min, den.sigma_max)
        offset_noise = den.sigma_offset_noise * torch.randn(b, c, 1, 1, device=obs.device)
        noisy_next_obs = next_obs + offset_noise + torch.randn_like(next_obs) * sigma[:, None, None, None]
        c_in, c_out, c_skip, c_noise = official_diamond_conditioners(den, sigma)
        rescaled_obs = prev_obs / den.sigma_data
        out = official_diamond_inner_forward(den.inner_model, noisy_next_obs * c_in, c_noise, rescaled_obs,
                                             act[:, i:K + i])
        target = (next_obs - c_skip * noisy_next_obs) / c_out
        m = mask[:, K + i]
        loss += torch.nn.functional.mse_loss(out[m], target[m])
        with torch.no_grad():
            d = c_skip * noisy_next_obs + c_out * out
            all_obs[:, K + i] = d.clamp(-1, 1).add(1).div(2).mul(255).byte().div(255).mul(2).sub(1)
    loss /= obs.size(1) - K
    return loss, {"loss_denoising": loss.detach()}


def official_diamond_adamw(model, lr, weight_decay, eps):
    """utils.configure_opt (minGPT): weights of Linear / Conv / LSTM decay, the rest not, each group sorted by
    parameter name; torch's default AdamW (no fused / foreach flag given)."""
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    decay_types = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.LSTMCell, torch.nn.LSTM)
    decay = set()
    for name in params:
        mod, _, pn = name.rpartition(".")
        is_weight = "bias" not in pn and (pn.endswith("weight") or pn.startswith("weight_"))
        if is_weight and isinstance(modules[mod], decay_types):
            decay.add(name)
    groups = [{"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
              {"params": [params[n] for n in sorted(params.keys() - decay)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, eps=eps)


def ab_diamond(B: int, rounds: int = 15) -> dict:
    """Our DIAMOND denoiser training step against the official op order, official size, on segments of
    K + DENOISER_SEGMENT_EXTRA frames (official num_autoregressive_steps 1: 2 predicted frames per segment; the
    rates count predicted frames). Both sides start from the same perturbed weights and do what each trainer does
    per update, lr 1e-4, weight decay 1e-2 (same parameter groups), warm-up 100, grad clip 1.0:
    official (trainer.train_component): loss, backward, clip_grad_norm_, AdamW.step (torch's default
    implementation), zero_grad, LambdaLR step; ours: den.loss then diamond.optimizer_step (zero_grad, backward,
    clip, finiteness checks, AdamW.step, fused where torch has it, warm-up step). The official trainer also wraps
    the world model in torch.compile (compile_wm): neither side is compiled here."""
    import copy
    import diamond
    torch.manual_seed(0)
    num_actions, K, n = 4, 4, diamond.DENOISER_SEGMENT_EXTRA
    ours = diamond.EDMPreconditioner(diamond.DiffusionUNet(num_actions)).to(DEVICE)
    perturb_(ours)  # conv_out, every conv2 and the attention out_proj start at zero
    ref = copy.deepcopy(ours)
    obs = torch.rand(B, K + n, 3, 64, 64, device=DEVICE) * 2 - 1
    act = torch.randint(0, num_actions, (B, K + n), device=DEVICE)
    mask = torch.ones(B, K + n, dtype=torch.bool, device=DEVICE)
    with torch.no_grad():  # network outputs F on one noised batch, eval mode
        sigma = ours.sample_sigma(B, DEVICE)
        x_noisy = obs[:, K] + torch.randn_like(obs[:, K]) * sigma[:, None, None, None]
        f_ours = ours.eval()(x_noisy, sigma, obs[:, :K], act[:, :K])[0]
        c_in, _, _, c_noise = official_diamond_conditioners(ref, sigma)
        f_ref = official_diamond_inner_forward(ref.eval().inner_model, x_noisy * c_in, c_noise,
                                               obs[:, :K].flatten(1, 2) / ref.sigma_data, act[:, :K])
        diff = (f_ours - f_ref).abs().max().item()
        # and the whole loss with the same random draws (sigma, offset, noise; the second prediction conditions
        # on the quantised first): an error in sampling, conditioners or quantisation would show here
        torch.manual_seed(1)
        loss_ours = ours.loss(obs, act, mask)[0].item()
        torch.manual_seed(1)
        loss_diff = abs(loss_ours - official_diamond_loss(ref, obs, act, mask)[0].item())
    ours.train(), ref.train()

    opt_ref = official_diamond_adamw(ref, 1e-4, 1e-2, 1e-8)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(opt_ref, lambda s: 1 if s >= 100 else s / 100)
    opt_ours = diamond.make_optimizer(ours, 1e-4, 1e-2)
    sched_ours, steps = diamond.make_warmup(opt_ours, 100), [0]

    def ref_step():  # autocast (GPU only) on both sides, as every A/B here; neither trainer uses it
        with autocast():
            loss = official_diamond_loss(ref, obs, act, mask)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt_ref.step()
        opt_ref.zero_grad()
        sched_ref.step()

    def ours_step():
        with autocast():
            loss = ours.loss(obs, act, mask)[0]
        steps[0] += 1
        diamond.optimizer_step("denoiser", loss, ours, opt_ours, sched_ours, 1.0, steps[0])

    rates, speedup = ab_rates({"official": ref_step, "ours": ours_step}, B * n, rounds=rounds)
    return {"ab_reference": "official DIAMOND op order (denoiser.py, inner_model.py, blocks.py, configure_opt)",
            "ab_ours_items_s": rates["ours"], "ab_ref_items_s": rates["official"], "ab_speedup": speedup,
            "ab_max_abs_diff": diff, "extra_ab_same_draws_loss_abs_diff": loss_diff}


BENCHES = {"ddpm": bench_ddpm, "dit": bench_dit, "diamond": bench_diamond}


def run_one(name):
    torch.set_float32_matmul_precision("high")
    r = BENCHES[name]()
    r["peak_mem_mb"] = peak_mem_mb()
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(BENCHES), help="run a single model in this process")
    p.add_argument("--out", default=os.path.join(ROOT, "bench.json"))
    args = p.parse_args()
    if args.only:
        print("BENCH " + json.dumps(run_one(args.only)), flush=True)
        return
    results = []
    for name in BENCHES:
        out = subprocess.run([sys.executable, __file__, "--only", name], capture_output=True, text=True, cwd=ROOT)
        lines = [l for l in out.stdout.splitlines() if l.startswith("BENCH ")]
        if out.returncode or not lines:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        results.append(json.loads(lines[-1][6:]))
        r = results[-1]
        print(f"{r['model']}: {r.get('train_items_s', 0):.2f} {r.get('unit', '')}/s train, "
              f"ratio to torch.mm {r.get('ratio_to_mm', 0):.2f}", flush=True)
    header = f"{'model':42s} {'train/s':>9s} {'GFLOP/s':>9s} {'vs mm':>6s} {'ms/img/NFE':>11s} {'peak MB':>8s}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(f"{r['model']:42s} {r.get('train_items_s', float('nan')):9.2f} {r.get('train_gflop_s', float('nan')):9.1f} "
              f"{r.get('ratio_to_mm', float('nan')):6.2f} {r.get('sample_ms_per_img_per_nfe', float('nan')):11.2f} "
              f"{r['peak_mem_mb']:8.0f}")
        for k, v in r.items():
            if k.startswith("extra_"):
                print(f"    {k[6:]}: {v}")
        if "ab_speedup" in r:
            print(f"    A/B vs {r['ab_reference']}: ours {r['ab_ours_items_s']:.2f} vs {r['ab_ref_items_s']:.2f} "
                  f"{r['unit']}/s (median rounds), paired speedup {r['ab_speedup']:.3f}x (outputs agree to "
                  f"{r['ab_max_abs_diff']:.1e})")
        elif "ab_reference" in r:
            print(f"    A/B: {r['ab_reference']}")
    info = {"device": str(DEVICE), "bf16": BF16, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "results": results}
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    print(f"\nwrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
