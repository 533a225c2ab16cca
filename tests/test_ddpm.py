"""Tests for ddpm.py: the paper's U-Net, the diffusers weight conversion, training, sampling, resume, errors.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_ddpm.py
"""
import dataclasses
import json
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import ddpm  # noqa: E402
from ddpm import PRESETS, UNet  # noqa: E402

# A model small enough for seconds-long CPU runs; same code paths as the paper's model.
# Unconditional and 32 px on purpose (the tiny preset itself is 16 px and class-conditional): the CLI tests below
# check the 32 px outputs and the "--guidance needs --class-cond" error.
MICRO = dataclasses.replace(PRESETS["tiny"], img_size=32, attn_res=(8,), class_cond=False, ch=16, norm_groups=4,
                            steps=8, batch_size=8, warmup=2, log_every=2, ckpt_every=4, sample_n=4, sample_steps=2,
                            sample_guidance=0.0)


def micro_flags(cfg=MICRO):
    return ["--preset", "tiny", "--img-size", str(cfg.img_size), "--attn-res", *map(str, cfg.attn_res),
            "--class-cond" if cfg.class_cond else "--no-class-cond", "--ch", str(cfg.ch), "--norm-groups", str(cfg.norm_groups),
            "--batch-size", str(cfg.batch_size), "--warmup", str(cfg.warmup), "--log-every", str(cfg.log_every),
            "--ckpt-every", str(cfg.ckpt_every), "--sample-n", str(cfg.sample_n),
            "--sample-steps", str(cfg.sample_steps), "--sample-guidance", str(cfg.sample_guidance)]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ and data/ go to the temporary folder
    return tmp_path


# -----------------------------------------------------------------------------------------------------
# the paper's U-Net
# -----------------------------------------------------------------------------------------------------

def test_paper_unet_parameter_count():
    net = UNet()  # defaults = the paper's CIFAR-10 model
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.005, n
    assert n == 35_746_307  # exact count of the official model / the diffusers port
    assert sum(isinstance(m, ddpm.Attention) for m in net.modules()) == 6  # 2 down + 1 mid + 3 up at 16x16
    assert sum(isinstance(m, ddpm.ResBlock) for m in net.modules()) == 22


def test_output_shapes_and_class_conditioning():
    torch.manual_seed(0)
    net = UNet(img_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), norm_groups=4, num_classes=3)
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([0.0, 500.5]), torch.tensor([0, 3]))
    assert out.shape == x.shape
    # The label changes the output (once the near-zero initialised branch ends and output conv are perturbed).
    for m in net.modules():
        if isinstance(m, ddpm.ResBlock):
            torch.nn.init.normal_(m.conv2.weight, std=0.05)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    a = net(x, torch.tensor([10.0, 10.0]), torch.tensor([0, 0]))
    b = net(x, torch.tensor([10.0, 10.0]), torch.tensor([1, 3]))
    assert (a - b).abs().max() > 1e-4  # measured 2.7; float32 noise of the output ~1e-6


def test_ddpm_loss_targets_and_sampling_shape():
    torch.manual_seed(0)
    cfg = dataclasses.replace(MICRO, img_size=16, pred="v", class_cond=True)
    net = ddpm.build_model(cfg, num_classes=10)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    mse, out, x_t, t = common.diffusion_loss(net, x0, ddpm.alphas_cumprod(cfg), torch.tensor([0, 1, 2, 3]),
                                             null_label=10, label_dropout=0.5, pred="v", generator=g)
    assert mse.shape == (4,) and out.shape == x0.shape and torch.isfinite(mse).all()
    mse.mean().backward()
    assert net.class_embedding.weight.grad is not None
    model = ddpm.diffusion_net(net.eval(), cfg)
    x, y, nfe = common.sample_images(model, 3, sampler="ddim", steps=3, guidance=1.5,
                                     generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 16, 16) and x.abs().max() <= 1 and nfe == 3 and y.tolist() == [0, 3, 6]
    with pytest.raises(ValueError, match="--sampler 'plms': use one of"):  # checked once, in common.sample
        common.sample_images(model, 3, sampler="plms", steps=3)


def test_timestep_embedding_matches_official_formula():
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = ddpm.timestep_embedding(t, 128)
    f = np.exp(-math.log(10000) * np.arange(64) / 63)  # divisor half - 1, sin first
    arg = t.numpy()[:, None] * f
    ref = np.concatenate([np.sin(arg), np.cos(arg)], 1)
    # float32 sinusoid (as official) vs float64: exp's argument (|x| <= ln 1e4) carries an ulp, so f is off by
    # (ln 1e4 + 1) ulp, t f by one more, sin/cos add an ulp of the result (measured 2.6 eps (1 + |t f|))
    bound = (math.log(10000) + 2) * np.finfo(np.float32).eps * (1 + np.abs(np.concatenate([arg, arg], 1)))
    assert (np.abs(emb.numpy() - ref) <= bound).all()


# -----------------------------------------------------------------------------------------------------
# diffusers UNet2DModel (google/ddpm-cifar10-32) conversion, without diffusers
# -----------------------------------------------------------------------------------------------------

DIFFUSERS_CONFIG = dict(  # config.json of google/ddpm-cifar10-32 (see the DDPM facts note, section 2)
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
    attention_head_dim=None)


def diffusers_shapes(c=DIFFUSERS_CONFIG, old_attention_names=False):
    """Key -> shape of a diffusers UNet2DModel state dict, built the way diffusers builds its blocks."""
    shapes = {}
    temb = 4 * c["block_out_channels"][0]

    def linear(p, o, i):
        shapes[p + ".weight"], shapes[p + ".bias"] = (o, i), (o,)

    def conv(p, o, i, k):
        shapes[p + ".weight"], shapes[p + ".bias"] = (o, i, k, k), (o,)

    def norm(p, ch):
        shapes[p + ".weight"], shapes[p + ".bias"] = (ch,), (ch,)

    def resnet(p, cin, cout):
        norm(p + ".norm1", cin), conv(p + ".conv1", cout, cin, 3), linear(p + ".time_emb_proj", cout, temb)
        norm(p + ".norm2", cout), conv(p + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(p + ".conv_shortcut", cout, cin, 1)

    def attention(p, ch):
        norm(p + ".group_norm", ch)
        names = ("query", "key", "value", "proj_attn") if old_attention_names else ("to_q", "to_k", "to_v", "to_out.0")
        for n in names:
            linear(f"{p}.{n}", ch, ch)

    boc, L = c["block_out_channels"], c["layers_per_block"]
    conv("conv_in", boc[0], c["in_channels"], 3)
    linear("time_embedding.linear_1", temb, boc[0]), linear("time_embedding.linear_2", temb, temb)
    out = boc[0]
    for i, typ in enumerate(c["down_block_types"]):
        inp, out = out, boc[i]
        for j in range(L):
            resnet(f"down_blocks.{i}.resnets.{j}", inp if j == 0 else out, out)
            if typ.startswith("Attn"):
                attention(f"down_blocks.{i}.attentions.{j}", out)
        if i < len(boc) - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", out, out, 3)
    resnet("mid_block.resnets.0", boc[-1], boc[-1]), attention("mid_block.attentions.0", boc[-1])
    resnet("mid_block.resnets.1", boc[-1], boc[-1])
    rev = boc[::-1]
    out = rev[0]
    for i, typ in enumerate(c["up_block_types"]):
        prev, out, inp = out, rev[i], rev[min(i + 1, len(boc) - 1)]
        for j in range(L + 1):
            skip = inp if j == L else out
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out) + skip, out)
            if typ.startswith("Attn"):
                attention(f"up_blocks.{i}.attentions.{j}", out)
        if i < len(boc) - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", out, out, 3)
    norm("conv_norm_out", boc[0]), conv("conv_out", c["out_channels"], boc[0], 3)
    return shapes


def random_diffusers_state_dict(old_attention_names=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in diffusers_shapes(old_attention_names=old_attention_names).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        sd[k] = torch.randn(shape, generator=g) / math.sqrt(fan_in) + (1.0 if k.endswith("norm1.weight") else 0.0)
    return sd


def diffusers_reference_forward(sd, x, t):
    """What diffusers' UNet2DModel computes with the published config, written directly from its state dict
    (separate q/k/v, right/bottom padding before the stride-2 conv, sin-first embedding, shift 1, eps 1e-6)."""
    c = DIFFUSERS_CONFIG
    gn = lambda h, p: F.group_norm(h, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    conv = lambda h, p, **kw: F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], **kw)  # noqa: E731
    lin = lambda h, p: h @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    half = 64
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
    e = t.float()[:, None] * freqs[None]
    e = torch.cat([e.sin(), e.cos()], 1)
    temb = lin(F.silu(lin(e, "time_embedding.linear_1")), "time_embedding.linear_2")

    def resnet(h, p):
        r = conv(F.silu(gn(h, p + ".norm1")), p + ".conv1", padding=1)
        r = r + lin(F.silu(temb), p + ".time_emb_proj")[:, :, None, None]
        r = conv(F.silu(gn(r, p + ".norm2")), p + ".conv2", padding=1)
        sc = conv(h, p + ".conv_shortcut") if p + ".conv_shortcut.weight" in sd else h
        return (sc + r) / 1.0

    def attn(h, p):
        B, C, H, W = h.shape
        z = gn(h, p + ".group_norm").reshape(B, C, H * W).permute(0, 2, 1)
        q, k, v = lin(z, p + ".to_q"), lin(z, p + ".to_k"), lin(z, p + ".to_v")
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(C), dim=-1)
        o = lin(w @ v, p + ".to_out.0").permute(0, 2, 1).reshape(B, C, H, W)
        return o + h

    h = conv(x, "conv_in", padding=1)
    hs = [h]
    for i, typ in enumerate(c["down_block_types"]):
        for j in range(2):
            h = resnet(h, f"down_blocks.{i}.resnets.{j}")
            if typ.startswith("Attn"):
                h = attn(h, f"down_blocks.{i}.attentions.{j}")
            hs.append(h)
        if i < 3:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"down_blocks.{i}.downsamplers.0.conv", stride=2)
            hs.append(h)
    h = resnet(attn(resnet(h, "mid_block.resnets.0"), "mid_block.attentions.0"), "mid_block.resnets.1")
    for i, typ in enumerate(c["up_block_types"]):
        for j in range(3):
            h = resnet(torch.cat([h, hs.pop()], 1), f"up_blocks.{i}.resnets.{j}")
            if typ.startswith("Attn"):
                h = attn(h, f"up_blocks.{i}.attentions.{j}")
        if i < 3:
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"up_blocks.{i}.upsamplers.0.conv", padding=1)
    return conv(F.silu(gn(h, "conv_norm_out")), "conv_out", padding=1)


def write_safetensors(sd, path):
    header, chunks, offset = {}, [], 0
    for k, v in sd.items():
        b = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def test_diffusers_key_layout_matches_facts():
    shapes = diffusers_shapes()
    assert len(shapes) == 328  # tensors in the published UNet2DModel
    assert sum(math.prod(s) for s in shapes.values()) == 35_746_307
    assert shapes["up_blocks.2.resnets.2.conv_shortcut.weight"] == (256, 384, 1, 1)
    assert shapes["up_blocks.3.resnets.0.conv1.weight"] == (128, 384, 3, 3)


@pytest.mark.parametrize("old_names", [False, True])
def test_diffusers_conversion_loads_strict_and_lands_right(old_names):
    sd = random_diffusers_state_dict(old_attention_names=old_names)
    converted = ddpm.convert_diffusers(sd)
    net = UNet()
    net.load_state_dict(converted, strict=True)
    own = net.state_dict()
    q = "query" if old_names else "to_q"
    a = "down_blocks.1.attentions.1"
    assert torch.equal(own[f"{a}.qkv.weight"][:256], sd[f"{a}.{q}.weight"])
    assert torch.equal(own[f"{a}.qkv.weight"][512:], sd[f"{a}.{'value' if old_names else 'to_v'}.weight"])
    assert torch.equal(own[f"{a}.qkv.bias"][256:512], sd[f"{a}.{'key' if old_names else 'to_k'}.bias"])
    out = "proj_attn" if old_names else "to_out.0"
    assert torch.equal(own["up_blocks.2.attentions.2.proj_out.weight"], sd[f"up_blocks.2.attentions.2.{out}.weight"])
    assert torch.equal(own["up_blocks.2.resnets.2.conv_shortcut.weight"],
                       sd["up_blocks.2.resnets.2.conv_shortcut.weight"])
    assert torch.equal(own["down_blocks.0.downsamplers.0.conv.weight"], sd["down_blocks.0.downsamplers.0.conv.weight"])


def test_diffusers_conversion_computes_what_diffusers_computes(tmp_path):
    torch.manual_seed(0)
    sd = random_diffusers_state_dict(seed=1)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    write_safetensors(sd, path)  # exercise the pure-python safetensors reader as well
    model = ddpm.build_model(PRESETS["cifar10"])
    ddpm.load_diffusers_into(model, path)
    model.eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([637])
    with torch.no_grad():
        ours = model(x, t.float())
        ref = diffusers_reference_forward(sd, x, t)
    assert ours.abs().mean() > 0.1  # not a degenerate comparison
    # two float32 orders of the same ~200 ops in sequence (fused qkv, folded upsampling), ~1e-6 of the activations' size
    # each: 1e-4 of max|ref| (measured 7e-7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    model2 = ddpm.build_model(PRESETS["cifar10"])
    ddpm.load_diffusers_into(model2, tmp_path / "diffusion_pytorch_model.bin")
    assert torch.equal(model2.conv_out.weight, model.conv_out.weight)
    # what a user can pass by mistake: one clear CheckpointError (a ValueError), never a struct/json/key error
    (tmp_path / "short.safetensors").write_bytes(b"hi")
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[:5000])
    del sd["conv_out.weight"]
    torch.save(sd, tmp_path / "other_model.bin")
    (tmp_path / "short.bin").write_bytes(b"hi")
    for name, message in [("missing.safetensors", "no checkpoint file"), ("short.safetensors", "cannot read"),
                          ("truncated.safetensors", "cannot read"), ("missing.bin", "no checkpoint file"),
                          ("short.bin", "cannot load .*google/ddpm-cifar10-32"),
                          ("other_model.bin", "not the paper's CIFAR-10 UNet2DModel.*conv_out.weight")]:
        with pytest.raises(common.CheckpointError, match=message):
            ddpm.load_diffusers_into(ddpm.build_model(PRESETS["cifar10"]), tmp_path / name)


def test_diffusers_conversion_rejects_other_layouts():
    sd = random_diffusers_state_dict()
    del sd["mid_block.resnets.1.conv2.bias"]
    with pytest.raises(RuntimeError, match="conv2.bias"):
        UNet().load_state_dict(ddpm.convert_diffusers(sd), strict=True)


# -----------------------------------------------------------------------------------------------------
# training, sampling, resume (CLI)
# -----------------------------------------------------------------------------------------------------

def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def newest_run(root):
    return sorted(Path(root, "runs").glob("ddpm-shapes-*"), key=os.path.getmtime)[-1]


def test_loss_decreases_on_shapes():
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], img_size=16, ch=16, ch_mult=(1, 2), attn_res=(8,), norm_groups=4,
                              class_cond=False, batch_size=16, lr=2e-3, warmup=5)
    images, labels = common.make_shapes(256, seed=0, size=16)
    data = common.Dataset(images=images, labels=labels, num_classes=10)
    net = ddpm.build_model(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    losses = []
    for step in range(60):
        x, _ = common.get_batch(data, step, cfg.batch_size, seed=0)
        g = torch.Generator().manual_seed(step)
        losses.append(ddpm.train_step(net, opt, x, None, cfg, step, g, ddpm.alphas_cumprod(cfg))["loss"])
    first, last = np.mean(losses[1:6]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)  # measured 0.15 x first


def test_train_sample_cli_end_to_end(in_tmp):
    ddpm.main(["train", *micro_flags(), "--steps", "4", "--dataset", "shapes"])
    run = newest_run(in_tmp)
    assert (run / "ckpt.pt").exists() and (run / "samples_0000004.png").exists()
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [2, 4]
    out = in_tmp / "grid.png"
    ddpm.main(["sample", "--ckpt", str(run / "ckpt.pt"), "--sampler", "ddim", "--steps", "3", "--n", "4",
               "--out", str(out), "--npz", "5"])
    from PIL import Image
    assert Image.open(out).size[0] >= 32
    arr = np.load(out.with_suffix(".npz"))
    assert arr["arr_0"].shape == (5, 32, 32, 3) and arr["arr_0"].dtype == np.uint8
    for sampler in ("ddpm", "dpmpp", "euler", "heun"):
        ddpm.main(["sample", "--ckpt", str(run), "--sampler", sampler, "--steps", "2", "--n", "2",
                   "--out", str(in_tmp / f"{sampler}.png"), "--clip" if sampler == "dpmpp" else "--no-clip"])
        assert (in_tmp / f"{sampler}.png").exists()


def test_in_training_eval_and_evaluate_command(in_tmp):
    # --eval-every logs shapes metrics into metrics.jsonl; `evaluate` scores a checkpoint and appends a row
    flags = [*micro_flags(), "--dataset", "shapes", "--img-size", "16", "--attn-res", "4", "--class-cond"]
    ddpm.main(["train", *flags, "--steps", "4", "--eval-every", "2", "--eval-n", "40", "--sample-steps", "2"])
    run = newest_run(in_tmp)
    evals = [m for m in read_metrics(run) if "eval/shapes_fd" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(m["eval/shapes_fd"] > 0 and 0 <= m["eval/class_acc"] <= 1 for m in evals), evals
    ddpm.main(["evaluate", "--ckpt", str(run), "--n", "40", "--sampler", "euler", "--steps", "2", "--guidance", "1"])
    last = read_metrics(run)[-1]
    assert last["step"] == 4 and last["sample_sampler"] == "euler" and last["n"] == 40
    assert {"eval/shapes_fd", "eval/class_acc", "eval/precision", "eval/recall"} <= set(last)
    with pytest.raises(ValueError, match="--eval-every"):
        ddpm.main(["train", *micro_flags(), "--dataset", "shapes", "--img-size", "24", "--ch-mult", "1", "2",
                   "--eval-every", "2"])


def test_resume_is_exact(in_tmp):
    flags = [*micro_flags(), "--dataset", "shapes", "--log-every", "1", "--dropout", "0.1"]
    ddpm.main(["train", *flags, "--steps", "6", "--ckpt-every", "100"])
    full = [m["loss"] for m in read_metrics(newest_run(in_tmp)) if "loss" in m]
    ddpm.main(["train", *flags, "--steps", "3", "--ckpt-every", "100"])
    run = newest_run(in_tmp)
    ddpm.main(["train", "--resume", str(run), "--steps", "6"])
    resumed = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(full) == 6 and resumed == full


# -----------------------------------------------------------------------------------------------------
# clear errors before any work
# -----------------------------------------------------------------------------------------------------

def test_errors_before_work(in_tmp):
    with pytest.raises(ValueError, match="--dataset"):
        ddpm.main(["train", "--preset", "tiny", "--dataset", "mnist"])
    with pytest.raises(ValueError, match="--img-size"):
        ddpm.main(["train", "--preset", "tiny", "--img-size", "30"])
    with pytest.raises(ValueError, match="--pred"):
        ddpm.main(["train", "--preset", "tiny", "--pred", "score"])
    with pytest.raises(ValueError, match=r"--dropout must be in \[0, 1\), got 1.0"):
        ddpm.main(["train", "--preset", "tiny", "--dropout", "1"])
    with pytest.raises(ValueError, match="--norm-groups must be positive, got 0"):  # not a ZeroDivisionError
        ddpm.main(["train", "--preset", "tiny", "--norm-groups", "0"])
    with pytest.raises(ValueError, match="--ch-mult needs positive multipliers, got 1 0"):
        ddpm.main(["train", "--preset", "tiny", "--ch-mult", "1", "0"])
    with pytest.raises(ValueError, match="--sample-every must be >= 0, got -1"):
        ddpm.main(["train", "--preset", "tiny", "--sample-every", "-1"])
    with pytest.raises(ValueError, match=r"--ema-decay must be in \[0, 1\], got 1.5"):
        ddpm.main(["train", "--preset", "tiny", "--ema-decay", "1.5"])
    assert not Path("runs").exists()  # nothing was started

    ddpm.main(["train", *micro_flags(), "--steps", "2", "--dataset", "shapes"])
    run = newest_run(in_tmp)
    with pytest.raises(ValueError, match="--guidance"):
        ddpm.main(["sample", "--ckpt", str(run), "--guidance", "2", "--steps", "2", "--n", "2", "--sampler", "ddim"])
    with pytest.raises(ValueError, match="--eta only applies to --sampler ddim"):  # not silently ignored
        ddpm.main(["sample", "--ckpt", str(run), "--eta", "1", "--steps", "2", "--n", "2", "--sampler", "dpmpp"])
    with pytest.raises(common.CheckpointError, match="--ch "):
        ddpm.main(["train", "--resume", str(run), "--ch", "32", "--steps", "4"])
    foreign = torch.load(run / "ckpt.pt", weights_only=True)
    foreign["kind"] = "dit"
    common.save_checkpoint(in_tmp / "dit.pt", foreign)
    with pytest.raises(common.CheckpointError):
        ddpm.main(["sample", "--ckpt", str(in_tmp / "dit.pt"), "--steps", "2", "--n", "2"])
