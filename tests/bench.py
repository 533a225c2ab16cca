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
            **diamond_large_run_estimate(train["train_gflop_s"] * 1e9, sec32)}


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
