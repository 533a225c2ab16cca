"""Samplers, schedules, guidance and EDM pieces of common.py (sections 2-4).

1. Parity with diffusers 0.42.1 (tests/golden/schedulers.pt; see its `meta` and each run's `settings`): the stored
   runs drive a fake eps-model; we run common.py's samplers in float64 on our float64 alpha-bar table. What remains
   is diffusers' own float32 rounding, stored in the file (README `selfcheck`: ~1e-6 of |x| <= 5, 2e-5 after 1000
   DDPM steps), the same on every CPU: each tolerance is 2-12x the difference measured on it.
2. Statistics with an exact denoiser: for Gaussian data x0 ~ N(mu, s^2) (per dimension) the optimal prediction at
   every t is known in closed form, so each sampler driven by it must return the data's mean and std.
3. Guidance algebra, NFE counts, parameterisation adapters, t <-> sigma.
4. EDM preconditioning (Karras et al. 2022, Table 1; DIAMOND's offset noise, tests/golden/diamond_small.pt),
   Karras sigmas, log-normal training sigmas.
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
T = 1000


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / "schedulers.pt", weights_only=True)


# =====================================================================================================
# 1. parity with diffusers
# =====================================================================================================

class FakeEps:
    """The deterministic eps-model of schedulers.pt `meta/fake_eps`; records every t it is given."""

    def __init__(self):
        self.ts = []

    def __call__(self, x, t, y=None):
        assert t.shape == (x.shape[0],) and y is None
        self.ts.append(t[0].item())
        u = common.append_dims((t + 1) / 1000, x.dim())
        abc = torch.exp(-(0.1 * u + 9.95 * u ** 2))
        return (1 - abc).sqrt() * x / (0.25 * abc + 1 - abc) + 0.03 * torch.tanh(x) * torch.cos(
            common.append_dims(t, x.dim()) / 300)


def test_alpha_bar_tables(golden):
    for name in ("linear", "cosine"):
        ref = golden["schedules"][name]
        ours = common.make_alphas_cumprod(name, T)
        assert ours.dtype == torch.float64 and ours.shape == (T,)
        # diffusers' own float64 recomputation, and its float32 table (float32 rounding ~3e-7)
        assert (ours - ref["alphas_cumprod_f64"]).abs().max() < 1e-12
        assert (ours - ref["alphas_cumprod"].double()).abs().max() < 1e-6
    betas = common.cosine_betas(T)
    assert betas.max() <= common.MAX_BETA and betas.max() > 0.99  # the clamp is active at t = T-1
    assert torch.allclose(common.linear_betas(T)[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    with pytest.raises(ValueError, match="--schedule"):
        common.make_alphas_cumprod("quadratic", T)


def _run(golden, name, sampler, steps, *, to_vp=None, **options):
    """Run common.sample on the golden start z in float64; returns (final clamped, trajectory, model t list, nfe)."""
    net, traj = FakeEps(), []
    z = golden["z"].double()
    cb = (lambda i, x: traj.append(x)) if to_vp is None else (lambda i, x: traj.append(to_vp(i, x)))
    x, nfe = common.sample(net, z, common.make_alphas_cumprod("linear", T), sampler=sampler, steps=steps,
                           callback=cb, **options)
    run = golden["runs"][name]
    assert x.dtype == torch.float64 and x.shape == z.shape
    return x, torch.stack(traj), torch.tensor(net.ts, dtype=torch.float64), nfe, run


@pytest.mark.parametrize("name,spacing,eta", [("ddim50_eta0_leading", "leading", 0.0),
                                              ("ddim50_eta0_trailing", "trailing", 0.0),
                                              ("ddim50_eta1_leading", "leading", 1.0)])
def test_ddim_parity(golden, name, spacing, eta):
    # eta = 1: diffusers was given noise[i] at step i, drawn in order from one generator seeded 4321
    assert "4321" in golden["runs"][name]["settings"].get("noise_rule", "4321")
    gen = torch.Generator().manual_seed(4321)
    x, traj, ts, nfe, run = _run(golden, name, "ddim", 50, eta=eta, spacing=spacing, generator=gen)
    assert torch.equal(ts, run["model_t"]) and nfe == 50
    assert (traj - run["traj"].double()).abs().max() < 2e-5
    assert (traj[-1] - run["final"].double()).abs().max() < 2e-5
    assert torch.equal(x, traj[-1].clamp(-1, 1))


def test_dpmpp_2m_parity(golden):
    run = golden["runs"]["dpmpp2m_20"]
    sigmas = run["sigmas"].double()
    # common.sample integrates in the VE view; diffusers' trajectory is VP: x_vp = x / sqrt(1 + sigma^2)
    x, traj, ts, nfe, run = _run(golden, "dpmpp2m_20", "dpmpp", 20,
                                 to_vp=lambda i, x: x / math.sqrt(1 + sigmas[i + 1].item() ** 2))
    assert torch.allclose(ts, run["model_t"], rtol=0, atol=1e-9) and nfe == 20   # integer timesteps
    assert (traj - run["traj"].double()).abs().max() < 2e-5
    assert (traj[-1] - run["final"].double()).abs().max() < 2e-5


def test_euler_karras_parity(golden):
    run = golden["runs"]["euler_karras_10"]
    x, traj, ts, nfe, run = _run(golden, "euler_karras_10", "euler", 10)
    assert nfe == 10
    # diffusers derives its sigmas from the float32 alpha-bar table (up to 6e-5 relative from ours at low sigma)
    sigmas = common.karras_sigmas(10, *common.abar_to_sigma(common.make_alphas_cumprod("linear", T))[[0, -1]].tolist())
    assert torch.allclose(sigmas, run["sigmas"].double(), rtol=1e-4, atol=0) and sigmas[-1] == 0
    assert (ts - run["model_t"]).abs().max() < 1e-2   # fractional t by log-sigma interpolation
    # the trajectory lives in the VE view (|x| up to ~160), where the float32 sigmas of diffusers differ from ours
    # by up to 6e-5 relative: compare relative to 1 + |x|
    assert ((traj - run["traj"].double()).abs() / (1 + run["traj"].double().abs())).max() < 5e-5
    assert (traj[-1] - run["final"].double()).abs().max() < 2e-5
    # given diffusers' float32 table, t(sigma) agrees to float32 precision
    ac32 = golden["schedules"]["linear"]["alphas_cumprod"].double()
    t32 = common.sigma_to_t(run["sigmas"][:-1].double(), ac32)
    assert (t32 - run["model_t"]).abs().max() < 1e-4


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_1000_parity(golden, variance):
    name = f"ddpm1000_fixed_{variance}"
    settings = golden["runs"][name]["settings"]
    assert settings["clip_sample"] is False and settings["noise_seed"] == 1234
    gen = torch.Generator().manual_seed(1234)
    x, traj, ts, nfe, run = _run(golden, name, "ddpm", 1000, variance=variance, clip=False, generator=gen)
    assert torch.equal(ts, run["model_t"]) and nfe == 1000
    snaps = traj[[99 + 100 * k for k in range(10)]]        # x after the steps at t = 900, 800, ..., 0
    assert (snaps - run["snapshots_t900_to_t0"].double()).abs().max() < 1e-4
    assert (traj[-1] - run["final"].double()).abs().max() < 1e-4


def test_timesteps_spacings():
    assert common.timesteps(T, 50, "leading").tolist() == list(range(980, -1, -20))
    assert common.timesteps(T, 50, "trailing").tolist() == list(range(999, 0, -20))
    assert common.timesteps(T, T, "linspace").tolist() == list(range(999, -1, -1))
    for spacing in common.SPACINGS:
        for steps in (1, 7, 250):
            ts = common.timesteps(T, steps, spacing)
            assert len(ts) == steps and (ts.diff() < 0).all() and 0 <= ts.min() and ts.max() <= T - 1
    with pytest.raises(ValueError, match="--steps"):
        common.timesteps(T, 0)
    with pytest.raises(ValueError, match="--spacing"):
        common.timesteps(T, 10, "uniform")


# =====================================================================================================
# 2. exact denoiser for Gaussian data
# =====================================================================================================

# 8 dimensions (C=2, H=W=2), each with its own mean; two widths: UNIT std (the case where DDPM's fixed-large
# variance beta is the exact reverse variance, Ho et al. 2020 §3.2) and NARROW stds.
MU = torch.tensor([-0.3, -0.1, 0.0, 0.05, 0.1, 0.2, 0.3, -0.2], dtype=torch.float64).reshape(1, 2, 2, 2)
UNIT = torch.ones(1, 2, 2, 2, dtype=torch.float64)
NARROW = torch.tensor([0.3, 0.35, 0.4, 0.45, 0.5, 0.4, 0.3, 0.5], dtype=torch.float64).reshape(1, 2, 2, 2)


def gaussian_net(abar_table, std, pred="eps", learned_sigma=False):
    """The optimal predictor for x0 ~ N(MU, std^2) at VP level a = alpha-bar(t), written independently of
    common.py: E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu); alpha-bar at fractional t by
    linear interpolation of log sigma. learned_sigma: v chosen so that the DDPM sampler's interpolated variance is
    the exact reverse-step variance beta~ + c_x0^2 Var[x0 | x_t] (for the full T-step chain)."""
    log_sigma = 0.5 * ((1 - abar_table) / abar_table).log()
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar_table[:-1]])
    beta = 1 - abar_table / ac_prev

    def net(x, t, y=None):
        t = t.double()
        lo = t.floor().long().clamp(max=len(abar_table) - 2)
        ls = log_sigma[lo] + (t - lo) * (log_sigma[lo + 1] - log_sigma[lo])
        a = common.append_dims(1 / (1 + (2 * ls).exp()), 4)
        x0 = MU + a.sqrt() * std ** 2 / (a * std ** 2 + 1 - a) * (x - a.sqrt() * MU)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[pred]
        if not learned_sigma:
            return out
        i = t.round().long()
        assert torch.equal(t, i.double())
        b, ap = common.append_dims(beta[i], 4), common.append_dims(ac_prev[i], 4)
        bt = b * (1 - ap) / (1 - a)
        var = bt + (b * ap.sqrt() / (1 - a)) ** 2 * std ** 2 * (1 - a) / (a * std ** 2 + 1 - a)
        v = 2 * (var.log() - bt.log()) / (b.log() - bt.log()) - 1      # log var = (v+1)/2 log b + (1-v)/2 log bt
        return torch.cat([out, v.expand_as(out)], dim=1)
    return net


def start_noise(abar_table, std, z):
    """x_T from the exact marginal N(sqrt(a) mu, a s^2 + 1 - a) at t = T-1 rather than N(0, I), so that what
    remains is the sampler's own error."""
    a = abar_table[-1]
    return a.sqrt() * MU + (a * std ** 2 + 1 - a).sqrt() * z


@pytest.mark.parametrize("sampler,steps,options,tol_std", [
    # tolerances: about 1.5x the discretisation error measured with the exact denoiser (first order: DDIM, Euler;
    # second order: Heun, DPM-Solver++); a wrong coefficient gives errors of order 1
    ("ddim", 200, {}, 0.015),
    ("ddim", 200, {"spacing": "trailing"}, 0.015),
    ("euler", 200, {}, 0.02),
    ("heun", 50, {}, 0.01),
    ("dpmpp", 20, {}, 1e-3),
])
def test_deterministic_samplers_reproduce_gaussian(sampler, steps, options, tol_std):
    """Deterministic samplers with an affine denoiser are affine per dimension in x_T, so x_T at z = -1/2, 0, 1/2
    gives the output mean (z = 0) and std (x(1/2) - x(-1/2)) exactly ("quadrature"), through common.sample."""
    ac = common.make_alphas_cumprod("linear", T)
    z = torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64).reshape(3, 1, 1, 1).expand(3, 2, 2, 2)
    outs = {}
    for pred in common.PREDICTIONS:
        x, nfe = common.sample(gaussian_net(ac, UNIT, pred), start_noise(ac, UNIT, z), ac, sampler=sampler,
                               steps=steps, pred=pred, **options)
        assert nfe == (2 * steps - 1 if sampler == "heun" else steps)
        outs[pred] = x
    assert torch.allclose(outs["eps"], outs["x0"], atol=1e-9) and torch.allclose(outs["eps"], outs["v"], atol=1e-9)
    x = outs["eps"]
    assert torch.allclose(x[0] + x[2], 2 * x[1], atol=1e-10)           # affine, as the argument needs
    mean, std = x[1:2], x[2:3] - x[0:1]
    assert (mean - MU).abs().max() < 1e-3, (mean - MU).abs().max()
    assert (std - UNIT).abs().max() < tol_std, (std - UNIT).abs().max()


def test_heun_is_second_order():
    """Doubling the steps: Euler's error halves, Heun's drops about fourfold (std of unit-variance data)."""
    ac = common.make_alphas_cumprod("linear", T)
    z = torch.tensor([-0.5, 0.5], dtype=torch.float64).reshape(2, 1, 1, 1).expand(2, 2, 2, 2)
    err = {}
    for sampler in ("euler", "heun"):
        for steps in (16, 32):
            x, _ = common.sample(gaussian_net(ac, UNIT), start_noise(ac, UNIT, z), ac, sampler=sampler, steps=steps)
            err[sampler, steps] = (x[1:] - x[:1] - 1).abs().max().item()
    assert 1.6 < err["euler", 16] / err["euler", 32] < 2.5, err
    assert err["heun", 16] / err["heun", 32] > 3.0 and err["heun", 32] < err["euler", 32] / 5, err


N_MC = 4096


def _low_level(sampler, steps, **options):
    """The sampler functions themselves (no clamp to [-1, 1]: unit-std data leaves that range)."""
    def run(model, x_T, gen):
        if sampler == "ddpm":
            return common.sample_ddpm(model, x_T, common.timesteps(T, steps, "linspace"), clip=False,
                                      generator=gen, **options)
        if sampler == "ddim":
            return common.sample_ddim(model, x_T, common.timesteps(T, steps), generator=gen, **options)
        fn = common.sample_euler if sampler == "euler" else common.sample_heun
        sigmas = common.karras_sigmas(steps, model.sigma_min, model.sigma_max)
        return fn(model, x_T * math.sqrt(1 + model.sigma_max ** 2), sigmas, generator=gen, **options)
    return run


@pytest.mark.parametrize("name,data,run,tol_std", [
    # exact in distribution: sampling error only (4.5 standard errors)
    ("ddpm-large-50", "unit", _low_level("ddpm", 50, variance="large"), None),   # respaced chain, still exact
    ("ddpm-learned-1000", "narrow", _low_level("ddpm", T, variance="learned"), None),
    # biased by construction; tolerance = measured bias (1.6%, 7.9%, ...) with margin, plus 4.5 SE
    ("ddpm-small-1000", "narrow", _low_level("ddpm", T, variance="small"), 0.02),
    ("ddim-eta1-100", "unit", _low_level("ddim", 100, eta=1.0), 0.06),
    ("euler-churn-100", "unit", _low_level("euler", 100, churn=10.0), 0.06),
    ("heun-churn-50", "unit", _low_level("heun", 50, churn=10.0), 0.04),
])
def test_stochastic_samplers_reproduce_gaussian(name, data, run, tol_std):
    """4096 samples per dimension: mean within 4.5 standard errors (s / 64); std within 4.5 standard errors
    (s / sqrt(2 * 4096)) for the samplers that are exact for this data, else within the stated bias bound."""
    ac = common.make_alphas_cumprod("linear", T)
    std_data = UNIT if data == "unit" else NARROW
    learned = "learned" in name
    model = common.Denoiser(gaussian_net(ac, std_data, learned_sigma=learned), ac, learned_sigma=learned)
    gen = torch.Generator().manual_seed(7)
    z = torch.randn((N_MC, 2, 2, 2), generator=gen, dtype=torch.float64)
    x = run(model, start_noise(ac, std_data, z), gen)
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
    se_mean, se_std = std_data / math.sqrt(N_MC), std_data / math.sqrt(2 * N_MC)
    assert ((mean - MU) / se_mean).abs().max() < 4.5, ((mean - MU) / se_mean).abs().max()
    if tol_std is None:
        assert ((std - std_data) / se_std).abs().max() < 4.5, ((std - std_data) / se_std).abs().max()
    else:
        assert ((std - std_data) / std_data).abs().max() < tol_std + 4.5 / math.sqrt(2 * N_MC), \
            ((std - std_data) / std_data).abs().max()
    # reproducible from the generator
    x2 = run(model, start_noise(ac, std_data, z[:8]), torch.Generator().manual_seed(8))
    x3 = run(model, start_noise(ac, std_data, z[:8]), torch.Generator().manual_seed(8))
    assert torch.equal(x2, x3)


def test_learned_variance_endpoints_equal_fixed():
    """v = +1 gives log beta (fixed-large), v = -1 gives log beta~ (fixed-small), with the same noise."""
    ac = common.make_alphas_cumprod("linear", T)
    base = gaussian_net(ac, NARROW)
    z = torch.randn((4, 2, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for v, variance in ((1.0, "large"), (-1.0, "small")):
        net = lambda x, t, y=None, v=v: torch.cat([base(x, t), torch.full_like(x, v)], 1)  # noqa: E731
        a, _ = common.sample(net, z, ac, sampler="ddpm", steps=50, learned_sigma=True,
                             generator=torch.Generator().manual_seed(1))
        b, _ = common.sample(base, z, ac, sampler="ddpm", steps=50, variance=variance,
                             generator=torch.Generator().manual_seed(1))
        assert torch.allclose(a, b, atol=1e-12)
    with pytest.raises(ValueError, match="learned"):
        common.sample(base, z, ac, sampler="ddpm", steps=50, variance="learned")


# =====================================================================================================
# 3. guidance, NFE, adapters
# =====================================================================================================

def two_class_net(calls):
    """net(x, t, y) = a(x, t) for y == 1 and b(x, t) for y == 0 (null), 2C channels: eps then a variance channel
    that tells the halves apart. Records the batch size of every call."""
    def net(x, t, y):
        calls.append(x.shape[0])
        yy = common.append_dims(y.to(x), 4)
        a = 0.5 * x + 1e-3 * common.append_dims(t, 4)
        b = -0.25 * x + 0.1
        return torch.cat([yy * a + (1 - yy) * b, yy.expand_as(x) * 0.3], dim=1)
    return net


def test_cfg_algebra_and_nfe():
    ac = common.make_alphas_cumprod("linear", T)
    x = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([10.0, 500.0, 999.0], dtype=torch.float64)
    y, y_null = torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    calls = []
    net = two_class_net(calls)
    a, b = net(x, t, y)[:, :2], net(x, t, y_null)[:, :2]
    for w in (0.0, 1.5, -0.5):
        calls.clear()
        out = common.cfg_net(net, y, y_null, w, 2)(x, t)
        assert torch.allclose(out[:, :2], (1 + w) * a - w * b, atol=1e-12)
        assert torch.equal(out[:, 2:], torch.full_like(x, 0.3))      # variance from the conditional half
        assert calls == ([3] if w == 0 else [6])                     # guided: one batched call of 2B
    # guidance 0 equals the plain conditional sampler; NFE counts network calls (a batched 2B call counts 1)
    for sampler, steps, nfe_expected in (("ddim", 12, 12), ("ddpm", 12, 12), ("euler", 6, 6), ("heun", 6, 11),
                                         ("dpmpp", 7, 7)):
        opts = {"variance": "large"} if sampler == "ddpm" else {}
        calls = []
        net = two_class_net(calls)
        eps_only = lambda xx, tt, yy: net(xx, tt, yy)[:, :2]  # noqa: E731
        g0, n0 = common.sample(eps_only, x, ac, sampler=sampler, steps=steps, y=y, y_null=y_null, guidance=0.0,
                               generator=torch.Generator().manual_seed(3), **opts)
        plain, _ = common.sample(eps_only, x, ac, sampler=sampler, steps=steps, y=y,
                                 generator=torch.Generator().manual_seed(3), **opts)
        assert torch.equal(g0, plain) and n0 == nfe_expected
        calls.clear()
        g, n = common.sample(eps_only, x, ac, sampler=sampler, steps=steps, y=y, y_null=y_null, guidance=2.0,
                             generator=torch.Generator().manual_seed(3), **opts)
        assert n == nfe_expected and calls == [6] * nfe_expected and not torch.equal(g, plain)
    with pytest.raises(ValueError, match="y_null"):
        common.sample(eps_only, x, ac, steps=2, y=y, guidance=1.0)


def test_guidance_is_the_same_for_every_parameterisation():
    """Guiding eps, x0 or v predictions of the same two models gives the same guided x0 (the maps are affine)."""
    ac = common.make_alphas_cumprod("linear", T)
    x = torch.randn((2, 2, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, y_null = torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    eps_net = lambda xx, tt, yy: two_class_net([])(xx, tt, yy)[:, :2]  # noqa: E731

    def as_pred(pred):
        def net(xx, tt, yy):
            a = common.append_dims(ac[tt.long()], 4)
            eps = eps_net(xx, tt, yy)
            x0 = (xx - (1 - a).sqrt() * eps) / a.sqrt()
            return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[pred]
        return net
    outs = [common.sample(as_pred(p), x, ac, sampler="ddim", steps=10, pred=p, y=y, y_null=y_null, guidance=1.5)[0]
            for p in common.PREDICTIONS]
    assert torch.allclose(outs[0], outs[1], atol=1e-9) and torch.allclose(outs[0], outs[2], atol=1e-9)


def test_pred_adapters_and_t_sigma():
    ac = common.make_alphas_cumprod("cosine", T)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn((5, 3, 2, 2), generator=g, dtype=torch.float64), torch.randn((5, 3, 2, 2), generator=g,
                                                                                         dtype=torch.float64)
    abar = ac[torch.tensor([0, 10, 300, 800, 999])]
    a, b = common.append_dims(abar.sqrt(), 4), common.append_dims((1 - abar).sqrt(), 4)
    x_t = a * x0 + b * eps
    for pred, out in (("eps", eps), ("x0", x0), ("v", a * eps - b * x0)):
        r0, re = common.pred_to_x0_eps(out, x_t, abar, pred)
        assert torch.allclose(r0, x0, atol=1e-8) and torch.allclose(re, eps, atol=1e-8)
    with pytest.raises(ValueError, match="--pred"):
        common.pred_to_x0_eps(eps, x_t, abar, "score")
    # t <-> sigma: table values at integer t, inverse of each other at fractional t, monotone
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    sig = common.t_to_sigma(t, ac)
    assert torch.allclose(sig[[0, 1, 5]], common.abar_to_sigma(ac)[[0, 1, 999]], rtol=1e-12)
    assert torch.allclose(common.sigma_to_t(sig, ac), t, atol=1e-9) and (sig.diff() > 0).all()
    assert torch.equal(common.sigma_to_t(sig, ac, quantize=True), t.round())
    assert common.sigma_to_t(torch.tensor([1e-9, 1e9]), ac).tolist() == [0.0, 999.0]      # clamped
    assert torch.allclose(common.sigma_to_abar(common.abar_to_sigma(ac)), ac, rtol=1e-12)
    # the VE denoiser D(x; sigma) is the VP x0 prediction at x_t = x / sqrt(1 + sigma^2), fractional t
    seen = []
    net = lambda xx, tt, yy: (seen.append(tt), 0.1 * xx)[1]  # noqa: E731
    den = common.Denoiser(net, ac)
    s = torch.full((5,), sig[3].item(), dtype=torch.float64)
    xv = x0 + common.append_dims(s, 4) * eps
    ab = common.append_dims(common.sigma_to_abar(s), 4)
    assert torch.allclose(den(xv, s), xv - common.append_dims(s, 4) * 0.1 * xv * ab.sqrt(), atol=1e-10)
    assert torch.allclose(seen[0], torch.full((5,), 500.5, dtype=torch.float64)) and den.nfe == 1


def test_sample_rejects_bad_options():
    ac = common.make_alphas_cumprod("linear", 10)
    x = torch.zeros(1, 1, 2, 2)
    net = lambda xx, tt, yy: xx  # noqa: E731
    with pytest.raises(ValueError, match="--sampler"):
        common.sample(net, x, ac, sampler="plms")
    with pytest.raises(ValueError, match="--eta only applies to --sampler ddim"):  # one check, as the CLIs'
        common.sample(net, x, ac, sampler="euler", steps=3, eta=1.0)
    with pytest.raises(ValueError, match="--variance only applies to --sampler ddpm"):
        common.sample(net, x, ac, sampler="ddim", steps=3, variance="large")
    with pytest.raises(TypeError):  # an option no sampler has
        common.sample(net, x, ac, sampler="ddim", steps=3, temperature=0.5)
    with pytest.raises(AssertionError, match="learned_sigma"):
        common.sample(net, x, ac, sampler="ddim", steps=3, learned_sigma=True)


# =====================================================================================================
# 4. EDM pieces
# =====================================================================================================

def test_edm_precond_table1_and_unit_variance():
    sd = 0.5
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
    c_in, c_out, c_skip, c_noise = common.edm_precond(sigma, sigma_data=sd)
    assert torch.allclose(c_skip, sd ** 2 / (sigma ** 2 + sd ** 2))                   # Karras et al. Table 1
    assert torch.allclose(c_out, sigma * sd / (sigma ** 2 + sd ** 2).sqrt())
    assert torch.allclose(c_in, 1 / (sd ** 2 + sigma ** 2).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)
    # the point of Table 1: for Var[x0] = sd^2 and x = x0 + sigma n, the net input c_in x and the training target
    # (x0 - c_skip x) / c_out both have unit variance at every sigma
    assert torch.allclose(c_in ** 2 * (sd ** 2 + sigma ** 2), torch.ones_like(sigma))
    assert torch.allclose(((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sigma ** 2) / c_out ** 2, torch.ones_like(sigma))
    # offset noise: every conditioner sees s = sqrt(sigma^2 + off^2)
    off = common.edm_precond(sigma, sd, 0.3)
    plain = common.edm_precond((sigma ** 2 + 0.09).sqrt(), sd)
    assert all(torch.allclose(p, q) for p, q in zip(off, plain))
    # DIAMOND facts (sigma_data 0.5, offset 0.3): sigma = 5 -> (.19865, .49753, .00987, .40281), .002 -> ...
    for s, expect in ((5.0, (.19865, .49753, .00987, .40281)), (.002, (1.71498, .25725, .73529, -.30099))):
        got = common.edm_precond(torch.tensor(s, dtype=torch.float64), 0.5, 0.3)
        assert all(abs(g.item() - e) < 1e-5 for g, e in zip(got, expect))


def test_edm_precond_matches_diamond_golden():
    d = torch.load(GOLDEN / "diamond_small.pt", weights_only=True)
    cfg = d["configs"]["denoiser"]
    coeffs = common.edm_precond(d["inputs"]["sigma"], cfg["sigma_data"], cfg["sigma_offset_noise"])
    for name, c in zip(("c_in", "c_out", "c_skip", "c_noise"), coeffs):
        assert c.dtype == torch.float32 and torch.equal(c, d["denoiser"][name]), name      # bit-identical
    sc = d["configs"]["sampler_euler"]
    sigmas = common.karras_sigmas(sc["num_steps_denoising"], sc["sigma_min"], sc["sigma_max"], sc["rho"],
                                  dtype=torch.float32)
    assert torch.equal(sigmas, d["sampler"]["sigmas"])                                     # [5, .28308, .002, 0]
    # training sigmas: one randn(B) draw from the global RNG seeded right before (meta/denoiser_train)
    dist = d["configs"]["sigma_distribution"]
    torch.manual_seed(d["denoiser"]["train_seed"])
    s = common.sample_lognormal_sigma(2, dist["loc"], dist["scale"], dist["sigma_min"], dist["sigma_max"])
    assert torch.equal(s, d["denoiser"]["train_sigmas"][0])


def test_karras_sigmas():
    for n in (1, 2, 10, 40):
        s = common.karras_sigmas(n, 0.002, 80.0, rho=7.0)
        assert s.shape == (n + 1,) and s.dtype == torch.float64 and s[-1] == 0
        assert math.isclose(s[0].item(), 80.0, rel_tol=1e-12)
        if n > 1:
            assert math.isclose(s[-2].item(), 0.002, rel_tol=1e-12) and (s.diff() < 0).all()
    # rho = 1 is uniform in sigma; larger rho crowds steps at low noise
    assert torch.allclose(common.karras_sigmas(5, 1.0, 5.0, rho=1.0)[:-1], torch.linspace(5, 1, 5, dtype=torch.float64))
    s7 = common.karras_sigmas(10, 0.002, 80.0)
    assert (s7[1:-2] < torch.linspace(80, 0.002, 10, dtype=torch.float64)[1:-1]).all()


def test_lognormal_sigma():
    g = torch.Generator().manual_seed(0)
    s = common.sample_lognormal_sigma(100_000, -1.2, 1.2, generator=g)                  # EDM: no clamp
    # a seeded draw: 0.003 and 0.0015 off here; 0.01 is 2.6 standard errors (1.2 / sqrt(1e5)), rounding ~1e-7
    assert abs(s.log().mean() + 1.2) < 0.01 and abs(s.log().std() - 1.2) < 0.01
    c = common.sample_lognormal_sigma(100_000, -0.4, 1.2, 0.002, 20.0, generator=torch.Generator().manual_seed(0))
    assert c.min() >= 0.002 and c.max() <= 20.0 and (c == 20.0).any()
    # clamping is the only difference from the unclamped draw with the same seed
    u = common.sample_lognormal_sigma(100_000, -0.4, 1.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, u.clamp(0.002, 20.0))
    frac_high = (u > 20).double().mean().item()                                        # P(z > (ln 20 + .4)/1.2)
    assert abs(frac_high - 0.5 * math.erfc((math.log(20) + 0.4) / 1.2 / math.sqrt(2))) < 5e-4  # ~3 standard errors


def test_edm_samplers_with_a_denoise_fn():
    """sample_euler / sample_heun take any denoise(x, sigma) -> x0 (the DIAMOND use): NFE, sigma handed over,
    the last step is Euler, churn draws from the generator."""
    sigmas = common.karras_sigmas(3, 2e-3, 5.0, dtype=torch.float32)
    x = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0))           # unit noise, as DIAMOND
    seen = []

    def denoise(x, sigma):
        seen.append(sigma)
        return 0.5 * x / (1 + common.append_dims(sigma, 4) ** 2)
    e = common.sample_euler(denoise, x, sigmas)
    assert [s[0].item() for s in seen] == sigmas[:-1].tolist() and seen[0].shape == (2,)
    seen.clear()
    h = common.sample_heun(denoise, x, sigmas)
    assert [s[0].item() for s in seen] == [sigmas[0].item(), sigmas[1].item(), sigmas[1].item(), sigmas[2].item(),
                                           sigmas[2].item()]                             # 2N - 1 = 5
    # by hand: Euler ends on the last denoised value, Heun's final step is that same Euler step
    xe = x
    for i in range(3):
        d = (xe - denoise(xe, sigmas[i:i + 1])) / sigmas[i]
        xe = xe + d * (sigmas[i + 1] - sigmas[i])
    assert torch.allclose(e, xe, atol=1e-6) and not torch.allclose(e, h, atol=1e-3)
    # churn: reproducible with a generator, different from churn = 0
    a = common.sample_euler(denoise, x, sigmas, churn=1.0, generator=torch.Generator().manual_seed(5))
    b = common.sample_euler(denoise, x, sigmas, churn=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a, e)
    assert torch.equal(common.sample_euler(denoise, x, sigmas, churn=1.0, s_tmin=10.0), e)  # outside [tmin, tmax]


@pytest.mark.parametrize("sampler", common.SAMPLERS)
def test_clip_reaches_every_sampler(sampler):
    # an x0-predicting net that overshoots the data range at high noise: clamping each predicted x0 (the official
    # DDPM sampler's clip) must change where every sampler lands, and the VE-view denoiser must stay in [-1, 1]
    abar = common.make_alphas_cumprod("linear")

    def net(x_t, t, y=None):
        return torch.where(t[:, None, None, None] > 500, torch.full_like(x_t, 3.0), 0.5 * x_t)

    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {clip: common.sample(net, noise, abar, sampler=sampler, steps=10, pred="x0", clip=clip,
                               generator=torch.Generator().manual_seed(1))[0] for clip in (False, True)}
    assert (out[True] - out[False]).abs().max() > 1e-3, sampler  # (heun: 6e-3, the others > 0.05)
    D = common.Denoiser(net, abar, pred="x0", clip=True)
    assert D(noise * 80, torch.tensor(80.0)).abs().max() <= 1
    assert common.Denoiser(net, abar, pred="x0")(noise * 80, torch.tensor(80.0)).abs().max() == 3


def test_command_line_settings_default_to_the_runs_own():
    import argparse
    model = common.DiffusionNet(lambda x, t, y: x, common.make_alphas_cumprod("linear"), 8, num_classes=3,
                                null_label=3, defaults=dict(sampler="ddim", steps=50, guidance=1.5, clip=True))
    flags = lambda sampler=None, steps=None, guidance=None, clip=None, eta=0.0, variance=None: argparse.Namespace(
        sampler=sampler, steps=steps, guidance=guidance, clip=clip, eta=eta, variance=variance)  # noqa: E731
    assert common.checked_settings(flags(), model) == dict(sampler="ddim", steps=50, guidance=1.5, clip=True, eta=0.0,
                                                           variance=None)
    assert common.checked_settings(flags("ddpm", 10, 0.0, False, variance="small"), model) == dict(
        sampler="ddpm", steps=10, guidance=0.0, clip=False, eta=0.0, variance="small")
    with pytest.raises(ValueError, match="--eta only applies to --sampler ddim"):
        common.checked_settings(flags("euler", eta=1.0), model)
    with pytest.raises(ValueError, match="--variance only applies to --sampler ddpm"):
        common.checked_settings(flags(variance="small"), model)
    with pytest.raises(ValueError, match="--variance learned needs a model trained with --learn-sigma"):
        common.checked_settings(flags("ddpm", variance="learned"), model)
    with pytest.raises(ValueError, match="--steps must be positive, got 0"):
        common.checked_settings(flags(steps=0), model)
