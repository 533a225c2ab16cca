"""`make bench`: speed of every model, as ratios inside one run (reported, never asserted).

For each model: training throughput (img/s or frames/s), achieved GFLOP/s (analytic FLOPs from
torch.utils.flop_counter; one training step = 3x the forward FLOPs) and its ratio to the rate of
`torch.mm` on 2048x2048 fp32 measured in the same run (the MFU of this machine), sampling time per image
per network evaluation, and peak memory. Each model runs in its own subprocess so its peak memory is its
own. On a GPU the same script runs in bf16. Writes bench.json.

    python tests/bench.py                 # everything
    python tests/bench.py --only dit      # one model
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
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


def mm_gflops(n=2048):
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    return 2 * n ** 3 / timeit(lambda: a @ b, warmup=3, min_time=2.0) / 1e9


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


def train_rate(model, loss_fn, batch, params=None):
    """Items/s of full optimizer steps, and forward FLOPs per item."""
    opt = torch.optim.Adam(params or model.parameters(), lr=1e-4)

    def step():
        with autocast():
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec = timeit(step)
    with torch.no_grad():
        flops = forward_flops(loss_fn) / batch
    return batch / sec, flops


# ----------------------------------------------------------------------------------------------------
# one function per model: returns a dict of measurements


def bench_ddpm():
    import ddpm
    torch.manual_seed(0)
    cfg = ddpm.PRESETS["cifar10"]
    model = ddpm.DDPM(cfg).to(DEVICE)
    B = 16 if DEVICE.type == "cpu" else 128
    x = torch.randn(B, 3, 32, 32, device=DEVICE)
    rate, flops = train_rate(model, lambda: model(x), B)
    model.eval()
    t = torch.full((B,), 500.0, device=DEVICE)
    with torch.no_grad(), autocast():
        nfe_sec = timeit(lambda: model.net(x, t), min_time=2.0)
    return {"model": "ddpm (paper CIFAR-10 U-Net)", "params_M": ddpm.num_params(model.net) / 1e6, "batch": B,
            "train_items_s": rate, "unit": "img", "fwd_gflop_per_item": flops / 1e9,
            "sample_ms_per_img_per_nfe": 1e3 * nfe_sec / B}


def bench_dit():
    import dit
    torch.manual_seed(0)
    cfg = dit.get_dit_config(DATASET="shapes")  # the CIFAR default: width 384, depth 6, 6 heads, patch 4
    model = dit.build_model(cfg, num_classes=10).to(DEVICE)
    diffusion = dit.Diffusion(cfg.TIMESTEPS, cfg.BETA_START, cfg.BETA_END, device=DEVICE)
    B = 32 if DEVICE.type == "cpu" else 256
    x, y = torch.randn(B, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (B,), device=DEVICE)
    loss = lambda: diffusion.loss(model, x, y, model.null_class, cfg.CLASS_DROPOUT, cfg.LEARN_SIGMA)[0]
    rate, flops = train_rate(model, loss, B)
    model.eval()
    t = torch.full((B,), 500, device=DEVICE)
    with torch.no_grad(), autocast():
        nfe_sec = timeit(lambda: model(x, t, y), min_time=2.0)
    return {"model": "dit (CIFAR default, 384x6, patch 4)", "params_M": dit.num_params(model) / 1e6, "batch": B,
            "train_items_s": rate, "unit": "img", "fwd_gflop_per_item": flops / 1e9,
            "sample_ms_per_img_per_nfe": 1e3 * nfe_sec / B}


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
    rate, flops = train_rate(den, lambda: den.loss(obs, act, mask)[0], B)
    sampler = diamond.EulerSampler(den, num_steps_denoising=3)
    with autocast():
        sec1 = timeit(lambda: sampler.sample(obs[:1, :K], act[:1, :K]), min_time=2.0)
    # One actor-critic batch of imagination at this size: 32 envs x horizon 15 x 3 NFE. Measured on a
    # batch of 32 next-frame samples, times 15.
    with autocast():
        sec32 = timeit(lambda: sampler.sample(obs[:, :K].repeat(4, 1, 1, 1, 1)[:32], act[:, :K].repeat(4, 1)[:32]),
                       min_time=1.0, min_iters=1)
    env = diamond.AtariVecEnv("Breakout-v5", num_envs=1, obs_size=64, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    n_env = 300
    t0 = time.perf_counter()
    for _ in range(n_env):
        env.step(torch.as_tensor(rng.integers(0, env.num_actions, 1)))
    env_rate = n_env / (time.perf_counter() - t0)
    return {"model": "diamond denoiser (official size, 4.4M)", "params_M": sum(p.numel() for p in den.parameters()) / 1e6,
            "batch": B, "train_items_s": rate, "unit": "frame", "fwd_gflop_per_item": flops / 1e9,
            "sample_ms_per_img_per_nfe": 1e3 * sec1 / 3,
            "extra_next_frame_3_euler_ms": 1e3 * sec1, "extra_imagination_batch_32x15_s": 15 * sec32,
            "extra_imagination_steps_s": 32 / sec32, "extra_env_steps_s": env_rate}


BENCHES = {"ddpm": bench_ddpm, "dit": bench_dit, "diamond": bench_diamond}


def run_one(name):
    torch.set_float32_matmul_precision("high")
    mm = mm_gflops()
    r = BENCHES[name]()
    for k, v in list(r.items()):
        if k == "train_items_s":
            r["train_gflop_s"] = 3 * r["fwd_gflop_per_item"] * v
            r["ratio_to_mm"] = r["train_gflop_s"] / mm
    r["mm_gflop_s"] = mm
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
    info = {"device": str(DEVICE), "bf16": BF16, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "results": results}
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    print(f"\nwrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
