"""Two CPU processes (gloo, as torchrun would start them) train the same as one process on the full batch:
common.setup_ddp + wrap_ddp + get_batch(rank, world_size) shard the global batch and average gradients."""
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

PER_RANK, WORLD, STEPS = 6, 2, 3


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(),
                         nn.Linear(8 * 16 * 16, 10))


def train(model, data, batch, rank=0, world_size=1, dist=None):
    """STEPS Adam steps; returns the gradients of the first step, the (rank-averaged) losses, the weights."""
    net = C.wrap_ddp(model, dist) if dist is not None else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grads, losses = None, []
    for step in range(STEPS):
        x, y = C.get_batch(data, step, batch, seed=7, rank=rank, world_size=world_size)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP: gradients are all-reduced (averaged over ranks) here
        if grads is None:
            grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        losses.append(C.all_reduce_mean(loss.item(), dist) if dist is not None else loss.item())
    return grads, losses, [p.detach().clone() for p in model.parameters()]


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist = C.setup_ddp("cpu")
    assert (dist.rank, dist.world_size, dist.is_main, dist.device.type) == (rank, WORLD, rank == 0, "cpu")
    assert torch.distributed.get_backend() == "gloo"
    images, labels = C.make_shapes(40, seed=1)
    result = train(make_model(), C.Dataset(images, labels, 10), PER_RANK, rank, WORLD, dist)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    C.cleanup_ddp()
    assert not torch.distributed.is_initialized()
    # DDP imports torch._dynamo, whose interpreter teardown takes seconds; the results are on disk, so
    # leave at once (mp.spawn still sees exit code 0; an exception above never reaches this line)
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    images, labels = C.make_shapes(40, seed=1)
    grads, losses, weights = train(make_model(), C.Dataset(images, labels, 10), PER_RANK * WORLD)
    for rank in range(WORLD):
        r_grads, r_losses, r_weights = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # two float32 orders of the same sums (2 x 6 examples averaged vs 12, the first conv's weight gradient over
        # 12 x 256 positions) through GroupNorm: ~1e-6 of each gradient's size (measured 1.4e-6): 1e-5 of it
        for a, b in zip(r_grads, grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        torch.testing.assert_close(torch.tensor(r_losses), torch.tensor(losses), rtol=1e-5, atol=0)
        # 3 Adam steps of lr = 1e-2 in directions m / sqrt(v) carrying the gradients' ~1e-6: ~1e-7 apart (measured 6e-8)
        for a, b in zip(r_weights, weights):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the comparison is not vacuous: one rank's own half-batch gradient differs from the full-batch one
    model = make_model()
    x, y = C.get_batch(C.Dataset(images, labels, 10), 0, PER_RANK, seed=7, rank=0, world_size=WORLD)
    nn.functional.cross_entropy(model(x), y).backward()
    assert not torch.allclose(next(model.parameters()).grad, grads[0], rtol=1e-3, atol=1e-5)
