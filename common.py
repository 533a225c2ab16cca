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

import hashlib
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# =====================================================================================================
# 1. config <-> command line
# =====================================================================================================

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

# =====================================================================================================
# 6. data
# =====================================================================================================

# =====================================================================================================
# 7. images and GIFs
# =====================================================================================================

# =====================================================================================================
# 8. checkpoints, run folders, metrics log
# =====================================================================================================

# =====================================================================================================
# 9. sample-quality metrics
# =====================================================================================================

# Offline stand-ins for FID and precision/recall on the synthetic `shapes` data. FID (Heusel et al.,
# 2017) compares Inception-v3 pool features, whose weights cannot be downloaded here; a small CNN
# trained on real `shapes` plays Inception's role. Its global-average-pooled last conv layer
# (SHAPES_FEAT_DIM values, like Inception's 2048-d pool3) is the feature space of
#   - shapes-FD: the FID formula ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)),
#   - precision / recall of Kynkaanniemi et al. (2019), from k-NN balls around feature vectors,
# and its logits give the class accuracy of class-conditional samples. FD and the k-NN metrics are
# biased in the number of samples: compare numbers at the same N and the same classifier key.
# For real FID on CIFAR-10, write samples with `--npz` and use the ADM evaluator (see README).

SHAPES_CLF_VERSION = 1       # bump when the recipe changes; it enters the cache key
SHAPES_CLF_TRAIN_SEED = 101  # make_shapes seed of the classifier's training images
SHAPES_CLF_TRAIN_N = 4000    # training images, seen SHAPES_CLF_EPOCHS times
SHAPES_CLF_EPOCHS = 2
SHAPES_CLF_LR = 3e-3         # Adam, decayed linearly to 0
SHAPES_CLF_BATCH = 128
SHAPES_REAL_SEED = 202       # held-out make_shapes seed of the real reference set (never trained on)
SHAPES_FEAT_DIM = 128        # width of the feature layer

_SHAPES_MEMO: dict = {}      # in-process cache of the classifier and real features, by cache key


def shapes_classifier_net(num_classes: int, feat_dim: int = SHAPES_FEAT_DIM) -> nn.Sequential:
    """Four conv-BN-ReLU layers (32 -> 16 -> 8 -> 4 pixels), global average pool, linear head.
    Input (N, 3, H, W) float in [-1, 1]; net[:-1](x) -> (N, feat_dim) features, net(x) -> logits.
    BatchNorm is there for speed: without it the same budget reaches ~90% accuracy, not ~100%."""
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
              SHAPES_CLF_LR, SHAPES_CLF_BATCH, SHAPES_FEAT_DIM, len(SHAPES_CLASSES))
    h = hashlib.sha256(repr(recipe).encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:12]


def train_shapes_classifier(seed: int = SHAPES_CLF_TRAIN_SEED) -> nn.Sequential:
    """Train the reference classifier on make_shapes(SHAPES_CLF_TRAIN_N, seed), deterministically.
    The global RNG is left as it was, so a training loop that evaluates still resumes exactly, and
    gradients are switched on even when the caller evaluates under no_grad / inference_mode."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        images, labels = make_shapes(SHAPES_CLF_TRAIN_N, seed=seed, size=32)
        x = images.float() / 127.5 - 1
        g = torch.Generator().manual_seed(seed)  # batch order
        torch.manual_seed(seed)  # weight init
        net = shapes_classifier_net(len(SHAPES_CLASSES))
        opt = torch.optim.Adam(net.parameters(), lr=SHAPES_CLF_LR)
        total = SHAPES_CLF_EPOCHS * math.ceil(len(x) / SHAPES_CLF_BATCH)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total)
        for _ in range(SHAPES_CLF_EPOCHS):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), SHAPES_CLF_BATCH):
                idx = perm[i:i + SHAPES_CLF_BATCH]
                loss = F.cross_entropy(net(x[idx]), labels[idx])
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
