"""common.py — what ddpm.py, dit.py and diamond.py share.

Each section is small and self-contained, so a piece can be lifted into other code:
  1. config <-> command line     dataclass fields become argparse flags
  2. noise schedules              linear / cosine beta, alpha-bar tables in float64
  3. samplers and guidance        one denoiser interface; DDPM, DDIM, Euler, Heun, DPM-Solver++(2M); CFG
  4. EDM pieces                   Karras et al. (2022) preconditioning, sigma schedule, log-normal sigmas
  5. runtime                      seeding, device/dtype, torch.compile, DDP for torchrun, EMA
  6. data                         CIFAR-10 (verified, safely unpickled), image folders, synthetic `shapes`
  7. images and GIFs
  8. checkpoints and run folders  atomic saves, weights_only loads, metrics.jsonl, progress lines
  9. sample-quality metrics       shapes classifier, Frechet distance, precision/recall
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pickle
import random
import tarfile
import time
import typing
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# =====================================================================================================
# 1. config <-> command line
# =====================================================================================================

# A config is one dataclass; every field becomes a flag, so `--help` lists every knob with its default
# and nothing is configured by globals or exec. Field IMG_SIZE / img_size -> flag --img-size.


def _field_types(cfg) -> dict:
    """Resolved type hints of a dataclass (scripts use `from __future__ import annotations`, so
    f.type is a string); {} when they cannot be resolved, and the default's type is used instead."""
    try:
        return typing.get_type_hints(type(cfg))
    except (NameError, TypeError, AttributeError):  # an unresolvable annotation costs the hint, not the flag
        return {}


def _scalar_parser(hint, default):
    """The argparse `type` converter for one value: from the hint (Optional[X] -> X, and the word
    'none' gives None), else from the type of the default."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    base = hint if hint in (int, float, str, bool) else type(default) if default is not None else str
    if base is bool:
        base = lambda s: s.lower() in ("1", "true", "yes", "y")  # noqa: E731  (a bool inside a list)
    if not optional:
        return base
    return lambda s: None if s.lower() == "none" else base(s)


def add_config_args(parser: argparse.ArgumentParser, cfg) -> argparse.ArgumentParser:
    """One flag per dataclass field of the instance `cfg`: `--` + name lowercased with `_` -> `-`.
    Defaults are the instance's values; bools get --x / --no-x; lists and tuples take nargs='+';
    help is field(metadata={"help": ...}) when given, else the type and default. dest = field name."""
    hints = _field_types(cfg)
    for f in dataclasses.fields(cfg):
        default = getattr(cfg, f.name)
        hint = hints.get(f.name, f.type)
        flag = "--" + f.name.lower().replace("_", "-")
        type_name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        help_text = f.metadata.get("help", type_name)
        help_text = f"{help_text} (default: {default!r})".replace("%", "%%")  # argparse %-formats help
        if hint is bool or isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
        elif isinstance(default, (list, tuple)) or typing.get_origin(hint) in (list, tuple):
            elem_hints = [a for a in typing.get_args(hint) if a is not Ellipsis]
            elem_hint = elem_hints[0] if elem_hints else None
            convert = _scalar_parser(elem_hint, default[0] if default else None)
            parser.add_argument(flag, dest=f.name, default=default, help=help_text, nargs="+", type=convert)
        else:
            convert = _scalar_parser(hint, default)
            parser.add_argument(flag, dest=f.name, default=default, help=help_text, type=convert)
    return parser


def config_from_args(cfg, args: argparse.Namespace):
    """A new dataclass instance: `cfg` with the parsed flag values (tuple fields stay tuples)."""
    changes = {}
    for f in dataclasses.fields(cfg):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if isinstance(getattr(cfg, f.name), tuple) and isinstance(value, list):
            value = tuple(value)
        changes[f.name] = value
    return dataclasses.replace(cfg, **changes)


# =====================================================================================================
# 2. noise schedules
# =====================================================================================================

# =====================================================================================================
# 3. samplers and guidance
# =====================================================================================================

# =====================================================================================================
# 4. EDM pieces
# =====================================================================================================

# =====================================================================================================
# 5. runtime: seeding, device, compile, DDP, EMA
# =====================================================================================================

def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU). Data order does not depend on these global
    RNGs: get_batch draws from its own seeded generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps (Apple GPU), else cpu; any other name is used as given."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (use auto | cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device, enabled: bool = True):
    """bf16 autocast on GPUs that support it (Ampere+: bf16 needs no loss scaling, unlike fp16);
    a no-op elsewhere. CPU bf16 autocast exists but is usually slower than fp32, so it is not used."""
    device = torch.device(device)
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile the module's forward in place (nn.Module.compile), so state_dict keys keep their
    names (no `_orig_mod.` prefix) and checkpoints load into an uncompiled model. Returns the module."""
    if enabled:
        module.compile()
    return module


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly 1-process) data-parallel job."""
    rank: int = 0         # global process index, 0..world_size-1
    world_size: int = 1   # number of processes
    local_rank: int = 0   # index on this machine (picks the GPU)
    device: torch.device = torch.device("cpu")
    is_main: bool = True  # rank 0: prints, logs, writes checkpoints


def setup_ddp(device: str = "auto") -> Dist:
    """Join the process group started by `torchrun` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL with one GPU per process, else gloo on CPU. Outside torchrun: world_size 1, no
    process group, device = pick_device(device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=pick_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and (device == "auto" or device.startswith("cuda")):  # one GPU per process
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, dev, rank == 0)


def wrap_ddp(model: nn.Module, dist: Dist) -> nn.Module:
    """DistributedDataParallel when world_size > 1 (gradients are averaged over ranks in backward),
    else the model itself. Save `model.state_dict()` of the unwrapped model, not of the wrapper."""
    if dist.world_size == 1:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def cleanup_ddp() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_mean(value: float, dist: Dist) -> float:
    """Average a scalar (e.g. the loss for the progress line) over all ranks; identity without DDP."""
    if dist.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=dist.device if dist.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t)
    return t.item() / dist.world_size


# EMA of weights (Polyak averaging): theta_ema <- decay * theta_ema + (1 - decay) * theta. Samples come
# from the EMA model; the official DDPM and DiT use decay 0.9999.

def make_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy in eval mode that ema_update keeps averaging."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: ema = decay * ema + (1 - decay) * model for float parameters and buffers; integer
    buffers (e.g. BatchNorm's num_batches_tracked) are copied. Matching is by name."""
    model_params = dict(model.named_parameters())
    for name, p in ema.named_parameters():
        p.lerp_(model_params[name].detach(), 1.0 - decay)
    model_buffers = dict(model.named_buffers())
    for name, b in ema.named_buffers():
        src = model_buffers[name]
        if b.dtype.is_floating_point:
            b.lerp_(src, 1.0 - decay)
        else:
            b.copy_(src)


# =====================================================================================================
# 6. data
# =====================================================================================================

class DataError(ValueError):
    """The dataset is missing, corrupt or unsafe; the message says how to fix it."""


@dataclasses.dataclass
class Dataset:
    """A whole dataset in memory (CIFAR-10's 50k images are 150 MB as uint8)."""
    images: torch.Tensor                    # uint8 (N, 3, H, W)
    labels: Optional[torch.Tensor] = None   # int64 (N,), or None when unlabelled
    num_classes: int = 0                    # 0 when unlabelled
    class_names: Optional[list] = None      # label index -> name, when known


# --- synthetic `shapes`: offline, class-conditional, deterministic --------------------------------------
# Ten classes, each one shape in its own colour, drawn at a random position, size and slight rotation on
# a random dark, slightly tinted gradient background. Shapes are drawn from signed distance functions
# (SDFs, < 0 inside) in the shape's own unit frame, with a one-pixel soft edge (anti-aliasing).

SHAPES_CLASSES = ["circle", "square", "triangle", "plus", "ring",
                  "diamond", "frame", "x", "half_disc", "bar"]
SHAPES_COLORS = [(0.92, 0.16, 0.16), (0.20, 0.85, 0.25), (0.25, 0.40, 0.97), (0.95, 0.85, 0.20),
                 (0.90, 0.25, 0.85), (0.20, 0.85, 0.90), (0.98, 0.55, 0.10), (0.95, 0.95, 0.95),
                 (0.60, 0.30, 0.95), (0.98, 0.55, 0.70)]  # RGB in [0, 1], one per class
SHAPES_TRAIN_N = 10_000  # images of load_dataset("shapes") (seed 0)


def _box(u, v, half_u, half_v):
    """Approximate SDF of an axis-aligned box (exact outside along the axes; fine for 1-px edges)."""
    return torch.maximum(u.abs() - half_u, v.abs() - half_v)


def _shape_sdf(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDF of one class in unit coordinates (the shape spans about [-1, 1]; v points down)."""
    r = torch.sqrt(u * u + v * v)
    if name == "circle":
        return r - 1.0
    if name == "square":
        return _box(u, v, 0.8, 0.8)
    if name == "triangle":  # apex (0, -1), base v = 0.7 between u = +-1: each slanted edge is a half-plane
        return torch.maximum(v - 0.7, (1.7 * u.abs() - v - 1.0) / math.hypot(1.7, 1.0))
    if name == "plus":
        return torch.minimum(_box(u, v, 0.3, 0.95), _box(u, v, 0.95, 0.3))
    if name == "ring":
        return (r - 0.72).abs() - 0.25
    if name == "diamond":
        return (u.abs() + v.abs() - 1.0) / math.sqrt(2)
    if name == "frame":  # hollow square
        m = torch.maximum(u.abs(), v.abs())
        return torch.maximum(m - 0.9, 0.5 - m)
    if name == "x":  # the plus turned by 45 degrees
        a, b = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        return torch.minimum(_box(a, b, 0.25, 1.0), _box(a, b, 1.0, 0.25))
    if name == "half_disc":  # upper half of a disc
        return torch.maximum(r - 1.0, v - 0.2)
    if name == "bar":
        return _box(u, v, 1.0, 0.3)
    raise ValueError(f"unknown shape {name!r}")


def make_shapes(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of the synthetic `shapes` data: (uint8 (n, 3, size, size), int64 labels (n,)).
    Classes are balanced (each appears n // 10 or n // 10 + 1 times) in random order; the result
    depends only on (n, seed, size). Vectorised: 5000 images take ~0.2-0.4 s on one CPU core."""
    g = torch.Generator().manual_seed(seed)
    k = len(SHAPES_CLASSES)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731  (uniform [0, 1))
    # per-image draws (all drawn up front so every image depends only on the seed and its index)
    center = (0.32 + 0.36 * rand(n, 2)) * size                     # shape centre in pixels
    radius = (0.20 + 0.10 * rand(n)) * size                        # half-extent in pixels
    angle = (rand(n) - 0.5) * 0.6                                  # +-17 degrees
    brightness = 0.8 + 0.25 * rand(n, 1)
    fg_tint = (rand(n, 3) - 0.5) * 0.1
    bg_gray = 0.05 + 0.30 * rand(n, 1)
    bg_tint = (rand(n, 3) - 0.5) * 0.12
    bg_slope = (rand(n, 2) - 0.5) * 0.3                            # background gradient across the image
    colors = torch.tensor(SHAPES_COLORS)[labels]
    fg = (colors * brightness + fg_tint).clamp(0, 1)               # (n, 3)
    bg0 = (bg_gray + bg_tint).clamp(0, 1)                          # (n, 3)

    # Everything before the shape is separable: a pixel's offset from the centre is a column term plus a
    # row term, so u, v and the background ramp cost one full-size pass each.
    pix = torch.arange(size, dtype=torch.float32) + 0.5           # pixel centres
    dx = (pix - center[:, :1])[:, None, :] / radius[:, None, None]  # (n, 1, size): column offset in radii
    dy = (pix - center[:, 1:])[:, :, None] / radius[:, None, None]  # (n, size, 1): row offset
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u, v = cos * dx + sin * dy, cos * dy - sin * dx                # (n, size, size): rotated shape frame
    sdf = torch.empty(n, size, size)
    for c, name in enumerate(SHAPES_CLASSES):
        idx = (labels == c).nonzero().squeeze(1)
        sdf[idx] = _shape_sdf(name, u[idx], v[idx])
    alpha = (0.5 - sdf * radius[:, None, None]).clamp_(0, 1)[:, None]  # (n, 1, size, size): 1-px soft edge
    ramp = (pix / size - 0.5) * bg_slope[:, :, None]               # (n, 2, size): x and y gradients
    bg = (bg0[:, :, None, None] + ramp[:, None, 0, None, :]) + ramp[:, None, 1, :, None]
    img = torch.lerp(bg.clamp_(0, 1), fg[:, :, None, None].expand_as(bg), alpha)  # (n, 3, size, size)
    return img.mul_(255).round_().to(torch.uint8), labels.long()


# --- CIFAR-10 ----------------------------------------------------------------------------------------------
# The official python-format archive (Krizhevsky, 2009): cifar-10-batches-py/data_batch_1..5 (10k train
# images each) and test_batch, each a Python 2 pickle of {"data": uint8 (10000, 3072) array (rows are
# R, G, B planes of 32x32), "labels": list of ints, ...}. Unpickling normally runs any code the file
# names, so the archive is (1) checked against the official MD5, (2) extracted member by member with
# anything but plain files and folders inside the target refused, and (3) read with an unpickler that
# can build only numpy arrays and dtypes.

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the dataset page
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def file_md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest) -> Path:
    """Stream url to dest through a temporary file (an interrupted download never looks complete)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        os.replace(tmp, dest)
    except OSError as e:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        raise DataError(f"could not download {url} ({e}); download it by hand and put it at {dest}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def safe_extract(archive, dest) -> dict:
    """Extract a .tar(.gz) into dest after checking EVERY member first: absolute paths, '..' parts,
    symbolic and hard links, devices and FIFOs are refused with DataError (nothing is written then).
    Only file contents are written (no modes, owners or times from the archive).
    Returns {member name: md5 of its bytes} of the files written."""
    dest = Path(dest).resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name.replace("\\", "/")).parts
                if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts:
                    raise DataError(f"{archive}: unsafe member path {m.name!r} (absolute or with '..'); "
                                    f"refusing to extract — delete the archive and download it again")
                if not (m.isfile() or m.isdir()):
                    kind = "link" if (m.issym() or m.islnk()) else "device or special file"
                    raise DataError(f"{archive}: member {m.name!r} is a {kind}; refusing to extract — "
                                    f"delete the archive and download it again")
                if not (dest / m.name).resolve().is_relative_to(dest):
                    raise DataError(f"{archive}: member {m.name!r} would land outside {dest}; refusing to extract")
            digests = {}
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                data = tar.extractfile(m).read()
                target.write_bytes(data)
                digests[m.name] = hashlib.md5(data).hexdigest()
            return digests
    except (tarfile.TarError, EOFError, OSError) as e:  # OSError: e.g. a truncated gzip stream
        raise DataError(f"{archive} is not a readable tar archive ({e}); delete it and download it again") from e


def _numpy_reconstruct():
    """numpy's array-rebuilding function: numpy._core in numpy >= 2, numpy.core before."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR-10 batch references (numpy arrays: _reconstruct, ndarray,
    dtype; Python 2 pickles name numpy.core, numpy 2 pickles numpy._core). Containers, strings and
    numbers need no globals. Anything else (os.system, builtins.eval, ...) is refused, never imported."""

    def find_class(self, module: str, name: str):
        allowed = {("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
                   ("numpy", "ndarray"): lambda: np.ndarray,
                   ("numpy", "dtype"): lambda: np.dtype}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")
        return allowed[(module, name)]()


def read_cifar_batch(raw: bytes, name: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch (its bytes) -> (uint8 (N, 3, 32, 32), int64 (N,)), unpickled safely."""
    try:
        # latin1: Python 2 str objects (keys, numpy's raw array bytes) decode 1:1 to Python 3 str
        batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{name}: refused to unpickle: {e}. The file is not an official CIFAR-10 batch; "
                        f"delete the data folder and the archive and download it again") from e
    except Exception as e:  # any other parse failure means a damaged file
        raise DataError(f"{name} is corrupt ({type(e).__name__}: {e}); delete it and download again") from e
    if not isinstance(batch, dict):
        raise DataError(f"{name}: expected a dict, got {type(batch).__name__}")
    data = batch.get("data", batch.get(b"data"))
    labels = batch.get("labels", batch.get(b"labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(i, int) and 0 <= i < 10 for i in labels)):
        raise DataError(f"{name}: not a CIFAR-10 batch (needs uint8 data (N, 3072) and N labels in 0..9)")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels, dtype=torch.long)


def load_cifar10(root="data", train: bool = True, download: bool = True,
                 md5: Optional[str] = None, url: Optional[str] = None) -> Dataset:
    """CIFAR-10 train (50k) or test (10k) images from root/cifar-10-python.tar.gz, downloaded when
    missing, MD5-checked on every call, extracted safely to root/cifar-10-batches-py once (the digests
    of the extracted files are recorded, and a damaged extracted file is re-extracted from the
    archive). md5 and url default to CIFAR10_MD5 and CIFAR10_URL (tests pass their own)."""
    md5, url = md5 or CIFAR10_MD5, url or CIFAR10_URL
    root = Path(root)
    archive = root / CIFAR10_ARCHIVE
    if not archive.is_file():
        if not download:
            raise DataError(f"CIFAR-10 archive not found at {archive}: download {url} (MD5 {md5}) and put it "
                            f"there, or allow downloading")
        download_file(url, archive)
    got = file_md5(archive)
    if got != md5:
        raise DataError(f"{archive} has MD5 {got}, expected {md5}: the file is damaged or not the official "
                        f"archive. Delete it and run again to download {url}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    marker = root / CIFAR10_DIR / ".extracted.json"  # {"archive_md5": ..., "files": {member: md5}}
    digests = json.loads(marker.read_text()) if marker.is_file() else {}
    if digests.get("archive_md5") != md5:
        digests = {"archive_md5": md5, "files": safe_extract(archive, root)}
        marker.write_text(json.dumps(digests, indent=1))
    images, labels = [], []
    for name in names:
        member = f"{CIFAR10_DIR}/{name}"
        if member not in digests["files"]:
            raise DataError(f"{archive} has no member {member}: it is not the official CIFAR-10 archive")
        path = root / member
        raw = path.read_bytes() if path.is_file() else b""
        if hashlib.md5(raw).hexdigest() != digests["files"][member]:  # changed since extraction: redo it
            digests = {"archive_md5": md5, "files": safe_extract(archive, root)}
            marker.write_text(json.dumps(digests, indent=1))
            raw = path.read_bytes()
        x, y = read_cifar_batch(raw, str(path))
        images.append(x)
        labels.append(y)
    return Dataset(torch.cat(images), torch.cat(labels), 10, list(CIFAR10_CLASSES))


# --- image folders -----------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _load_image(path: Path, size: int) -> np.ndarray:
    """RGB, centre-cropped to a square, resized to size x size (bicubic, antialiased by pillow):
    (size, size, 3) uint8."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError) as e:  # pillow: UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path}: {e}; delete or replace the file") from e
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def load_image_folder(root, image_size: int = 32) -> Dataset:
    """Every image under `root`, recursively, in sorted path order. When every image lies inside a
    sub-folder of root, the first-level sub-folder names are the classes (sorted; like ImageFolder);
    otherwise the dataset is unlabelled."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--dataset folder:{root}: no such folder (give the path of a folder of images)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"--dataset folder:{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in it "
                        f"or its sub-folders")
    images = torch.from_numpy(np.stack([_load_image(p, image_size) for p in files])).permute(0, 3, 1, 2)
    parts = [p.relative_to(root).parts for p in files]
    if all(len(part) > 1 for part in parts):
        class_names = sorted({part[0] for part in parts})
        index = {c: i for i, c in enumerate(class_names)}
        labels = torch.tensor([index[part[0]] for part in parts], dtype=torch.long)
        return Dataset(images.contiguous(), labels, len(class_names), class_names)
    return Dataset(images.contiguous())


def load_dataset(name: str, root="data", image_size: int = 32, download: bool = True,
                 train: bool = True) -> Dataset:
    """'cifar10' (50k training or, train=False, 10k test images; downloaded to root on first use and
    checked), 'shapes' (SHAPES_TRAIN_N synthetic images, seed 0) or 'folder:PATH'. Images are resized
    to image_size when they have another size. Raises DataError with the fix."""
    if name == "shapes":
        images, labels = make_shapes(SHAPES_TRAIN_N if train else SHAPES_TRAIN_N // 5, seed=0 if train else 1,
                                     size=image_size)
        return Dataset(images, labels, len(SHAPES_CLASSES), list(SHAPES_CLASSES))
    if name.startswith("folder:"):
        return load_image_folder(name[len("folder:"):], image_size)
    if name == "cifar10":
        data = load_cifar10(root, train=train, download=download)
        if image_size != data.images.shape[-1]:
            x = F.interpolate(data.images.float(), size=(image_size, image_size), mode="bicubic",
                              antialias=True, align_corners=False)
            data.images = x.round().clamp(0, 255).to(torch.uint8)
        return data
    raise DataError(f"--dataset {name!r}: use cifar10 | shapes | folder:PATH")


# --- batches ---------------------------------------------------------------------------------------------
# Data order is a pure function of (seed, step, rank), not of any generator state: a resumed run at step
# s draws exactly the batches an uninterrupted run would, and no loader state needs checkpointing.


def _seed_of(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence hashing, so (1, 2) and (2, 1) differ)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


@functools.lru_cache(maxsize=4)
def _epoch_perm(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the n examples in one epoch (cached: a batch needs one or two of them)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(seed, 0, epoch)))


def get_batch(data: Dataset, step: int, batch_size: int, seed: int, flip: bool = True, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Batch `step` for process `rank`: (x float32 in [-1, 1] (B, 3, H, W), y int64 (B,) or None).
    batch_size is the per-rank batch B; the global batch of a step is world_size * B consecutive
    examples of a fresh random permutation per epoch, and rank r takes the r-th block of B, so
    world_size ranks together see exactly the batch one process with B * world_size would see.
    Horizontal flips (prob. 1/2) are drawn per global position from a generator seeded by (seed,
    step), so they also agree across world sizes."""
    n = len(data.images)
    global_batch = batch_size * world_size
    pos = step * global_batch + rank * batch_size + torch.arange(batch_size)  # positions in the stream
    epochs = pos // n
    idx = torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        idx[sel] = _epoch_perm(seed, e, n)[pos[sel] % n]
    x = data.images[idx.to(data.images.device)].float() / 127.5 - 1.0
    if flip:
        g = torch.Generator().manual_seed(_seed_of(seed, 1, step))
        mirror = (torch.rand(global_batch, generator=g) < 0.5)[rank * batch_size:(rank + 1) * batch_size]
        x = torch.where(mirror.to(x.device)[:, None, None, None], x.flip(3), x)
    y = data.labels[idx.to(data.labels.device)] if data.labels is not None else None
    return x, y


# =====================================================================================================
# 7. images and GIFs
# =====================================================================================================

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, C, H, W) in [0, 255] (clamped, rounded)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_image_grid(images, path, nrow: Optional[int] = None, pad: int = 2) -> Path:
    """Write a PNG grid of images (N, C, H, W), float in [-1, 1] or uint8, C = 1 or 3; nrow images per
    row (default: ceil(sqrt(N))), `pad` black pixels between them. Returns the path."""
    images = torch.as_tensor(images).detach().cpu()
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_image_grid expects (N, 1|3, H, W) images, got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.zeros(3, ncol * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def save_gif(frames, path, fps: float = 10, scale: int = 1) -> Path:
    """Write an animated GIF (loops forever). frames: uint8 (T, H, W, 3) numpy/tensor or a list of
    (H, W, 3) frames; float frames in [-1, 1] and (T, 3, H, W) layouts are converted. `scale` enlarges
    each frame by pixel repetition (64x64 Atari frames are tiny). Returns the path."""
    if isinstance(frames, (list, tuple)):
        frames = torch.stack([torch.as_tensor(np.asarray(f)) for f in frames])
    frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames).cpu()
    if frames.ndim != 4:
        raise ValueError(f"save_gif expects (T, H, W, 3) frames, got {tuple(frames.shape)}")
    if frames.shape[-1] != 3 and frames.shape[1] == 3:  # (T, 3, H, W) -> (T, H, W, 3)
        frames = frames.permute(0, 2, 3, 1)
    if frames.dtype != torch.uint8:
        frames = to_uint8(frames)
    if scale > 1:
        frames = frames.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pics = [Image.fromarray(f) for f in frames.numpy()]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path


# =====================================================================================================
# 8. checkpoints, run folders, metrics log
# =====================================================================================================

class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe (holds pickled code) or of another kind."""


_PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_plain(obj, where: str = "state") -> None:
    """Refuse at save time what torch.load(weights_only=True) would refuse at load time (e.g. a
    dataclass or argparse.Namespace: store dataclasses.asdict(cfg) instead)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_TYPES):
        raise TypeError(f"{where} is a {type(obj).__name__}: checkpoints hold only dicts, lists, tuples, "
                        f"str/int/float/bool/None and tensors, so they load with weights_only=True")


def save_checkpoint(path, state: dict) -> Path:
    """Write `state` atomically: torch.save to a temporary file in the same folder, fsync, then
    os.replace over `path` (atomic on POSIX and Windows). A crash or kill at any moment leaves either
    the previous checkpoint or the new one, never a torn file. Returns the path."""
    _check_plain(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the save failed before the rename: drop the partial file, keep the old one
            tmp.unlink()
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def load_checkpoint(path, kind: str, map_location="cpu") -> dict:
    """Load a checkpoint written by save_checkpoint with torch.load(weights_only=True) (a file holding
    pickled code is refused, not run) and check state["kind"] == kind. Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on damage
        raise CheckpointError(f"cannot load {path} safely (corrupt, truncated, or holds pickled objects "
                              f"other than tensors and plain types): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "kind" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'kind' entry)")
    if state["kind"] != kind:
        raise CheckpointError(f"{path} is a {state['kind']!r} checkpoint, but a {kind!r} checkpoint "
                              f"is needed (use {state['kind']}.py for it)")
    return state


def rng_state() -> dict:
    """Python, numpy, torch CPU (and CUDA) RNG states, as plain types and tensors (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned, so the random stream continues exactly."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(i) for i in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def make_run_dir(kind: str, name: str, root="runs") -> Path:
    """Create and return runs/<kind>-<name>-<YYYYmmdd-HHMMSS>/ (with -2, -3... if taken). Call it on the
    main rank only."""
    base = Path(root) / f"{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            i += 1
            path = base.with_name(f"{base.name}-{i}")


class MetricsLog:
    """Appends one JSON object per .log() call to run_dir/metrics.jsonl (easy to load with pandas or
    `[json.loads(l) for l in open(p)]`). Tensors become floats."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, **metrics) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            row[k] = v.item() if isinstance(v, torch.Tensor) else v
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Progress lines: `.line(step, loss, items)` -> "step 100/800000 | loss 0.0312 | 512.3 img/s |
    ETA 3h12m", where items = items (images, frames...) processed per step, e.g. the global batch
    size. Speed and ETA are measured since the previous line (or since construction)."""

    def __init__(self, total_steps: int, unit: str = "img", start_step: int = 0):
        self.total_steps, self.unit = total_steps, unit
        self.last_step, self.last_time = start_step, time.perf_counter()

    def line(self, step: int, loss: float, items: int = 1) -> str:
        now = time.perf_counter()
        dt, dsteps = max(now - self.last_time, 1e-9), step - self.last_step
        self.last_step, self.last_time = step, now
        rate = dsteps * items / dt
        eta = (self.total_steps - step) * dt / dsteps if dsteps > 0 else float("nan")
        eta_text = _format_duration(eta) if math.isfinite(eta) else "?"
        return (f"step {step}/{self.total_steps} | loss {float(loss):.4f} | {rate:.1f} {self.unit}/s | "
                f"ETA {eta_text}")


# =====================================================================================================
# 9. sample-quality metrics
# =====================================================================================================

# Offline stand-ins for FID and precision/recall on the synthetic `shapes` data. FID (Heusel et al.,
# 2017) compares Inception-v3 pool features, whose weights cannot be downloaded here; a small CNN
# trained on real `shapes` plays Inception's role. Its global-average-pooled last conv layer
# (SHAPES_FEAT_DIM values, like Inception's 2048-d pool3) is the feature space of
#   - shapes-FD: the FID formula ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)),
#   - precision / recall of Kynkaanniemi et al. (2019), from k-NN balls around feature vectors,
# and its logits give the class accuracy of class-conditional samples. Each `shapes` class has its own
# colour, so the classifier is trained on recoloured images to read the class from the shape; its
# features are then fairly colour-blind too (held-out real images: FD 0.26; the same with R,G,B
# channels swapped: FD 0.84; blurred: 10; two classes only: 65; uniform noise: 100).
# FD and the k-NN metrics are biased in the number of samples: compare at the same N and classifier key.
# For real FID on CIFAR-10, write samples with `--npz` and use the ADM evaluator (see README).

SHAPES_CLF_VERSION = 2       # bump when the recipe changes; it enters the cache key
SHAPES_CLF_TRAIN_SEED = 101  # make_shapes seed of the classifier's training images
SHAPES_CLF_TRAIN_N = 4000    # training images, seen SHAPES_CLF_EPOCHS times
SHAPES_CLF_EPOCHS = 3
SHAPES_CLF_GRAY_P = 0.25     # colour augmentation: channel permutation always, grayscale with this probability
SHAPES_CLF_LR = 3e-3         # Adam, decayed linearly to 0
SHAPES_CLF_BATCH = 128
SHAPES_REAL_SEED = 202       # held-out make_shapes seed of the real reference set (never trained on)
SHAPES_FEAT_DIM = 128        # width of the feature layer

_SHAPES_MEMO: dict = {}      # in-process cache of the classifier and real features, by cache key


def shapes_classifier_net(num_classes: int, feat_dim: int = SHAPES_FEAT_DIM) -> nn.Sequential:
    """Four conv-BN-ReLU layers (32 -> 16 -> 8 -> 4 pixels), global average pool, linear head.
    Input (N, 3, H, W) float in [-1, 1]; net[:-1](x) -> (N, feat_dim) features, net(x) -> logits.
    BatchNorm is what makes a few seconds of training enough: without it the same recipe reached 58%
    held-out accuracy instead of 99.7%."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(
        *block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
        *block(64, feat_dim), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (N, feat_dim): this metric's "pool3"
        nn.Linear(feat_dim, num_classes),
    )


def shapes_cache_key() -> str:
    """Hash of the recipe and of a few generated images: a change to make_shapes or to the recipe
    gives a new key (and a new cache file), so a stale classifier is never loaded."""
    images, labels = make_shapes(16, seed=0, size=32)
    recipe = (SHAPES_CLF_VERSION, SHAPES_CLF_TRAIN_SEED, SHAPES_CLF_TRAIN_N, SHAPES_CLF_EPOCHS,
              SHAPES_CLF_GRAY_P, SHAPES_CLF_LR, SHAPES_CLF_BATCH, SHAPES_FEAT_DIM, len(SHAPES_CLASSES))
    h = hashlib.sha256(repr(recipe).encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:12]


def recolour(x: torch.Tensor, g: torch.Generator, gray_p: float = SHAPES_CLF_GRAY_P) -> torch.Tensor:
    """Colour augmentation of (B, 3, H, W) images: a random RGB permutation per image, and grayscale with
    probability gray_p. Every `shapes` class has its own colour, so without this the classifier learns
    colour only (measured: 100% on real images, 37% once their channels are permuted, 19% in grayscale)
    and would call a red blob a circle; with it, the class is read from the shape."""
    perm = torch.rand(len(x), 3, generator=g).argsort(1)                 # (B, 3) channel orders
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gray = torch.rand(len(x), generator=g) < gray_p
    return torch.where(gray[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)


def train_shapes_classifier(seed: int = SHAPES_CLF_TRAIN_SEED) -> nn.Sequential:
    """Train the reference classifier on make_shapes(SHAPES_CLF_TRAIN_N, seed), deterministically.
    The global RNG is left as it was, so a training loop that evaluates still resumes exactly, and
    gradients are switched on even when the caller evaluates under no_grad / inference_mode."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        images, labels = make_shapes(SHAPES_CLF_TRAIN_N, seed=seed, size=32)
        x = images.float() / 127.5 - 1
        g = torch.Generator().manual_seed(seed)  # batch order and augmentation
        torch.manual_seed(seed)  # weight init
        net = shapes_classifier_net(len(SHAPES_CLASSES))
        opt = torch.optim.Adam(net.parameters(), lr=SHAPES_CLF_LR)
        total = SHAPES_CLF_EPOCHS * math.ceil(len(x) / SHAPES_CLF_BATCH)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total)
        for _ in range(SHAPES_CLF_EPOCHS):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), SHAPES_CLF_BATCH):
                idx = perm[i:i + SHAPES_CLF_BATCH]
                loss = F.cross_entropy(net(recolour(x[idx], g)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net.eval().requires_grad_(False)


def shapes_classifier(cache_dir: Optional[str] = None) -> nn.Sequential:
    """The reference classifier (eval mode, CPU): from this process's memo, else from
    cache_dir/shapes_classifier-KEY.pt (a state dict, loaded weights_only), else trained in seconds
    and written there. With cache_dir=None it is trained once per process."""
    key = shapes_cache_key()
    if ("clf", key) not in _SHAPES_MEMO:
        path = Path(cache_dir) / f"shapes_classifier-{key}.pt" if cache_dir is not None else None
        if path is not None and path.exists():
            net = shapes_classifier_net(len(SHAPES_CLASSES))
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            net.eval().requires_grad_(False)
        else:
            net = train_shapes_classifier()
            if path is not None:  # write a temporary file, then rename: readers never see half a file
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
                torch.save(net.state_dict(), tmp)
                os.replace(tmp, path)
        _SHAPES_MEMO[("clf", key)] = net
    return _SHAPES_MEMO[("clf", key)]


@torch.no_grad()
def shapes_features(net: nn.Sequential, images: torch.Tensor, batch_size: int = 500):
    """uint8 images (N, 3, H, W) -> (features float64 (N, D), logits float32 (N, classes))."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    feats, logits = [], []
    for chunk in images.cpu().split(batch_size):
        f = net[:-1](chunk.float() / 127.5 - 1)
        feats.append(f.double())
        logits.append(net[-1](f))
    return torch.cat(feats), torch.cat(logits)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose argmax class is the class they were generated for."""
    assert labels.shape == logits.shape[:1], f"labels {tuple(labels.shape)} vs logits {tuple(logits.shape)}"
    return (logits.argmax(1) == labels.cpu()).double().mean().item()


def frechet_distance_gaussians(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
        d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).
    sigma1 sigma2 is not symmetric, but it is similar to M = sigma1^(1/2) sigma2 sigma1^(1/2), which is
    symmetric PSD, so Tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(M)). Two symmetric eigh calls are
    stable even for singular covariances (no scipy sqrtm, no complex parts to discard)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    evals, evecs = torch.linalg.eigh(sigma1)
    sqrt1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T  # sigma1^(1/2)
    m = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return d2.item()


def frechet_distance(feats_a, feats_b) -> float:
    """FID formula on two feature sets (N, D) and (M, D): fit a Gaussian to each (mean, unbiased
    covariance as in FID's np.cov), then frechet_distance_gaussians."""
    a = torch.as_tensor(feats_a, dtype=torch.float64)
    b = torch.as_tensor(feats_b, dtype=torch.float64)
    return frechet_distance_gaussians(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def _knn_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (column 0 of the sorted row is itself)."""
    return torch.cat([torch.cdist(f, feats).kthvalue(k + 1, dim=1).values for f in feats.split(chunk)])


def _in_manifold(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024):
    """For each query row: does it fall inside at least one ball B(support_j, radii_j)?"""
    return torch.cat([(torch.cdist(q, support) <= radii).any(1) for q in query.split(chunk)])


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019). The real manifold is the union of
    balls around each real feature with radius = distance to its k-th nearest real neighbour;
    precision = fraction of fake samples inside the real manifold (are samples realistic?),
    recall = fraction of real samples inside the fake manifold (is the data's variety covered?)."""
    real = torch.as_tensor(real_feats, dtype=torch.float64)
    fake = torch.as_tensor(fake_feats, dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall needs more than k={k} samples per set, got {len(real)} and {len(fake)}")
    precision = _in_manifold(fake, real, _knn_radii(real, k)).double().mean().item()
    recall = _in_manifold(real, fake, _knn_radii(fake, k)).double().mean().item()
    return precision, recall


def evaluate_samples(fake_uint8: torch.Tensor, fake_labels: Optional[torch.Tensor] = None,
                     cache_dir: Optional[str] = None, n_real: Optional[int] = None) -> dict:
    """Sample quality of generated `shapes` images against n_real (default: as many as the samples)
    held-out real images: {"shapes_fd", "precision", "recall"} plus "class_acc" when fake_labels (the
    classes the samples were generated for) is given. A few seconds for N=500 on CPU once the
    classifier is cached; the global RNG is not touched."""
    if fake_uint8.dtype != torch.uint8 or fake_uint8.ndim != 4 or tuple(fake_uint8.shape[1:]) != (3, 32, 32):
        raise ValueError(f"evaluate_samples expects uint8 (N, 3, 32, 32) images, got "
                         f"{fake_uint8.dtype} {tuple(fake_uint8.shape)} (convert with to_uint8)")
    net = shapes_classifier(cache_dir)
    n_real = len(fake_uint8) if n_real is None else n_real
    real_key = ("real", shapes_cache_key(), n_real)
    if real_key not in _SHAPES_MEMO:
        _SHAPES_MEMO[real_key] = shapes_features(net, make_shapes(n_real, seed=SHAPES_REAL_SEED, size=32)[0])[0]
    real_feats = _SHAPES_MEMO[real_key]
    fake_feats, logits = shapes_features(net, fake_uint8)
    precision, recall = precision_recall(real_feats, fake_feats, k=3)
    metrics = {"shapes_fd": frechet_distance(real_feats, fake_feats)}
    if fake_labels is not None:
        metrics["class_acc"] = class_accuracy(logits, fake_labels)
    metrics.update(precision=precision, recall=recall)
    return metrics


def format_metrics_table(rows: list) -> str:
    """A Markdown table (pastes into the README) of a list of dicts; columns in first-seen order,
    floats to 4 significant digits, missing entries blank."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    table = [columns, ["---"] * len(columns)] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |" for r in table)
