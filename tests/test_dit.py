"""Tests for dit.py: official-weight parity, the four adaLN variants, config API, training, sampling, resume.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_dit.py
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import dit  # noqa: E402
from dit import DiT, DiTConfig, get_dit_config  # noqa: E402

GOLDEN = torch.load(ROOT / "tests" / "golden" / "dit_small.pt", weights_only=True)

# Flags of a micro model: same code paths as the real one, seconds on one core.
MICRO = ["--preset", "tiny", "--img-size", "32", "--width", "32", "--depth", "1", "--heads", "2", "--patch", "8",
         "--batch-size", "8", "--log-every", "1", "--sample-n", "10", "--sample-steps", "2", "--sample-guidance", "1.0"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ and data/ go to the temporary folder
    return tmp_path


def golden_model(dtype=torch.float32) -> DiT:
    c = GOLDEN["config"]
    model = DiT(c["input_size"], c["patch_size"], c["in_channels"], c["hidden_size"], c["depth"], c["num_heads"],
                class_dropout_prob=c["class_dropout_prob"], num_classes=c["num_classes"], learn_sigma=c["learn_sigma"])
    model.load_state_dict(GOLDEN["state_dict"], strict=True)
    return model.to(dtype).eval()


def micro_model(adaln="adaln-zero", **kw) -> DiT:
    return DiT(16, 4, 3, 32, 2, 2, num_classes=10, adaln=adaln, **kw)


# -----------------------------------------------------------------------------------------------------
# parity with the official facebookresearch/DiT models.py
# -----------------------------------------------------------------------------------------------------

# float32 vs another CPU: ~30 ops in sequence, sums of <= 256 terms in a CPU-dependent order (5e-7 of max|out| in
# all, measured with the golden sinusoid), plus the CPU's own float32 sinusoid (2e-6 of max|out|): 1e-5 of max|out|
F32_RTOL, F32_ATOL = 1e-5, 1e-6


def assert_f32_close(out, ref, amplification=1.0):
    tol = amplification * (F32_RTOL * ref.abs().max().item() + F32_ATOL)
    assert (out - ref).abs().max().item() <= tol, ((out - ref).abs().max().item(), tol)


def feed_golden_sinusoid(model: DiT) -> DiT:
    """The time embedder gets the official run's float32 sinusoid bits (GOLDEN t_freq / cfg_t_freq) for each t
    instead of computing its own: float32 sin/cos/exp differ by an ulp between CPUs (README), which would leave
    ~6e-6 in a float64 output. Only `t_embedder.mlp`, the official name, is relied on."""
    table = {}
    for t, freq in ((GOLDEN["t"], GOLDEN["t_freq"]), (GOLDEN["cfg_t"], GOLDEN["cfg_t_freq"])):
        for ti, fi in zip(t.tolist(), freq):
            assert torch.equal(table.setdefault(ti, fi), fi)  # one sinusoid per timestep value
    emb = model.t_embedder
    dtype = next(emb.mlp.parameters()).dtype
    emb.forward = lambda t: emb.mlp(torch.stack([table[v] for v in t.tolist()]).to(dtype))
    return model


@torch.no_grad()
def test_own_sinusoid_matches_golden_bits():
    """What the model feeds its time MLP is the official float32 sinusoid [cos(t f) | sin(t f)] to a few ulp of
    its argument: a CPU's float32 exp and product round t f by an ulp or two, sin/cos add an ulp of the result."""
    model, seen = golden_model(), []
    model.t_embedder.mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    for t, ref in ((GOLDEN["t"], GOLDEN["t_freq"]), (GOLDEN["cfg_t"], GOLDEN["cfg_t_freq"])):
        seen.clear()
        model(GOLDEN["x"][:1].expand(len(t), -1, -1, -1), t, torch.zeros_like(t))
        half = ref.shape[1] // 2
        arg = t.double()[:, None] * 10000 ** (-torch.arange(half, dtype=torch.float64) / half)
        bound = 4 * torch.finfo(torch.float32).eps * (1 + arg.abs()).repeat(1, 2)
        assert seen[0].dtype == torch.float32 and seen[0].shape == ref.shape
        assert ((seen[0] - ref).abs() <= bound).all(), ((seen[0] - ref).abs() / bound).max()


def official_forward_with_cfg(model, x, t, y, cfg_scale):
    """The official DiT forward_with_cfg (models.py), for parity: only the first half of x is used (duplicated),
    y holds [labels; null labels], the first 3 channels of both halves become eps_u + s (eps_c - eps_u), the
    learned-variance channels are each half's own."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = eps.chunk(2)
    guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


@torch.no_grad()
def test_parity_float32():
    out = golden_model()(GOLDEN["x"], GOLDEN["t"], GOLDEN["y"])
    assert out.shape == GOLDEN["out"].shape
    assert_f32_close(out, GOLDEN["out"])


@torch.no_grad()
def test_parity_float64():
    # fp64 weights and activations after the official float32 sinusoid, whose bits the golden file holds:
    # identical inputs, so only float64 rounding (~1e-15 of the output) remains
    out = feed_golden_sinusoid(golden_model(torch.float64))(GOLDEN["x"].double(), GOLDEN["t"], GOLDEN["y"])
    assert out.dtype == torch.float64
    assert (out - GOLDEN["out_fp64"]).abs().max().item() < 1e-10


@torch.no_grad()
def test_parity_forward_with_cfg():
    s = GOLDEN["cfg_scale"]
    out = official_forward_with_cfg(golden_model(), GOLDEN["cfg_x"], GOLDEN["cfg_t"], GOLDEN["cfg_y"], s)
    # eps_u + s (eps_c - eps_u) weighs the two passes' float32 errors by s and s - 1
    assert_f32_close(out, GOLDEN["out_cfg"], amplification=2 * s - 1)
    model = feed_golden_sinusoid(golden_model(torch.float64))
    out = official_forward_with_cfg(model, GOLDEN["cfg_x"].double(), GOLDEN["cfg_t"], GOLDEN["cfg_y"], s)
    assert (out - GOLDEN["out_cfg_fp64"]).abs().max().item() < 1e-10  # float64, identical inputs


@torch.no_grad()
def test_guidance_wrapper_equals_official_cfg():
    """common.cfg_net, the one guidance mechanism (eps = (1+w) eps_c - w eps_u, variance = the conditional
    pass's), reproduces the official forward_with_cfg with s = 1 + w on its first half."""
    model = feed_golden_sinusoid(golden_model(torch.float64))
    n = len(GOLDEN["cfg_x"]) // 2
    x, t, y = GOLDEN["cfg_x"][:n].double(), GOLDEN["cfg_t"][:n], GOLDEN["cfg_y"]
    out = common.cfg_net(model, y[:n], y[n:], GOLDEN["cfg_scale"] - 1, channels=3)(x, t)
    assert (out - GOLDEN["out_cfg_fp64"][:n]).abs().max().item() < 1e-10  # float64, identical inputs


def test_state_dict_keys_and_counts_match_official():
    assert set(golden_model().state_dict()) == set(GOLDEN["state_dict"])
    for k, v in golden_model().state_dict().items():
        assert v.shape == GOLDEN["state_dict"][k].shape, k
    with torch.device("meta"):  # the target config of the facts sheet (72 keys)
        sigma = DiT(32, 4, 3, 384, 6, 6, num_classes=10, learn_sigma=True)
        plain = DiT(32, 4, 3, 384, 6, 6, num_classes=10, learn_sigma=False)
    assert len(sigma.state_dict()) == 72
    assert dit.num_params(sigma) == 16_586_592 and dit.num_params(sigma, trainable=True) == 16_562_016
    assert dit.num_params(plain) == 16_568_112
    assert not sigma.pos_embed.requires_grad


def test_pos_embed_is_official_sincos():
    assert torch.equal(golden_model().pos_embed, GOLDEN["pos_embed_sincos"])
    assert torch.equal(DiT(16, 4, 3, 64, 1, 4).pos_embed, GOLDEN["pos_embed_sincos"])


# -----------------------------------------------------------------------------------------------------
# adaLN variants
# -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_fresh_adaln_zero_outputs_exactly_zero_and_blocks_are_identity():
    torch.manual_seed(0)
    model = micro_model()
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    assert torch.equal(model(x, t, y), torch.zeros(3, 3, 16, 16))
    h, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)  # zero shift, scale and gate: h + 0 * branch


def test_adaln_single_has_far_fewer_params():
    counts = {}
    with torch.device("meta"):
        for v in dit.ADALN_VARIANTS:
            counts[v] = dit.num_params(dit.build_model(get_dit_config(adaln=v), 10), trainable=True)
    # facts sheet, target config, learn_sigma=False
    assert counts["adaln-zero"] == 16_543_536 and counts["adaln"] == 14_769_456
    assert counts["adaln-single"] < 0.75 * counts["adaln-zero"]
    assert counts["adaln-diagonal"] == counts["adaln"] + 6 * 2 * 384
    assert "adaln-single" in dit.param_table(get_dit_config(), 10)


@pytest.mark.parametrize("variant", dit.ADALN_VARIANTS)
def test_each_variant_trains(variant):
    """40 AdamW steps on 16x16 shapes lower the loss on a fixed held-out batch."""
    torch.manual_seed(0)
    model = micro_model(variant)
    cfg = get_dit_config(adaln=variant, lr=2e-3, img_size=16, width=32, depth=2, heads=2)
    diffusion = dit.Diffusion(dit.alphas_cumprod(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0)
    imgs, labels = common.make_shapes(320, seed=3, size=16)
    x_all = imgs.float() / 127.5 - 1
    x_eval, y_eval = x_all[:64], labels[:64]

    def eval_loss():
        with torch.no_grad():
            return diffusion.loss(model, x_eval, y_eval, generator=torch.Generator().manual_seed(1))[0].item()

    before = eval_loss()
    for step in range(40):
        i = 64 + (step * 16) % 256
        dit.train_step(model, opt, diffusion, x_all[i:i + 16], labels[i:i + 16], cfg,
                       torch.Generator().manual_seed(step))
    after = eval_loss()
    # measured 0.49-0.56 x before over 4 seeds and every variant: far from 0.7 for any CPU's rounding
    assert after < 0.7 * before, (variant, before, after)


# -----------------------------------------------------------------------------------------------------
# diffusion loss (--learn-sigma)
# -----------------------------------------------------------------------------------------------------

def test_vlb_is_zero_for_the_true_posterior():
    """With x0_hat = the true x0 and v = -1 (variance = beta_tilde_t), p(x_{t-1}|x_t) IS the posterior."""
    ac = common.make_alphas_cumprod("linear", 1000)
    d = dit.Diffusion(ac)
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 10, 500, 999])
    x_t = ac[t].sqrt()[:, None, None, None] * x0 + (1 - ac[t]).sqrt()[:, None, None, None] * torch.randn_like(x0)
    vb = d.vlb_terms(x0, x_t, t, x0, -torch.ones_like(x0))
    assert vb.abs().max().item() < 1e-12  # float64: the KL's -1 + exp(d) - d cancels to ~1e-16 (measured 3e-16)
    vb_off = d.vlb_terms(x0, x_t, t, x0, torch.ones_like(x0))  # variance beta_t instead: KL > 0
    assert (vb_off > 0).all()  # smallest at t = 999, where beta ~ beta~: 2.4e-13, ~1000x that rounding


def test_learn_sigma_vlb_gradient_reaches_only_variance_channels():
    d = dit.Diffusion(common.make_alphas_cumprod("linear", 1000))
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    out = torch.randn(4, 6, 8, 8, requires_grad=True)
    net = lambda x, t, y: out * 1.0  # noqa: E731
    loss_sig, m = d.loss(net, x0, learn_sigma=True, generator=torch.Generator().manual_seed(0))
    (g_sig,) = torch.autograd.grad(loss_sig, out)
    loss_mse, _ = d.loss(net, x0, learn_sigma=False, generator=torch.Generator().manual_seed(0))
    (g_mse,) = torch.autograd.grad(loss_mse, out)
    assert torch.equal(g_sig[:, :3], g_mse[:, :3])          # eps channels: the MSE gradient only (stop-grad)
    assert g_sig[:, 3:].abs().sum() > 0 and m["vb"] > 0    # variance channels learn from L_vlb
    # mean(mse + vb) vs mean(mse) + mean(vb): float32 sums of 4 terms in two orders, a few ulp
    torch.testing.assert_close(loss_sig, loss_mse + m["vb"], rtol=1e-6, atol=0)


# -----------------------------------------------------------------------------------------------------
# configuration API and command line
# -----------------------------------------------------------------------------------------------------

def test_config_defaults_and_issue_example():
    cfg = DiTConfig()
    assert (cfg.img_size, cfg.patch, cfg.width, cfg.depth, cfg.heads, cfg.batch_size, cfg.epochs, cfg.timesteps,
            cfg.beta_start, cfg.beta_end) == (32, 4, 384, 6, 6, 128, 100, 1000, 1e-4, 0.02)
    # the seed snippet's upper-case names still work and mean the same fields
    cfg = get_dit_config(DATASET="CIFAR10", BATCH=128, EPOCHS=100, IMG_SIZE=32, WIDTH=384, DEPTH=6)
    assert cfg.dataset == "cifar10" and cfg == DiTConfig()
    assert get_dit_config(dataset="cifar10", batch_size=64, width=192, heads=3) == DiTConfig(batch_size=64, width=192,
                                                                                            heads=3)
    s4 = get_dit_config(model="DiT-S/4")
    assert (s4.depth, s4.width, s4.heads, s4.patch) == (12, 384, 6, 4)
    assert len(dit.DIT_MODELS) == 12 and dit.DIT_MODELS["DiT-XL/2"] == dict(depth=28, width=1152, heads=16, patch=2)
    tiny = get_dit_config(preset="tiny", width=64)
    assert tiny.dataset == "shapes" and tiny.width == 64 and tiny.preset == "tiny" and tiny.steps == 3000
    assert get_dit_config(preset="tiny", epochs=2).steps == 0  # epochs given: the epochs decide, not the preset
    # the documented path from a config to a model, and the clear error of the tempting wrong one
    model = dit.build_model(get_dit_config(preset="tiny"), num_classes=10)
    assert dit.num_params(model) == dit.num_params(model, trainable=True) + 64 * 96  # the fixed pos_embed
    with pytest.raises(TypeError, match="dit.build_model"):
        DiT(get_dit_config())


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown field 'widht'.*did you mean 'width'"):
        get_dit_config(widht=256)
    with pytest.raises(ValueError, match="unknown field 'foo'"):
        get_dit_config(FOO=1)
    with pytest.raises(ValueError, match="--img-size 30 must be divisible by --patch 4"):
        get_dit_config(img_size=30)
    with pytest.raises(ValueError, match="--width 100 must be divisible by --heads 6"):
        get_dit_config(width=100)
    with pytest.raises(ValueError, match="--model DiT-S/4 contradicts --width 512"):
        get_dit_config(model="DiT-S/4", width=512)
    with pytest.raises(ValueError, match="--adaln 'film'.*adaln-zero, adaln, adaln-single, adaln-diagonal"):
        get_dit_config(adaln="film")
    with pytest.raises(ValueError, match="--model 'DiT-S/3'"):
        get_dit_config(model="DiT-S/3")
    with pytest.raises(ValueError, match="--dataset 'mnist'"):
        get_dit_config(dataset="mnist")
    with pytest.raises(ValueError, match="--sample-guidance 2.0 needs the null label"):
        get_dit_config(uncond=True, sample_guidance=2.0)
    with pytest.raises(ValueError, match="--mlp-ratio must be positive, got 0"):
        get_dit_config(mlp_ratio=0.0)  # would build a zero-width MLP and train it
    with pytest.raises(ValueError, match="--sample-every must be >= 0, got -1"):
        get_dit_config(sample_every=-1)
    with pytest.raises(ValueError, match="give --steps or --epochs, not both"):
        dit.parse_train_args(["--preset", "tiny", "--steps", "5", "--epochs", "2"])


def test_cli_flags_are_generated_from_fields():
    parser = common.add_config_args(argparse.ArgumentParser(), DiTConfig())
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    for f in dataclasses.fields(DiTConfig):
        assert "--" + f.name.replace("_", "-") in flags
    cfg, resume = dit.parse_train_args(["--width", "64", "--heads", "4", "--adaln", "adaln-single", "--learn-sigma",
                                        "--dataset", "SHAPES"])
    assert (cfg.width, cfg.heads, cfg.adaln, cfg.learn_sigma, cfg.dataset, resume) == (
        64, 4, "adaln-single", True, "shapes", None)
    cfg, _ = dit.parse_train_args(["--model", "DiT-B/8", "--preset", "tiny"])
    assert (cfg.width, cfg.depth, cfg.heads, cfg.patch, cfg.dataset) == (768, 12, 12, 8, "shapes")
    with pytest.raises(ValueError, match="contradicts --depth 3"):
        dit.parse_train_args(["--model", "DiT-B/8", "--depth", "3"])
    cfg, _ = dit.parse_train_args(["--preset", "tiny", "--epochs", "2"])  # was silently ignored for the preset's steps
    assert (cfg.steps, cfg.epochs) == (0, 2)


# -----------------------------------------------------------------------------------------------------
# end to end: train -> checkpoint -> sample / evaluate; resume; errors
# -----------------------------------------------------------------------------------------------------

def losses(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_train_sample_and_resume_exactly(in_tmp):
    full = dit.train(*dit.parse_train_args(MICRO + ["--steps", "6", "--ckpt-every", "3"]))
    part = dit.train(*dit.parse_train_args(MICRO + ["--steps", "3"]))
    grid = part / "samples_0000003.png"
    assert grid.exists() and full != part
    resumed = dit.train(*dit.parse_train_args(["--resume", str(part), "--steps", "6"]))
    assert resumed == part
    a, b = losses(full), losses(part)
    assert set(a) == set(b) == set(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)  # the same loss sequence, bit for bit
    ck_a, ck_b = (common.load_checkpoint(r / "ckpt.pt", "dit") for r in (full, part))
    for k in ck_a["ema"]:
        assert torch.equal(ck_a["ema"][k], ck_b["ema"][k]), k
    with pytest.raises(common.CheckpointError, match="--width 32 \\(checkpoint\\) vs 64"):
        dit.train(*dit.parse_train_args(["--resume", str(part), "--width", "64", "--heads", "2"]))

    # sampling from the checkpoint: a class-conditional grid (one row per class) and an npz
    out = in_tmp / "grid.png"
    dit.main(["sample", "--ckpt", str(full), "--sampler", "ddim", "--steps", "3", "--guidance", "2", "--n", "20",
              "--out", str(out), "--npz", "12", "--batch-size", "8"])
    from PIL import Image
    width, height = Image.open(out).size
    assert height == 10 * 66 + 2 and 2 * 66 + 2 < width < 2 * 66 + 80  # a row of 2 per class, 64 px tiles, names
    npz = np.load(out.with_suffix(".npz"))
    assert npz["arr_0"].shape == (12, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]  # balanced, sorted by class
    one = in_tmp / "three.png"
    for sampler in ("ddpm", "euler"):
        dit.main(["sample", "--ckpt", str(full), "--sampler", sampler, "--steps", "2", "--class", "3", "--n", "4",
                  "--out", str(one)])
        assert one.exists()
    with pytest.raises(ValueError, match="--class '12': use 0..9 or a class name"):
        dit.main(["sample", "--ckpt", str(full), "--class", "12", "--steps", "2", "--n", "2", "--out", str(one)])


def test_in_training_eval_and_evaluate_command(in_tmp):
    # --eval-every logs shapes metrics into metrics.jsonl; `evaluate` scores a checkpoint and appends a row
    run = dit.train(*dit.parse_train_args(MICRO + ["--img-size", "16", "--patch", "4", "--steps", "4",
                                                   "--eval-every", "2", "--eval-n", "40"]))
    evals = [json.loads(line) for line in open(run / "metrics.jsonl")]
    evals = [m for m in evals if "eval/shapes_fd" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(m["eval/shapes_fd"] > 0 and 0 <= m["eval/class_acc"] <= 1 for m in evals), evals
    dit.main(["evaluate", "--ckpt", str(run), "--n", "40", "--sampler", "heun", "--steps", "2", "--guidance", "2"])
    last = json.loads(open(run / "metrics.jsonl").readlines()[-1])
    assert last["step"] == 4 and last["sample_sampler"] == "heun" and last["n"] == 40
    assert {"eval/shapes_fd", "eval/class_acc", "eval/precision", "eval/recall"} <= set(last)
    with pytest.raises(ValueError, match="--eval-every"):
        dit.parse_train_args(MICRO + ["--dataset", "cifar10", "--eval-every", "2"])


def test_learn_sigma_uncond_train_and_ddpm_sampling(in_tmp):
    run = dit.train(*dit.parse_train_args(MICRO + ["--steps", "2", "--learn-sigma", "--uncond", "--sample-guidance",
                                                   "0", "--sample-sampler", "ddpm", "--adaln", "adaln-single"]))
    model, cfg, _ = dit.load(run)
    assert model.net.out_channels == 6 and model.num_classes == 0 and cfg.adaln == "adaln-single"
    assert "vb" in json.loads(open(run / "metrics.jsonl").readline())
    with pytest.raises(ValueError, match="--guidance needs a class-conditional model"):
        dit.main(["sample", "--ckpt", str(run), "--guidance", "1", "--steps", "2", "--out", str(in_tmp / "x.png")])
    with pytest.raises(ValueError, match="--class needs a class-conditional model"):
        dit.main(["sample", "--ckpt", str(run), "--class", "1", "--steps", "2", "--out", str(in_tmp / "x.png")])


def test_foreign_or_missing_checkpoint_is_refused(in_tmp):
    common.save_checkpoint(in_tmp / "ddpm.pt", {"kind": "ddpm", "config": {}})
    with pytest.raises(common.CheckpointError, match="'ddpm' checkpoint, but a 'dit' checkpoint"):
        dit.load(in_tmp / "ddpm.pt")
    with pytest.raises(common.CheckpointError, match="no checkpoint file"):
        dit.main(["sample", "--ckpt", str(in_tmp / "nothing.pt"), "--out", str(in_tmp / "x.png")])
