"""DIAMOND agent half: actor-critic parity with the official code, config API, training-loop reliability.

Golden values: tests/golden/diamond_small.pt, `actor_critic` entries (official eloialonso/diamond, tiny
config, perturbed weights; see its `meta/actor_critic`)."""
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import diamond  # noqa: E402
from test_diamond_world_model import assert_f32_close, maxerr  # noqa: E402  (the same float32 tolerance rule)

GOLDEN = ROOT / "tests" / "golden" / "diamond_small.pt"
# float32 against a golden made on another CPU: a conv encoder and an LSTM over 6 steps, backward for the gradients,
# sums of <= a few hundred terms in a CPU-dependent order (measured <= 1.2e-6 of the size): 1e-5 of a quantity's size,
# at least 1e-5 (every quantity is built from order-1 terms: frames in [-1, 1], returns ~1)
RTOL = 1e-5
RTOL_ELEMENTWISE = 1e-6  # lambda-returns: a 6-step float32 recursion of multiply-adds, a few ulp


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def official_actor_critic(golden):
    cfg = golden["configs"]["actor_critic"]
    net = diamond.ActorCriticNetwork(cfg["num_actions"], cfg["channels"], cfg["lstm_dim"], cfg["img_size"],
                                     cfg["img_channels"])
    net.load_state_dict(golden["state_dicts"]["actor_critic"], strict=True)
    return net


def rollout(net, golden):
    """predict_act_value on obs_seq[:, t], t = 0..T-1, from the zero state, no resets (meta/actor_critic)."""
    obs = golden["inputs"]["obs_seq_u8"].float() / 255 * 2 - 1  # meta/frame_decode
    hx_cx, logits, values, hxs = None, [], [], []
    for t in range(obs.size(1)):
        lg, v, hx_cx = net(obs[:, t], hx_cx)
        logits.append(lg), values.append(v), hxs.append(hx_cx[0])
    return torch.stack(logits, 1), torch.stack(values, 1), torch.stack(hxs, 1), hx_cx


def test_actor_critic_keys_match_official_checkpoint(golden):
    ours = {"actor_critic." + k for k in official_actor_critic(golden).state_dict()}
    official = {k for k in golden["agent_state_dict_keys"] if k.startswith("actor_critic.")}
    assert ours == official and len(ours) == 26
    # default size: parameter count of the official module (3,227,585 + 513 A)
    net = diamond.ActorCriticNetwork(num_actions=4)
    assert sum(p.numel() for p in net.parameters()) == 3_227_585 + 513 * 4
    assert net.actor_linear.weight.abs().sum() == 0 and net.critic_linear.bias.abs().sum() == 0
    H = net.lstm_dim
    assert torch.all(net.lstm.bias_ih[H:2 * H] == 1) and torch.all(net.lstm.bias_hh == 0)


def test_actor_critic_forward_parity(golden):
    ac = golden["actor_critic"]
    logits, values, hxs, (hx, cx) = rollout(official_actor_critic(golden), golden)
    for got, name in ((logits, "logits_act"), (values, "val"), (hxs, "hx_per_step"), (hx, "hx_final"),
                      (cx, "cx_final")):
        assert_f32_close(got.detach(), ac[name])


def test_lambda_returns_parity(golden):
    ac, lc = golden["actor_critic"], golden["configs"]["actor_critic_loss"]
    args = (ac["end"], ac["trunc"], ac["val_bootstrap"], lc["gamma"], lc["lambda_"])
    assert_f32_close(diamond.compute_lambda_returns(ac["rew"], *args), ac["lambda_returns"], RTOL_ELEMENTWISE)
    # rewards are sign-clipped inside, as in the official function
    assert_f32_close(diamond.compute_lambda_returns(ac["rew_unclipped"], *args), ac["lambda_returns_from_unclipped"],
                     RTOL_ELEMENTWISE)
    # the worked examples of the facts sheet: truncation bootstraps, an end cuts the return
    z = torch.zeros(1, 4)
    vb = torch.tensor([[.5, .6, .7, .8]])
    tau = torch.tensor([[0., 0, 0, 1]])
    g = diamond.compute_lambda_returns(torch.tensor([[1., 0, 0, 2]]), z, tau, vb, 0.985, 0.95)
    # the facts sheet prints 5 decimals
    assert maxerr(g, torch.tensor([[2.54750, 1.62743, 1.70760, 1.78800]])) < 1e-4
    g = diamond.compute_lambda_returns(torch.tensor([[1., 0, 0, 2]]), torch.tensor([[0., 1, 0, 0]]), tau, vb, 0.985, 0.95)
    assert maxerr(g, torch.tensor([[1.02462, 0, 1.70760, 1.78800]])) < 1e-4


def test_actor_critic_loss_and_gradient_parity(golden):
    ac, lc = golden["actor_critic"], golden["configs"]["actor_critic_loss"]
    net = official_actor_critic(golden)
    logits, values, _, _ = rollout(net, golden)
    loss, m = diamond.actor_critic_loss(logits, values, ac["act"], ac["rew"], ac["end"], ac["trunc"],
                                        ac["val_bootstrap"], lc["gamma"], lc["lambda_"], lc["weight_value_loss"],
                                        lc["weight_entropy_loss"])
    assert_f32_close(loss.item(), ac["loss"])
    for k in ("loss_actions", "loss_values", "loss_entropy", "policy_entropy_bits"):
        assert_f32_close(m[k], ac[k])
    loss.backward()
    grad_norm = torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert_f32_close(grad_norm.item(), ac["grad_norm"])
    assert_f32_close(net.actor_linear.weight.grad, ac["grad_actor_linear_weight"])


# ---------------------------------------------------------------------------------------------------
# config API
# ---------------------------------------------------------------------------------------------------

def test_config_presets_and_errors():
    large = diamond.DiamondConfig()
    assert large == diamond.DiamondConfig(preset="large") == diamond.DiamondConfig("large")
    assert (large.game, large.obs_size, large.diffusion_channels, large.diffusion_cond_dim) == \
        ("Breakout-v5", 64, [64, 64, 64, 64], 256)
    assert (large.num_sampling_steps, large.imagination_horizon, large.discount_factor) == (3, 15, 0.985)
    assert (large.learning_rate, large.num_epochs, large.env_steps) == (1e-4, 1000, 100_000)
    cfg = diamond.DiamondConfig(preset="small")
    assert cfg.diffusion_channels != large.diffusion_channels
    cfg.game = "Pong-v5"
    cfg.obs_size = 64
    assert (cfg.game, cfg.preset) == ("Pong-v5", "small")
    preset_fields = {f.name for f in dataclasses.fields(diamond.DiamondConfig) if "large" in f.metadata}
    for name in diamond.PRESETS:  # every preset key is a field that presets may set
        assert set(diamond.PRESETS[name]) <= preset_fields, set(diamond.PRESETS[name]) - preset_fields
        c = diamond.DiamondConfig(preset=name)
        assert all(getattr(c, k) == v for k, v in diamond.PRESETS[name].items())
        assert all(getattr(c, k) is not None for k in preset_fields)  # nothing left unresolved
        assert diamond.DiamondConfig(**dataclasses.asdict(c)) == c  # the checkpoint round trip
    # an explicit value wins over the preset, also one equal to large's; dataclasses.replace (which re-runs
    # __post_init__, as common.config_from_args does) keeps every other value of the preset
    tiny = diamond.DiamondConfig(preset="tiny")
    assert tiny.obs_size == 32 and diamond.DiamondConfig(preset="tiny", obs_size=64).obs_size == 64
    moved = dataclasses.replace(tiny, obs_size=64)
    assert moved.obs_size == 64 and moved.batch_size == tiny.batch_size == 8 and moved.preset == "tiny"
    assert diamond.parse_config(["--preset", "tiny", "--obs-size", "64"]).obs_size == 64
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        diamond.DiamondConfig(preset="huge")
    with pytest.raises(AttributeError, match="no field 'obs_sise'.*obs_size"):
        cfg.obs_sise = 32
    with pytest.raises(AttributeError, match="no field 'gmae'.*game"):
        cfg.gmae = "Pong"
    with pytest.raises(AttributeError, match="set the preset at construction"):
        cfg.preset = "tiny"  # would change nothing: the values are resolved
    with pytest.raises(TypeError, match="bogus"):
        diamond.DiamondConfig(preset="tiny", bogus=1)
    tiny.diffusion_channels.append(99)  # lists are per instance, never the preset's
    assert diamond.DiamondConfig(preset="tiny").diffusion_channels == diamond.PRESETS["tiny"]["diffusion_channels"]
    assert large.diffusion_attn_depths is not diamond.DiamondConfig().diffusion_attn_depths


def test_config_cli_flags():
    cfg = diamond.parse_config(["--game", "Pong", "--preset", "small", "--num-sampling-steps", "5",
                                "--diffusion-channels", "16", "16", "16", "16"])
    assert (cfg.preset, cfg.game, cfg.num_sampling_steps, cfg.diffusion_channels) == \
        ("small", "Pong", 5, [16, 16, 16, 16])
    assert cfg.actor_critic_lstm_dim == diamond.PRESETS["small"]["actor_critic_lstm_dim"]  # preset defaults
    with pytest.raises(SystemExit):
        diamond.parse_config(["--preset", "huge"])


def test_config_values_are_checked_before_any_work(tmp_path, monkeypatch):
    for name in diamond.PRESETS:
        diamond.check_config(diamond.DiamondConfig(preset=name))
    bad = [(dict(batch_size=0), "--batch-size must be positive, got 0"),  # was a NaN loss after collecting
           (dict(imagination_horizon=0), "--imagination-horizon must be positive"),
           (dict(warmup_steps=-1), "--warmup-steps must be >= 0"),
           (dict(discount_factor=1.5), r"--discount-factor must be in \[0, 1\], got 1.5"),
           (dict(diffusion_depths=[1, 1]), "--diffusion-channels, --diffusion-depths, --diffusion-attn-depths need "
                                           "one value per U-Net level"),
           (dict(actor_critic_channels=[0, 8, 16, 16]), "--actor-critic-channels needs positive widths"),
           (dict(sample_weights=[0.0, 0.0]), "--sample-weights must be >= 0 with a positive sum")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            diamond.check_config(diamond.DiamondConfig(preset="tiny", **change))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--num-epochs must be positive, got 0"):
        diamond.train_command(["--preset", "tiny", "--num-epochs", "0"])
    with pytest.raises(ValueError, match="--eval-every must be positive, got 0"):
        diamond.Trainer(diamond.DiamondConfig(preset="tiny", eval_every=0), tmp_path / "run")
    assert not any(tmp_path.iterdir())  # no run folder, no data


# ---------------------------------------------------------------------------------------------------
# the env loop: bootstrap values, resets, burn-in
# ---------------------------------------------------------------------------------------------------

class CountingEnv:
    """B envs whose frame is a constant image equal to a per-env counter / 10; env i ends every
    period[i] steps (end for env 0, truncation for env 1) and restarts at -1 with a 2-frame burn-in."""

    def __init__(self, periods=(2, 3), burnin=True):
        self.periods, self.burnin = periods, burnin
        self.t = torch.zeros(len(periods), dtype=torch.long)

    def frame(self, v):
        return torch.full((len(v), 3, 16, 16), 1.0).mul(v.float().view(-1, 1, 1, 1) / 10)

    def reset(self):
        self.t.zero_()
        return self.frame(self.t), {}

    def step(self, act):
        self.t += 1
        p = torch.tensor(self.periods)
        dead = self.t % p == 0
        end = dead & (torch.arange(len(p)) == 0)
        trunc = dead & (torch.arange(len(p)) == 1)
        info = {}
        if dead.any():
            info["final_observation"] = self.frame(self.t[dead])
            if self.burnin:
                info["burnin_obs"] = torch.stack([self.frame(-torch.ones(int(dead.sum()))),
                                                  self.frame(-2 * torch.ones(int(dead.sum())))], dim=1)
        obs = self.frame(torch.where(dead, torch.full_like(self.t, -1), self.t))
        return obs, torch.ones(len(p)), end.long(), trunc.long(), info


def test_env_loop_bootstrap_and_burnin():
    torch.manual_seed(0)
    ac = diamond.ActorCriticNetwork(3, channels=[4, 4], lstm_dim=8, img_size=16)
    for p in ac.parameters():  # non-zero heads so values differ per state
        torch.nn.init.normal_(p, std=0.3)
    env = CountingEnv()
    loop = diamond.AgentEnvLoop(env, ac, generator=torch.Generator().manual_seed(0))
    r = loop.rollout(4)
    assert r["logits"].shape == (2, 4, 3) and r["val"].requires_grad and not r["val_bootstrap"].requires_grad
    assert r["end"][0].tolist() == [0, 1, 0, 1] and r["trunc"][1].tolist() == [0, 0, 1, 0]
    # replay by hand: env 0 ends at t=1; vb_1 = V(final frame 0.2 | state after step 1), then a reset (zero
    # state) and burn-in over the frames -0.1, -0.2 before the next frame -0.1
    f = lambda v: torch.full((1, 3, 16, 16), v / 10)
    with torch.no_grad():
        _, v0, s = ac(f(0), None)
        _, v1, s = ac(f(1), s)
        _, v_final, _ = ac(f(2), s)
        _, _, s2 = ac(f(-1), None)
        _, _, s2 = ac(f(-2), s2)
        _, v2, _ = ac(f(-1), s2)
    # a batch of 2 envs vs 1 by hand (another GEMM blocking): convs, an LSTM cell, a linear, ~1e-6 relative each
    def same(a, b):
        torch.testing.assert_close(a.detach().reshape(()), b.reshape(()), rtol=1e-5, atol=1e-6)
    same(r["val"][0, 0], v0)
    same(r["val"][0, 1], v1)
    same(r["val_bootstrap"][0, 0], v1)       # next step's value
    same(r["val_bootstrap"][0, 1], v_final)  # final frame's value at the end
    same(r["val"][0, 2], v2)                 # burned-in state after the reset
    # the state carries to the next rollout (detached), the last bootstrap does not advance it
    hx = loop.hx.clone()
    r2 = loop.rollout(1)
    assert r["end"][1, -1] == 0 and r["trunc"][1, -1] == 0  # env 1 alive at the last step:
    same(r["val_bootstrap"][1, -1], r2["val"][1, 0])
    assert not torch.equal(hx, loop.hx)


def test_actor_critic_learns_a_delayed_reward():
    """The RL half on its own: in an imagined env (same API as WorldModelEnv) that pays 1 one step after action 2
    was taken, 40 updates of the training loop's loss through AgentEnvLoop make action 2 the policy's choice."""
    class PaysForActionTwo:
        def __init__(self, n):
            self.obs, self.prev = torch.rand(n, 3, 32, 32) * 2 - 1, None

        def reset(self):
            return self.obs, {}

        def step(self, act):
            zeros = torch.zeros(len(act), dtype=torch.long)
            rew = torch.zeros(len(act)) if self.prev is None else (self.prev == 2).float()
            self.prev = act
            return self.obs, rew, zeros, zeros, {}

    torch.manual_seed(0)
    ac = diamond.ActorCriticNetwork(4, channels=(8, 8, 16, 16), lstm_dim=32, img_size=32)
    loop = diamond.AgentEnvLoop(PaysForActionTwo(8), ac, generator=torch.Generator().manual_seed(0))
    opt = diamond.make_optimizer(ac, 1e-3, 0.0)
    for _ in range(40):
        r = loop.rollout(15)
        loss, metrics = diamond.actor_critic_loss(r["logits"], r["val"], r["act"], r["rew"], r["end"], r["trunc"],
                                                  r["val_bootstrap"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    probs = torch.softmax(r["logits"][:, -1].detach(), -1).mean(0)
    assert probs[2] > 0.6 and metrics["policy_entropy_bits"] < 1.6, (probs, metrics)  # from 0.25 and 2 bits


def test_nonfinite_loss_stops_with_module_and_step():
    net = torch.nn.Linear(2, 1)
    opt = diamond.make_optimizer(net, 1e-3, 0.0)
    sched = diamond.make_warmup(opt, 0)
    before = net.weight.detach().clone()
    with pytest.raises(diamond.NonFiniteLossError, match="rew_end loss .* at rew_end step 7"):
        diamond.optimizer_step("rew_end", net(torch.tensor([[float("nan"), 1.0]])).sum(), net, opt, sched, 1.0, 7)
    assert torch.equal(before, net.weight)


# ---------------------------------------------------------------------------------------------------
# the training loop on real Breakout: end to end, resume after a kill, NaN guard
# ---------------------------------------------------------------------------------------------------

def micro_config(**overrides):
    """The tiny preset with test-only step counts (a few seconds on 2 cores)."""
    steps = dict(initial_collection_steps=120, initial_collection_max=120, env_steps_per_epoch=40, num_epochs=2,
                 denoiser_steps_first_epoch=3, rew_end_steps_first_epoch=3, actor_critic_steps_first_epoch=2,
                 denoiser_steps_per_epoch=2, rew_end_steps_per_epoch=2, actor_critic_steps_per_epoch=1,
                 batch_size=4, imagination_batch_size=2, imagination_horizon=6, eval_every=1, eval_episodes=2,
                 final_eval_episodes=2, eval_max_steps=40, device="cpu")
    return diamond.DiamondConfig(preset="tiny", **{**steps, **overrides})


def read_metrics(run_dir):
    import json
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def test_tiny_loop_end_to_end(tmp_path, monkeypatch, capsys):
    """collect -> world model -> reward model -> imagination RL -> evaluation, through the command line."""
    monkeypatch.chdir(tmp_path)
    cfg = micro_config()
    argv = ["--preset", "tiny"]
    for k in ("initial_collection_steps", "initial_collection_max", "env_steps_per_epoch", "num_epochs",
              "denoiser_steps_first_epoch", "rew_end_steps_first_epoch", "actor_critic_steps_first_epoch",
              "denoiser_steps_per_epoch", "rew_end_steps_per_epoch", "actor_critic_steps_per_epoch", "batch_size",
              "imagination_batch_size", "imagination_horizon", "eval_episodes", "final_eval_episodes",
              "eval_max_steps", "eval_every", "device"):
        argv += ["--" + k.replace("_", "-"), str(getattr(cfg, k))]
    result = diamond.main(argv)
    run_dir = next((tmp_path / "runs").iterdir())
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["env_steps"] == 120 and rows[1]["env_steps"] == 160
    for r in rows:
        for k in ("denoiser/loss", "rew_end_model/loss", "actor_critic/loss", "actor_critic/loss_values",
                  "eval/return_mean", "eval/return_max"):
            assert k in r and r[k] == r[k], k  # present and not NaN
        assert r["eval/hns"] == pytest.approx(diamond.human_normalized_score("Breakout", r["eval/return_mean"]))
    assert len(result["returns"]) == 2
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "final evaluation" in out and "HNS" in out and ", random policy " in out
    assert "updates/s" not in out  # progress lines are time-gated: a short run only prints its epochs
    state = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert state["kind"] == "diamond" and state["epoch"] == 2
    # the random policy's level, measured once on the evaluation episodes, is kept for the curves
    assert rows[0]["eval/random_return_mean"] == state["random_return"]
    assert "eval/random_return_mean" not in rows[1]
    with Image.open(run_dir / "curves.png") as png:
        assert png.size == (880, 600)  # 2 x 2 panels: return, and the three losses
    assert (run_dir / "dream.gif").is_file()
    assert state["steps"] == {"denoiser": 5, "rew_end_model": 5, "actor_critic": 3}
    assert {k.split(".")[0] for k in state["model"]} == {"denoiser", "rew_end_model", "actor_critic"}
    # the checkpoint is an agent checkpoint in the official layout: eval loads it like an official one
    r = diamond.main(["eval", "--ckpt", str(run_dir), "--episodes", "2", "--max-steps", "20",
                      "--device", "cpu", "--compare-random"])
    assert len(r["returns"]) == 2 and len(r["random"]["returns"]) == 2
    assert len(r["action_freq"]) == 4 and sum(r["action_freq"]) == pytest.approx(1)  # Breakout's 4 actions
    out = capsys.readouterr().out
    assert "actions: " in out and "(uniform 25%)" in out
    # --resume takes the run's saved config; flags given now may extend the schedule but not change the networks
    with pytest.raises(ValueError, match="--obs-size, --learning-rate cannot change"):
        diamond.main(["--resume", str(run_dir), "--obs-size", "16", "--learning-rate", "1e-3"])
    diamond.main(["--resume", str(run_dir), "--num-epochs", "3"])
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3]
    state = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert state["epoch"] == 3 and state["config"]["num_epochs"] == 3
    assert state["config"]["batch_size"] == cfg.batch_size  # not the tiny preset's: the run's own value


def test_resume_after_kill_keeps_data_and_is_deterministic(tmp_path, monkeypatch):
    cfg = micro_config(num_epochs=3, eval_every=10)
    run = tmp_path / "run"
    trainer = diamond.Trainer(cfg, run, log=lambda s: None)
    original = diamond.Trainer.train_model

    def killed_in_epoch_2(self, name, n):
        if self.epoch == 2 and name == "rew_end_model":
            raise KeyboardInterrupt  # as if killed after epoch 2's collection and denoiser updates
        return original(self, name, n)

    monkeypatch.setattr(diamond.Trainer, "train_model", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(diamond.Trainer, "train_model", original)
    collected = len(trainer.dataset)
    assert collected == 160  # 120 + epoch 2's 40, already on disk
    frames_before = np.concatenate([ep.obs[:ep.len] for ep in trainer.dataset.episodes])
    saved = torch.load(run / "ckpt.pt", weights_only=True)
    assert saved["epoch"] == 1
    # counters, not generator states: every random draw derives from (seed, phase, epoch, update)
    assert not {"rng", "generators", "data_rng", "wm_rng", "wm_generator"} & set(saved)
    shutil.copytree(run, tmp_path / "twin")

    resumed = diamond.Trainer(cfg, run, resume=True, log=lambda s: None)
    assert resumed.epoch == 1 and resumed.steps == saved["steps"]
    assert len(resumed.dataset) == collected  # nothing collected is lost
    for n in diamond.MODEL_NAMES:
        assert resumed.sched[n].last_epoch == saved["steps"][n]  # warm-up position
        assert resumed.opt[n].state_dict()["state"][0]["step"] == saved["steps"][n]
    for k, v in resumed.agent.state_dict().items():
        assert torch.equal(v, saved["model"][k])
    resumed.run()
    assert resumed.epoch == 3
    assert len(resumed.dataset) == collected + 2 * 40
    frames_after = np.concatenate([ep.obs[:ep.len] for ep in resumed.dataset.episodes])
    assert np.array_equal(frames_after[:collected], frames_before)
    final = torch.load(run / "ckpt.pt", weights_only=True)
    assert final["epoch"] == 3 and final["steps"]["denoiser"] == saved["steps"]["denoiser"] + 2 * 2
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]
    # a second resume of the same saved state is the same run, whatever the global RNGs did in between
    torch.manual_seed(123)
    np.random.seed(123)
    twin = diamond.Trainer(cfg, tmp_path / "twin", resume=True, log=lambda s: None)
    twin.run()
    assert np.array_equal(np.concatenate([ep.obs[:ep.len] for ep in twin.dataset.episodes]), frames_after)
    for k, v in twin.agent.state_dict().items():
        assert torch.equal(v, resumed.agent.state_dict()[k]), k


def test_random_streams_depend_on_the_position_only(tmp_path):
    t = diamond.Trainer(micro_config(), tmp_path, log=lambda s: None)
    t.collect_initial()
    t.epoch = 1
    loss = t.world_model_loss("denoiser")[0].item()
    torch.rand(3), np.random.rand(), t.world_model_loss("rew_end_model")  # other draws in between: no change
    assert t.world_model_loss("denoiser")[0].item() == loss
    t.steps["denoiser"] += 1
    assert t.world_model_loss("denoiser")[0].item() != loss


def test_run_killed_before_its_first_epoch_resumes_from_its_data(tmp_path, monkeypatch, capsys):
    """A kill during the initial collection leaves a checkpoint (epoch 0, with the config) beside the steps
    collected so far; --resume (with the run folder or its ckpt.pt) goes on from them."""
    run, original = tmp_path / "run", diamond.Trainer.collect

    def killed_mid_collection(self, n):
        original(self, 60)  # 60 steps reach the disk, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(diamond.Trainer, "collect", killed_mid_collection)
    with pytest.raises(KeyboardInterrupt):
        diamond.Trainer(micro_config(num_epochs=1), run, world_model_only=True, log=lambda s: None).run()
    monkeypatch.setattr(diamond.Trainer, "collect", original)
    assert torch.load(run / "ckpt.pt", weights_only=True)["epoch"] == 0
    before = diamond.ReplayDataset.load(run / "dataset")
    assert len(before) == 60
    diamond.main(["--resume", str(run / "ckpt.pt"), "--train-world-model-only"])
    state = torch.load(run / "ckpt.pt", weights_only=True)
    after = diamond.ReplayDataset.load(run / "dataset")
    assert state["epoch"] == 1 and state["steps"]["denoiser"] == 3 and len(after) == 120
    n = before.episodes[0].len
    assert np.array_equal(after.episodes[0].obs[:n], before.episodes[0].obs[:n])
    assert f"run folder: {run}" in capsys.readouterr().out


def test_progress_lines_for_every_phase(tmp_path):
    """With a tiny interval every phase reports done/total, rate and ETA (the default, 30 s, keeps short runs
    quiet: see test_tiny_loop_end_to_end)."""
    lines = []
    diamond.Trainer(micro_config(num_epochs=1), tmp_path, log=lines.append, progress_every=0).run()
    rate = r" \| [\d.]+ {unit}/s \| ETA \d\d:\d\d:\d\d"
    for head, unit in (("epoch 0/1 | collect 120/120 steps", "steps"),
                       ("epoch 1/1 | denoiser 3/3 updates", "updates"),
                       ("epoch 1/1 | rew_end_model 3/3 updates", "updates"),
                       ("epoch 1/1 | actor_critic 2/2 updates", "updates"),
                       ("epoch 1/1 | random policy 1/40 steps", "steps"),
                       ("epoch 1/1 | eval 1/40 steps", "steps")):
        assert any(re.fullmatch(re.escape(head) + rate.format(unit=unit), s) for s in lines), (head, lines)


def test_nonfinite_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = micro_config(num_epochs=2, eval_every=10)
    trainer = diamond.Trainer(cfg, tmp_path, log=lambda s: None)
    original = diamond.Trainer.world_model_loss

    def nan_in_epoch_2(self, name):
        loss, m = original(self, name)
        return (loss * float("nan"), m) if self.epoch == 2 and name == "rew_end_model" else (loss, m)

    monkeypatch.setattr(diamond.Trainer, "world_model_loss", nan_in_epoch_2)
    good = (tmp_path / "ckpt.pt")
    with pytest.raises(diamond.NonFiniteLossError, match=r"rew_end_model loss \(nan\) at rew_end_model step 4"):
        trainer.run()
    state = torch.load(good, weights_only=True)
    assert state["epoch"] == 1  # epoch 2 never saved over it
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_from_official_loads_every_part_strictly(golden, tmp_path):
    """An official agent checkpoint (flat keys denoiser.* / rew_end_model.* / actor_critic.*) at the golden
    file's tiny sizes loads into Agent part by part, strictly; a wrong action count fails clearly."""
    sds = golden["state_dicts"]
    flat = {f"{part}.{k}": v for part in diamond.MODEL_NAMES for k, v in sds[part].items()}
    assert set(flat) == set(golden["agent_state_dict_keys"])  # the full official agent key list
    torch.save(flat, tmp_path / "Breakout.pt")
    c = golden["configs"]
    cfg = diamond.DiamondConfig(preset="large", diffusion_channels=c["denoiser"]["inner_model"]["channels"],
                                diffusion_depths=c["denoiser"]["inner_model"]["depths"],
                                diffusion_cond_dim=c["denoiser"]["inner_model"]["cond_channels"],
                                rew_end_channels=c["rew_end_model"]["channels"], rew_end_depths=c["rew_end_model"]["depths"],
                                rew_end_cond_dim=c["rew_end_model"]["cond_channels"],
                                rew_end_lstm_dim=c["rew_end_model"]["lstm_dim"],
                                actor_critic_channels=c["actor_critic"]["channels"],
                                actor_critic_lstm_dim=c["actor_critic"]["lstm_dim"])
    agent = diamond.Agent(cfg, 4)
    sd = diamond.read_agent(tmp_path / "Breakout.pt")
    diamond.load_agent(agent, sd, tmp_path / "Breakout.pt")
    for k, v in agent.state_dict().items():
        assert torch.equal(v, flat[k]), k
    with pytest.raises(ValueError, match="do not fit") as err:
        diamond.load_agent(diamond.Agent(cfg, 6), sd, tmp_path / "Breakout.pt")
    assert "\n" not in str(err.value) and len(str(err.value)) < 600  # one line, not torch's list of every key
    with pytest.raises(ValueError, match="this agent has 4 actions and Pong has 6: use a checkpoint of Pong"):
        diamond.check_actions(sd, "Pong", 6)  # what eval checks first, naming the game
    (tmp_path / "Pong.pt").write_bytes(b"not a checkpoint")
    for name, message in [("Pong.pt", "cannot load .*an official agent"), ("missing.pt", "no checkpoint file")]:
        with pytest.raises(diamond.common.CheckpointError, match=message):
            diamond.read_agent(tmp_path / name)


def test_large_preset_is_the_official_agent():
    """large = the paper's networks: parameter counts of the official Agent (A = 4: 13,536,456 in all)."""
    agent = diamond.Agent(diamond.DiamondConfig(preset="large"), 4)
    count = {n: sum(p.numel() for p in getattr(agent, n).parameters()) for n in diamond.MODEL_NAMES}
    assert count == {"denoiser": 4_405_955, "rew_end_model": 5_900_864, "actor_critic": 3_229_637}


# ---------------------------------------------------------------------------------------------------
# the command line as a newcomer meets it: paths, outputs, errors before any work
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def breakout_run(tmp_path_factory):
    """A finished one-epoch Breakout run folder (ckpt.pt, dataset/, metrics.jsonl, curves.png)."""
    run = tmp_path_factory.mktemp("home") / "run"
    diamond.Trainer(micro_config(num_epochs=1, eval_episodes=1), run, log=lambda s: None).run()
    return run


def run_script(*argv, cwd):
    out = subprocess.run([sys.executable, str(ROOT / "diamond.py"), *map(str, argv)], cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    return out.returncode, out.stderr.strip()


@pytest.mark.parametrize("argv, message", [
    (["evl"], "error: unknown command 'evl'; did you mean 'eval'?"),
    (["--game", "Breakot"], "error: --game 'Breakot' is not an Atari game of ale-py nor a registered gymnasium id; closest: Breakout"),
    (["eval", "--ckpt", "RUN", "--game", "Pong"],
     "error: this run was trained on Breakout-v5 (4 actions) and Pong has 6: drop --game, or use a "
     "checkpoint trained on Pong"),
    (["dream", "--ckpt", "RUN", "--out", "dream.png"],
     "error: --out dream.png: give a file name ending in .gif"),
])
def test_user_errors_are_one_line_before_any_work(breakout_run, tmp_path, argv, message):
    before = sorted(p.name for p in breakout_run.iterdir())
    code, err = run_script(*[breakout_run if a == "RUN" else a for a in argv], cwd=tmp_path)
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(message), err
    assert not any(tmp_path.iterdir()) and sorted(p.name for p in breakout_run.iterdir()) == before


def test_misspelt_game_fails_the_config_check():
    cfg = diamond.DiamondConfig(preset="tiny")
    cfg.game = "Breakot"
    message = "--game 'Breakot' is not an Atari game of ale-py nor a registered gymnasium id; closest: Breakout"
    with pytest.raises(ValueError, match=message):
        diamond.check_config(cfg)


def test_paths_take_the_run_folder_or_its_checkpoint_and_outputs_land_in_it(breakout_run, tmp_path,
                                                                            monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(breakout_run, run)
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is expanded in every path flag
    monkeypatch.chdir(tmp_path / "run" / "dataset")  # nothing is written to the working folder
    for ckpt in ("~/run", "~/run/ckpt.pt"):
        diamond.main(["dream", "--ckpt", ckpt, "--steps", "3"])
        line = capsys.readouterr().out.splitlines()[0]
        with Image.open(run / "dream.gif") as gif:
            frames = gif.n_frames
            assert gif.size == (8 * 32 * 2 + 2 * 8, diamond.LABEL_HEIGHT + 8 * 32)  # 32 px frames upscaled x8
        assert re.fullmatch(rf"wrote {run}/dream.gif( \(replaced the existing file\))?: 3 imagined frames "
                            rf"after 4 real ones, 7 steps in {frames} GIF frames.*", line), line
    assert "(replaced the existing file)" in line  # the second dream wrote over the first
    diamond.main(["dream", "--ckpt", "~/run", "--steps", "2", "--out", "~/d.gif"])
    assert (tmp_path / "d.gif").is_file()
    diamond.main(["eval", "--ckpt", "~/run/ckpt.pt", "--episodes", "1", "--max-steps", "30",
                  "--gif", "~/play.gif"])
    line = capsys.readouterr().out.splitlines()[-1]
    with Image.open(tmp_path / "play.gif") as gif:
        assert gif.size == (256, 256)
        frames = gif.n_frames
    assert re.fullmatch(rf"wrote {tmp_path}/play.gif: episode 1, \d+ steps in {frames} GIF frames.*", line)
    with pytest.raises(ValueError, match="--gif .*play.mp4: give a file name ending in .gif"):
        diamond.main(["eval", "--ckpt", "~/run", "--gif", "~/play.mp4"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gif", "play.gif", "run"]
    # --resume with the checkpoint file continues the run in its folder
    diamond.main(["--resume", "~/run/ckpt.pt", "--num-epochs", "2", "--train-world-model-only"])
    assert torch.load(run / "ckpt.pt", weights_only=True)["epoch"] == 2


def test_eval_and_dream_help_show_every_default(capsys):
    for command in ("eval", "dream"):
        with pytest.raises(SystemExit):
            diamond.main([command, "--help"])
        body = " ".join(capsys.readouterr().out.split()).split("options:")[1]
        helps = dict(re.findall(r" (--[a-z-]+)(?: [A-Z_]+)? (.*?)(?= --[a-z-]+ |$)", body))
        assert len(helps) >= 6 and all("default" in h for o, h in helps.items() if o != "--help"), helps
    assert helps["--steps"] == "imagined steps after the real context frames (default: 100)"
    assert helps["--out"] == "the GIF to write; default None = RUN/dream.gif"


def test_save_curves_draws_series_and_reference_lines(tmp_path):
    """common.save_curves (pillow only): a rising series from the lower left to the upper right of its panel,
    a dashed reference level across it at the right height, a panel without data left empty."""
    panels = [dict(title="return", xlabel="steps", series={"agent": [(100, 10.0), (0, 0.0), (50, 4.0)]},
                   hlines={"random policy": 5.0}),
              dict(title="loss", xlabel="updates", series={"loss": []})]
    path = diamond.common.save_curves(tmp_path / "c.png", panels, (400, 300))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (300, 800, 3)
    blue, red = (np.all(img == c, axis=2) for c in diamond.common.CURVE_COLOURS[:2])
    plot = (slice(41, 264), slice(53, 386))  # inside panel 0's frame (margins 52 / 14 / 40 / 36)
    ys, xs = np.nonzero(blue[plot])
    assert len(xs) > 300 and ys[xs < 20].mean() > ys[xs > 310].mean() + 180  # low at x=0, high at x=100
    # y = 4 at x = 50 on the path: the range is [0, 10] padded by 5%, so it lies 4.5/11 up from the bottom
    mid = ys[np.abs(xs - (386 - 53) / 2) < 2].mean()
    assert abs(mid - (263 - 41) * (1 - 4.5 / 11)) < 4
    rows = np.nonzero(red[plot].sum(axis=1) > 100)[0]  # the dashed level y = 5: half-way up, across the panel
    assert len(rows) in (1, 2, 3) and abs(rows.mean() - (263 - 41) * (1 - 5.5 / 11)) < 3
    assert not blue[:, 400:].any() and not red[:, 400:].any()  # the empty panel: no curve, no legend colour
