"""Tests of common.py sections 1, 5, 6 (shapes, batches, folders), 7 and 8 (infra helper's sections)."""
import argparse
import dataclasses
import io
import json
import os
import pickle
import random
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# 1. config <-> command line
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Cfg:
    IMG_SIZE: int = 32
    num_epochs: int = 3
    lr: float = 1e-3
    flip: bool = True
    compile: bool = False
    ch_mult: tuple = (1, 2, 2)
    games: list = dataclasses.field(default_factory=lambda: ["Pong", "Breakout"])
    name: Optional[str] = None
    dataset: str = dataclasses.field(default="shapes", metadata={"help": "cifar10 | shapes | folder:PATH"})


def _parse(cfg, argv):
    parser = C.add_config_args(argparse.ArgumentParser(), cfg)
    return C.config_from_args(cfg, parser.parse_args(argv)), parser


def test_config_defaults_round_trip():
    cfg = _Cfg()
    parsed, _ = _parse(cfg, [])
    assert parsed == cfg and parsed is not cfg
    assert isinstance(parsed.ch_mult, tuple)


def test_config_flags_parse_every_kind():
    cfg, parser = _parse(_Cfg(), ["--img-size", "64", "--num-epochs", "7", "--lr", "2", "--no-flip", "--compile",
                                  "--ch-mult", "1", "4", "--games", "Seaquest", "--name", "run1",
                                  "--dataset", "folder:/x"])
    assert cfg == _Cfg(IMG_SIZE=64, num_epochs=7, lr=2.0, flip=False, compile=True, ch_mult=(1, 4),
                       games=["Seaquest"], name="run1", dataset="folder:/x")
    assert isinstance(cfg.lr, float) and isinstance(cfg.ch_mult[0], int)
    assert _parse(_Cfg(), ["--name", "none"])[0].name is None
    # round trip: a non-default config written back as flags parses to itself
    argv = []
    for f in dataclasses.fields(cfg):
        v, flag = getattr(cfg, f.name), "--" + f.name.lower().replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, (list, tuple)):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    assert _parse(_Cfg(), argv)[0] == cfg
    help_text = parser.format_help()
    assert "cifar10 | shapes | folder:PATH" in help_text and "--no-flip" in help_text
    with pytest.raises(SystemExit):
        _parse(_Cfg(), ["--img-size", "big"])


@pytest.mark.parametrize("argv, message", [
    (["ddpm.py", "sample", "--ckpt", "missing.pt"], "error: no checkpoint file at missing.pt"),
    (["dit.py", "--dataset", "folder:no_such_folder"], r"error: --dataset folder:/\S*/no_such_folder: no such folder"),
    (["diamond.py", "--game", "NoSuchGame-v5"], "error: --game 'NoSuchGame-v5' is not an Atari game of ale-py"),
    (["ddpm.py", "evaluate", "--ckpt", "missing.pt", "--batch-size", "0"], "error: --batch-size must be positive"),
    (["dit.py", "sample", "--ckpt", "missing.pt", "--npz", "-5"], "error: --npz must be >= 0, got -5"),
    (["diamond.py", "eval", "--ckpt", "missing.pt", "--episodes", "0"], "error: --episodes must be positive, got 0"),
])
def test_user_errors_end_the_script_with_one_line(tmp_path, argv, message):
    """What a user can get wrong ends each script as one `error: ...` line naming the fix, exit status 1."""
    import subprocess
    script = Path(__file__).resolve().parents[1] / argv[0]
    out = subprocess.run([sys.executable, str(script), *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and re.match(message, out.stderr), out.stderr
    assert not any(tmp_path.iterdir())  # failed before any work: no run folder, no data


def test_run_cli_ends_user_errors_as_one_line_but_keeps_library_tracebacks():
    with pytest.raises(SystemExit) as exit_:  # a check of the project's own code
        C.run_cli(lambda: C.check_ranges(argparse.Namespace(n=0), positive=("n",)))
    assert exit_.value.code == "error: --n must be positive, got 0"  # printed to stderr, exit status 1
    with pytest.raises(json.JSONDecodeError):  # a ValueError from inside a library is a bug: traceback kept
        C.run_cli(lambda: json.loads("{"))


def test_count_flags_are_checked_before_any_work():
    import diamond
    args = argparse.Namespace(n=None, npz=0, steps=1)
    C.check_ranges(args, positive=("n", "steps"), non_negative=("npz",))  # None (derived later) and the bounds pass
    with pytest.raises(ValueError, match="--steps must be positive, got 0"):
        diamond.dream_command(["--ckpt", "missing.pt", "--steps", "0"])
    with pytest.raises(ValueError, match=r"--epsilon must be in \[0, 1\]"):
        diamond.eval_command(["--ckpt", "missing.pt", "--epsilon", "1.5"])
    with pytest.raises(ValueError, match="--max-steps must be positive, got -3"):
        diamond.eval_command(["--ckpt", "missing.pt", "--max-steps", "-3"])


# ----------------------------------------------------------------------------------------------------
# 5. runtime: seeding, device, EMA
# ----------------------------------------------------------------------------------------------------

def test_seed_device_autocast_compile_flag():
    C.seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    C.seed_everything(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())
    assert C.pick_device("cpu") == torch.device("cpu")
    assert C.pick_device("auto").type in ("cuda", "mps", "cpu")
    with C.autocast("cpu", True):  # a no-op on CPU: results stay fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    m = nn.Linear(2, 2)
    assert C.maybe_compile(m, False) is m
    dist = C.setup_ddp("cpu") if "RANK" not in os.environ else None
    assert dist is not None and dist.world_size == 1 and dist.is_main and C.wrap_ddp(m, dist) is m
    assert C.all_reduce_mean(2.5, dist) == 2.5


def test_linear_beta_range_is_checked_by_both_scripts():
    import ddpm
    import dit
    C.check_linear_betas(1e-4, 0.02)
    for start, end in [(0.0, 0.02), (0.02, 1e-4), (1e-4, 1.0)]:
        with pytest.raises(ValueError, match="need 0 < --beta-start < --beta-end < 1"):
            C.check_linear_betas(start, end)
    with pytest.raises(ValueError, match="need 0 < --beta-start < --beta-end < 1, got 0.5, 0.02"):
        dit.get_dit_config(BETA_START=0.5)
    with pytest.raises(ValueError, match="need 0 < --beta-start < --beta-end < 1, got 0.5, 0.02"):
        ddpm.check_config(ddpm.DDPMConfig(beta_start=0.5, beta_end=0.02))
    ddpm.check_config(ddpm.DDPMConfig(schedule="cosine", beta_start=0.5, beta_end=0.02))  # unused by cosine


def test_ema_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = C.make_ema(model)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    e0 = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))  # updates BatchNorm running stats and num_batches_tracked
    C.ema_update(ema, model, decay=0.9)
    m = model.state_dict()
    # ema_update's arithmetic vs 0.9 e + 0.1 m: a few float32 ulp, within assert_close's float32 defaults
    for k, v in ema.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.9 * e0[k] + 0.1 * m[k])
        else:
            assert torch.equal(v, m[k])
    C.ema_update(ema, model, decay=0.0)  # decay 0 copies the model
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, m[k].to(v.dtype))
    C.ema_update(ema, model, decay=1.0)  # decay 1 freezes
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, m[k].to(v.dtype))


# ----------------------------------------------------------------------------------------------------
# 6. data: shapes, batches, folders
# ----------------------------------------------------------------------------------------------------

def test_shapes_deterministic_balanced_and_varied():
    x, y = C.make_shapes(1000, seed=5)
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    x2, y2 = C.make_shapes(1000, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = C.make_shapes(1000, seed=6)
    assert not torch.equal(x, x3)
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10
    assert len(C.SHAPES_CLASSES) == 10 and y.max() == 9
    assert len(torch.unique(x.flatten(1), dim=0)) == 1000  # no duplicate images
    assert x.float().std() > 40  # real contrast, not a flat image
    assert C.make_shapes(8, seed=0, size=48)[0].shape == (8, 3, 48, 48)
    data = C.load_dataset("shapes")
    assert data.num_classes == 10 and len(data.images) == C.SHAPES_TRAIN_N and data.labels is not None


def _toy_data(n=50):
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 2, 2).clone()
    images[:, :, :, 1] = 255 - images[:, :, :, 1]  # left and right columns differ, so flips are visible
    return C.Dataset(images, torch.arange(n), n)


def test_get_batch_pure_epochs_and_flips():
    data = _toy_data(50)
    x, y = C.get_batch(data, 3, 8, seed=1)
    assert x.shape == (8, 3, 2, 2) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    x2, y2 = C.get_batch(data, 3, 8, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(C.get_batch(data, 3, 8, seed=2)[1], y)
    # an epoch of 50 examples with batch 10 visits every example exactly once
    seen = torch.cat([C.get_batch(data, s, 10, seed=1)[1] for s in range(5)])
    assert sorted(seen.tolist()) == list(range(50))
    # a batch that straddles two epochs, and the next epoch is a different order
    ys = torch.cat([C.get_batch(data, s, 7, seed=1)[1] for s in range(15)])  # 105 = 2 epochs + 5
    assert sorted(ys[:50].tolist()) == list(range(50)) and sorted(ys[50:100].tolist()) == list(range(50))
    assert not torch.equal(ys[:50], ys[50:100])
    # each image's label matches its pixels; about half of them are mirrored
    xs, ys = zip(*[C.get_batch(data, s, 10, seed=1) for s in range(20)])
    xs, ys = torch.cat(xs), torch.cat(ys)
    u8 = C.to_uint8(xs)
    left = u8[:, 0, 0, 0].long()
    flipped = left != ys
    assert torch.where(flipped, 255 - left, left).tolist() == ys.tolist()
    assert 60 < flipped.sum() < 140
    assert torch.equal(C.get_batch(data, 3, 8, seed=1, flip=False)[0], data.images[y].float() / 127.5 - 1)


def test_get_batch_resume_equivalence_and_rank_sharding():
    data = _toy_data(37)
    straight = [C.get_batch(data, s, 6, seed=4) for s in range(12)]
    # a "resumed" process with a cold cache and a different global RNG state sees the same batches
    C._epoch_perm.cache_clear()
    torch.manual_seed(123)
    resumed = [C.get_batch(data, s, 6, seed=4) for s in range(6, 12)]
    for (xa, ya), (xb, yb) in zip(straight[6:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # 3 ranks x per-rank batch 2 == one process with batch 6
    for s in (0, 5, 11):
        parts = [C.get_batch(data, s, 2, seed=4, rank=r, world_size=3) for r in range(3)]
        assert torch.equal(torch.cat([p[0] for p in parts]), straight[s][0])
        assert torch.equal(torch.cat([p[1] for p in parts]), straight[s][1])


def test_image_folder_loader(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("cats", 2), ("dogs", 3)):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / ("sub" if i == 0 else "") / f"{i}.png")
    data = C.load_dataset(f"folder:{tmp_path}", image_size=16)
    assert data.images.shape == (5, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.num_classes == 2 and data.class_names == ["cats", "dogs"]
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(flat / "a.jpg")
    unlabelled = C.load_dataset(f"folder:{flat}", image_size=8)
    assert unlabelled.labels is None and unlabelled.num_classes == 0 and unlabelled.images.shape == (1, 3, 8, 8)
    (flat / "b.png").write_bytes(b"not an image")
    with pytest.raises(C.DataError, match="b.png"):
        C.load_dataset(f"folder:{flat}")
    with pytest.raises(C.DataError, match="no such folder"):
        C.load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(C.DataError, match="cifar10 \\| shapes"):
        C.load_dataset("imagenet")


# ----------------------------------------------------------------------------------------------------
# 7. images and GIFs
# ----------------------------------------------------------------------------------------------------

def test_to_uint8_grid_and_gif(tmp_path):
    x = torch.linspace(-1.5, 1.5, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    u = C.to_uint8(x)
    assert u.dtype == torch.uint8 and u.min() == 0 and u.max() == 255
    assert C.to_uint8(torch.zeros(1, 1, 1, 1)).item() == 128  # 127.5 rounds half to even
    images, _ = C.make_shapes(5, seed=0, size=8)
    path = C.save_image_grid(images, tmp_path / "a" / "grid.png", nrow=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10, 3)  # 2 rows x 3 columns of 8 px + 2 px padding
    assert np.array_equal(grid[2:10, 12:20], images[1].permute(1, 2, 0).numpy())
    C.save_image_grid(images.float() / 127.5 - 1, tmp_path / "float.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "float.png"))[2:10, 2:10],
                          images[0].permute(1, 2, 0).numpy())
    frames = [np.full((6, 5, 3), 40 * t, dtype=np.uint8) for t in range(4)]
    gif = Image.open(C.save_gif(frames, tmp_path / "a.gif", fps=5, scale=2))
    assert gif.n_frames == 4 and gif.size == (10, 12) and gif.info["duration"] == 200
    gif.seek(3)
    assert np.asarray(gif.convert("RGB"))[0, 0].tolist() == [120, 120, 120]


# ----------------------------------------------------------------------------------------------------
# 8. checkpoints, run folders, logs
# ----------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_kind_and_contents(tmp_path):
    model = nn.Linear(3, 2)
    state = {"kind": "ddpm", "config": {"lr": 1e-3, "mult": [1, 2], "name": None}, "model": model.state_dict(),
             "step": 7, "shape": torch.Size([2, 3])}
    path = C.save_checkpoint(tmp_path / "run" / "ckpt.pt", state)
    loaded = C.load_checkpoint(path, kind="ddpm")
    assert loaded["step"] == 7 and loaded["config"] == state["config"]
    assert torch.equal(loaded["model"]["weight"], model.weight)
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]  # no temporary file left behind
    with pytest.raises(C.CheckpointError, match="'ddpm' checkpoint, but a 'dit'"):
        C.load_checkpoint(path, kind="dit")
    with pytest.raises(C.CheckpointError, match="no checkpoint"):
        C.load_checkpoint(tmp_path / "nope.pt", kind="ddpm")
    (tmp_path / "torn.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(C.CheckpointError, match="cannot load"):
        C.load_checkpoint(tmp_path / "torn.pt", kind="ddpm")
    with pytest.raises(TypeError, match="Namespace"):  # refused at save time, not at load time
        C.save_checkpoint(tmp_path / "bad.pt", {"kind": "ddpm", "args": argparse.Namespace(a=1)})
    assert not (tmp_path / "bad.pt").exists()


def test_atomic_save_survives_crash(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    C.save_checkpoint(path, {"kind": "dit", "step": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    # a kill while the bytes are written ...
    real_save = torch.save
    def half_write(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")
        crash()
    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(path, {"kind": "dit", "step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    # ... and a kill just before the rename
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(path, {"kind": "dit", "step": 3, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert C.load_checkpoint(path, "dit")["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_save_sweeps_partial_files_of_killed_saves(tmp_path):
    # a save killed by SIGKILL cannot clean up: its ".ckpt.pt.tmp-PID" stays until a later save removes it
    import subprocess
    victim = subprocess.Popen(["python3", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    victim.wait()
    dead = tmp_path / f".ckpt.pt.tmp-{victim.pid}"
    live = tmp_path / f".ckpt.pt.tmp-{os.getppid()}"  # a save still running in another process: left alone
    for f in (dead, live):
        f.write_bytes(b"PK\x03\x04 half a zip file")
    C.save_checkpoint(tmp_path / "ckpt.pt", {"kind": "dit", "step": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", live.name])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_weights_only_load_refuses_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "ddpm", "x": _Exploit()}, path)  # torch.save pickles whatever it is given
    with pytest.raises(C.CheckpointError, match="cannot load"):
        C.load_checkpoint(path, kind="ddpm")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"kind": "ddpm", "x": _Exploit()}, protocol=2))
    with pytest.raises(C.CheckpointError):
        C.load_checkpoint(tmp_path / "plain.pkl", kind="ddpm")


def test_run_dir_metrics_log_and_progress(tmp_path, monkeypatch):
    a = C.make_run_dir("ddpm", "shapes", root=tmp_path)
    b = C.make_run_dir("ddpm", "shapes", root=tmp_path)
    assert a != b and a.is_dir() and b.is_dir() and a.name.startswith("ddpm-shapes-2")
    log = C.MetricsLog(a)
    log.log(step=1, loss=torch.tensor(0.5), lr=1e-4)
    log.log(step=2, loss=0.25)
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.25)] and rows[0]["lr"] == 1e-4
    clock = iter([100.0, 102.0])  # a fixed clock: 100 steps of 64 images take exactly 2 s, however loaded the CPU
    monkeypatch.setattr(C.time, "perf_counter", lambda: next(clock))
    p = C.Progress(1000, unit="img")
    line = p.line(100, 0.03123, 64)
    assert line == "step 100/1000 | loss 0.0312 | 3200.0 img/s | ETA 18s"  # 900 steps at 50 steps/s


# ----------------------------------------------------------------------------------------------------
# exact resume on a tiny model: N steps straight == N/2, checkpoint, fresh process state, N/2
# ----------------------------------------------------------------------------------------------------

def _tiny_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


def _train(model, opt, ema, data, steps):
    losses = []
    for step in steps:
        x, y = C.get_batch(data, step, 16, seed=3)
        g = C.step_generator(3, step, 0, "cpu")  # as the scripts' loops: noise and dropout keyed by the step
        x = x + 0.1 * torch.randn(x.shape, generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        C.ema_update(ema, model, 0.9)
        losses.append(loss.item())
    return losses


def test_exact_resume(tmp_path):
    images, labels = C.make_shapes(200, seed=0, size=8)
    data = C.Dataset(images, labels, 10)

    def fresh():
        C.seed_everything(0)
        model = _tiny_model()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2), C.make_ema(model)

    model, opt, ema = fresh()
    straight = _train(model, opt, ema, data, range(20))
    final_ema = {k: v.clone() for k, v in ema.state_dict().items()}

    model, opt, ema = fresh()
    first = _train(model, opt, ema, data, range(10))
    C.save_checkpoint(tmp_path / "ckpt.pt", {"kind": "test", "config": {}, "model": model.state_dict(),
                                             "ema": ema.state_dict(), "opt": opt.state_dict(), "step": 10})
    del model, opt, ema
    C.seed_everything(12345)  # the new process starts from other RNG states
    ckpt = C.load_checkpoint(tmp_path / "ckpt.pt", "test")
    model = _tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.load_state_dict(ckpt["model"])
    ema = C.make_ema(model)
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    second = _train(model, opt, ema, data, range(ckpt["step"], 20))
    assert first + second == straight
    for k, v in ema.state_dict().items():
        assert torch.equal(v, final_ema[k])
