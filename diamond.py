"""diamond.py — DIAMOND: diffusion world models for Atari (Alonso et al. 2024, arXiv:2405.12399).

(docstring to be completed: idea, usage lines)
"""
from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# =====================================================================================================
# config  (owner: agent half; the world-model half adds its fields here too)
# =====================================================================================================

# Presets scale networks and step counts; each lists only what differs from `large`, the paper's
# configuration (the dataclass defaults below = official config/{trainer,agent/default}.yaml).
PRESETS: dict[str, dict] = {
    "large": {},
    # one consumer GPU (~8 GB), a few hours: half-width world model, fewer updates per epoch
    "medium": dict(diffusion_channels=[48, 48, 48, 48], diffusion_cond_dim=192, rew_end_lstm_dim=256,
                   actor_critic_lstm_dim=256, denoiser_steps_first_epoch=4000, rew_end_steps_first_epoch=4000,
                   actor_critic_steps_first_epoch=2000, denoiser_steps_per_epoch=200,
                   rew_end_steps_per_epoch=200, actor_critic_steps_per_epoch=200),
    # a small GPU or a long CPU run: 50k real steps, one res-block per level, 32 channels
    "small": dict(diffusion_channels=[32, 32, 32, 32], diffusion_depths=[1, 1, 1, 1], diffusion_cond_dim=128,
                  rew_end_channels=[16, 16, 16, 16], rew_end_depths=[1, 1, 1, 1], rew_end_cond_dim=64,
                  rew_end_lstm_dim=128, actor_critic_channels=[16, 16, 32, 32], actor_critic_lstm_dim=128,
                  env_steps=50_000, initial_collection_steps=2000, initial_collection_max=4000,
                  env_steps_per_epoch=200, num_epochs=300, denoiser_steps_first_epoch=1000,
                  rew_end_steps_first_epoch=1000, actor_critic_steps_first_epoch=300,
                  denoiser_steps_per_epoch=100, rew_end_steps_per_epoch=100, actor_critic_steps_per_epoch=50,
                  imagination_batch_size=16, eval_every=5, eval_max_steps=5000),
    # the whole loop on 2 CPU cores in a few minutes (make demo): 32x32 frames, 8-channel nets
    "tiny": dict(obs_size=32, diffusion_channels=[8, 8, 8, 8], diffusion_depths=[1, 1, 1, 1],
                 diffusion_cond_dim=16, rew_end_channels=[8, 8, 8, 8], rew_end_depths=[1, 1, 1, 1],
                 rew_end_cond_dim=16, rew_end_lstm_dim=32, actor_critic_channels=[8, 8, 16, 16],
                 actor_critic_lstm_dim=32, env_steps=3000, initial_collection_steps=1000,
                 initial_collection_max=2000, env_steps_per_epoch=500, num_epochs=4,
                 denoiser_steps_first_epoch=150, rew_end_steps_first_epoch=150,
                 actor_critic_steps_first_epoch=40, denoiser_steps_per_epoch=60, rew_end_steps_per_epoch=60,
                 actor_critic_steps_per_epoch=20, batch_size=16, imagination_batch_size=16,
                 imagination_horizon=15, eval_every=2, eval_episodes=4, final_eval_episodes=4,
                 eval_max_steps=1000),
}


def _f(default, help: str):
    """A dataclass field with a help text (used by common.add_config_args); lists are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(init=False)
class DiamondConfig:
    """Every knob of the method. `DiamondConfig(preset="small")` starts from a preset, keyword arguments
    override it, attributes may be assigned afterwards; unknown presets and fields raise at once."""
    preset: str = _f("large", "tiny | small | medium | large (the paper's configuration)")
    # --- game and run ---
    game: str = _f("Breakout-v5", "Atari game, with or without the ALE/ prefix")
    obs_size: int = _f(64, "frames are resized to obs_size x obs_size RGB")
    seed: int = _f(0, "seed of torch/numpy/python RNGs and of the environments")
    device: str = _f("auto", "auto | cpu | cuda | mps")
    # --- denoiser (EDM U-Net) ---
    num_steps_conditioning: int = _f(4, "past frames and actions the denoiser conditions on")
    diffusion_channels: list = _f([64, 64, 64, 64], "U-Net channels per level")
    diffusion_depths: list = _f([2, 2, 2, 2], "U-Net res-blocks per level")
    diffusion_attn_depths: list = _f([0, 0, 0, 0], "1 = self-attention in that level's res-blocks")
    diffusion_cond_dim: int = _f(256, "width of the noise-level + action conditioning vector")
    num_sampling_steps: int = _f(3, "Euler steps per imagined frame")
    # --- reward / termination model ---
    rew_end_channels: list = _f([32, 32, 32, 32], "encoder channels per level")
    rew_end_depths: list = _f([2, 2, 2, 2], "encoder res-blocks per level")
    rew_end_cond_dim: int = _f(128, "action embedding width (AdaGN conditioning)")
    rew_end_lstm_dim: int = _f(512, "LSTM hidden size")
    # --- actor-critic ---
    actor_critic_channels: list = _f([32, 32, 64, 64], "encoder channels per level (max-pool after each)")
    actor_critic_lstm_dim: int = _f(512, "LSTM hidden size")
    imagination_horizon: int = _f(15, "imagined steps per actor-critic update (official backup_every)")
    imagination_batch_size: int = _f(32, "parallel imagined environments")
    discount_factor: float = _f(0.985, "gamma of the lambda-returns")
    lambda_returns: float = _f(0.95, "lambda of the lambda-returns")
    entropy_weight: float = _f(0.001, "weight of the entropy bonus")
    value_weight: float = _f(1.0, "weight of the value MSE")
    # --- optimisation (AdamW for each of the three models) ---
    learning_rate: float = _f(1e-4, "AdamW learning rate of all three models")
    weight_decay: float = _f(1e-2, "AdamW weight decay of the denoiser and reward/end model")
    actor_critic_weight_decay: float = _f(0.0, "AdamW weight decay of the actor-critic")
    warmup_steps: int = _f(100, "linear learning-rate warm-up from 0, per model")
    max_grad_norm_denoiser: float = _f(1.0, "gradient-norm clip of the denoiser")
    max_grad_norm_rew_end: float = _f(100.0, "gradient-norm clip of the reward/end model")
    max_grad_norm_actor_critic: float = _f(100.0, "gradient-norm clip of the actor-critic")
    batch_size: int = _f(32, "segments per denoiser and reward/end batch")
    sample_weights: list = _f([0.1, 0.1, 0.1, 0.7], "segment sampling weight of each chronological quarter")
    # --- schedule (per epoch: collect, train denoiser, reward/end model, actor-critic; evaluate) ---
    num_epochs: int = _f(1000, "training epochs")
    env_steps: int = _f(100_000, "budget of real environment steps (Atari 100k)")
    initial_collection_steps: int = _f(5000, "random-policy steps before the first epoch's training")
    initial_collection_max: int = _f(10000, "initial collection continues until both rare reward classes are seen")
    env_steps_per_epoch: int = _f(100, "real steps collected per epoch after the first")
    collect_epsilon: float = _f(0.01, "epsilon-greedy exploration while collecting")
    denoiser_steps_first_epoch: int = _f(10000, "denoiser updates in epoch 1")
    rew_end_steps_first_epoch: int = _f(10000, "reward/end updates in epoch 1")
    actor_critic_steps_first_epoch: int = _f(5000, "actor-critic updates in epoch 1")
    denoiser_steps_per_epoch: int = _f(400, "denoiser updates in later epochs")
    rew_end_steps_per_epoch: int = _f(400, "reward/end updates in later epochs")
    actor_critic_steps_per_epoch: int = _f(400, "actor-critic updates in later epochs")
    eval_every: int = _f(10, "evaluate on the real game every N epochs (and after the last)")
    eval_episodes: int = _f(4, "test episodes per evaluation")
    final_eval_episodes: int = _f(100, "test episodes after the last epoch")
    eval_max_steps: int = _f(27000, "cap on a test episode's steps (108k frames, the ALE default)")

    def __init__(self, preset: str = "large", **overrides):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        for f in fields(self):  # dataclass defaults, then the preset, then the caller's values
            value = f.default_factory() if f.default is MISSING else f.default
            object.__setattr__(self, f.name, value)
        object.__setattr__(self, "preset", preset)
        for name, value in {**PRESETS[preset], **overrides}.items():
            setattr(self, name, value)

    def __setattr__(self, name, value):
        if name not in self.__dataclass_fields__:
            close = difflib.get_close_matches(name, list(self.__dataclass_fields__), n=3)
            raise AttributeError(f"DiamondConfig has no field {name!r}" + (f"; did you mean {close}?" if close else
                                 "; see `python diamond.py --help` for the list"))
        if name == "preset" and value != getattr(self, "preset", value):
            raise AttributeError("set the preset at construction: DiamondConfig(preset=...)")
        object.__setattr__(self, name, value)


# =====================================================================================================
# environment: Atari preprocessing and vectorised collection  (owner: world-model half)
# =====================================================================================================

# =====================================================================================================
# replay dataset  (owner: world-model half)
# =====================================================================================================

# =====================================================================================================
# world model: denoiser U-Net, EDM denoiser, samplers, reward/end model  (owner: world-model half)
# =====================================================================================================

# =====================================================================================================
# imagination: WorldModelEnv  (owner: world-model half)
# =====================================================================================================

# =====================================================================================================
# agent: actor-critic, lambda-returns, loss  (owner: agent half)
# =====================================================================================================

GN_GROUP_SIZE = 32  # official blocks.py: GroupNorm with max(1, C // 32) groups, eps 1e-5


class _NormWrap(nn.Module):
    """GroupNorm under the attribute `.norm` (official blocks.GroupNorm), for the official key names."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(max(1, channels // GN_GROUP_SIZE), channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class SmallResBlock(nn.Module):
    """x + f(x) with f = GroupNorm -> SiLU -> Conv3x3 (official blocks.SmallResBlock; a 1x1 projection on
    the skip path when the width changes). f.0 is a container whose `.norm` holds the GroupNorm, which
    gives the official key `f.0.norm.weight`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.f = nn.Sequential(_NormWrap(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.skip_projection = (nn.Identity() if in_channels == out_channels
                                else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_projection(x) + self.f(x)


class ActorCriticNetwork(nn.Module):
    """The DIAMOND policy and value: one frame -> conv encoder -> LSTMCell -> (action logits, value).
    Memory lives only in the LSTM state. Parameter names = the official `actor_critic` module, so
    `load_state_dict(official_sd, strict=True)` works on an official agent checkpoint's sub-dict.

    Encoder (official ActorCriticEncoder): Conv3x3(3 -> c0), then per level a SmallResBlock and a
    2x2 max-pool; with 4 levels a 64x64 frame becomes (c3, 4, 4), flattened channel-major."""

    def __init__(self, num_actions: int, channels=(32, 32, 64, 64), lstm_dim: int = 512,
                 img_size: int = 64, img_channels: int = 3):
        super().__init__()
        assert img_size % 2 ** len(channels) == 0, f"img_size {img_size} not divisible by 2^{len(channels)}"
        layers = [nn.Conv2d(img_channels, channels[0], 3, padding=1)]
        for i, c in enumerate(channels):  # keys encoder.encoder.{1,3,5,7}; the pools (2,4,6,8) have none
            layers += [SmallResBlock(channels[max(0, i - 1)], c), nn.MaxPool2d(2)]
        self.encoder = nn.Module()
        self.encoder.encoder = nn.Sequential(*layers)
        feat_dim = channels[-1] * (img_size // 2 ** len(channels)) ** 2
        self.lstm_dim = lstm_dim
        self.lstm = nn.LSTMCell(feat_dim, lstm_dim)
        self.critic_linear = nn.Linear(lstm_dim, 1)
        self.actor_linear = nn.Linear(lstm_dim, num_actions)
        self.initialize_weights()

    def initialize_weights(self):
        # heads at zero: uniform initial policy and zero value (official)
        for head in (self.actor_linear, self.critic_linear):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        init_lstm_weights(self.lstm)

    def forward(self, obs: torch.Tensor, hx_cx=None):
        """obs (B, 3, H, W) in [-1, 1]; hx_cx None (zero state) or (hx, cx), each (B, lstm_dim).
        Returns logits (B, A), value (B,), (hx, cx): official `predict_act_value`."""
        assert obs.ndim == 4, f"expected one frame per env (B, C, H, W), got {tuple(obs.shape)}"
        x = self.encoder.encoder(obs).flatten(start_dim=1)  # (B, feat_dim)
        hx, cx = self.lstm(x, hx_cx)
        return self.actor_linear(hx), self.critic_linear(hx).squeeze(1), (hx, cx)


def init_lstm_weights(lstm: nn.Module):
    """Official init_lstm: W_ih xavier-uniform, W_hh orthogonal, biases 0 but the forget-gate part of
    b_ih (rows [H, 2H)) at 1 so the cell remembers at the start of training. nn.LSTM keys end in _l0."""
    sfx = "_l0" if isinstance(lstm, nn.LSTM) else ""
    nn.init.xavier_uniform_(getattr(lstm, "weight_ih" + sfx))
    nn.init.orthogonal_(getattr(lstm, "weight_hh" + sfx))
    b_ih, b_hh = getattr(lstm, "bias_ih" + sfx), getattr(lstm, "bias_hh" + sfx)
    nn.init.zeros_(b_ih)
    nn.init.zeros_(b_hh)
    H = lstm.hidden_size
    with torch.no_grad():
        b_ih[H:2 * H] = 1.0


def compute_lambda_returns(rew, end, trunc, val_bootstrap, gamma: float, lambda_: float) -> torch.Tensor:
    """TD(lambda) returns of an imagined rollout, all (B, T); rew is sign-clipped here.
    G_t = r_t + gamma (1-d_t) [(1-tau_t)(1-lambda) + tau_t] vb_t + (1-e_t) gamma lambda G_{t+1}, with e = d or tau
    and vb_t = V(o_{t+1}) (for a finished env, the value of its final frame). An end (d) cuts the value; a
    truncation (tau) bootstraps fully on vb_t. The sum starts from G_T := vb_{T-1}."""
    rew = rew.sign()
    end, trunc = end.float(), trunc.float()
    not_end_or_trunc = 1 - (end + trunc).clamp(max=1)
    returns = rew + gamma * (1 - end) * ((1 - trunc) * (1 - lambda_) + trunc) * val_bootstrap
    nxt = val_bootstrap[:, -1]
    out = []
    for t in reversed(range(rew.size(1))):
        g = returns[:, t] + not_end_or_trunc[:, t] * gamma * lambda_ * nxt
        out.append(g)
        nxt = g
    return torch.stack(out[::-1], dim=1)


def actor_critic_loss(logits, values, act, rew, end, trunc, val_bootstrap, gamma: float = 0.985,
                      lambda_: float = 0.95, value_weight: float = 1.0, entropy_weight: float = 0.001):
    """REINFORCE with the value as baseline, value regression to the lambda-returns, entropy bonus.
    logits (B, T, A) and values (B, T) carry the graph; the rest (B, T) does not. -> (loss, metrics)."""
    dist = torch.distributions.Categorical(logits=logits)
    entropy = dist.entropy().mean()
    with torch.no_grad():
        returns = compute_lambda_returns(rew, end, trunc, val_bootstrap, gamma, lambda_)
    loss_actions = (-dist.log_prob(act) * (returns - values).detach()).mean()
    loss_values = value_weight * F.mse_loss(values, returns)
    loss_entropy = -entropy_weight * entropy
    loss = loss_actions + loss_values + loss_entropy
    metrics = dict(loss_actions=loss_actions.item(), loss_values=loss_values.item(),
                   loss_entropy=loss_entropy.item(), policy_entropy_bits=entropy.item() / math.log(2),
                   lambda_return_mean=returns.mean().item())
    return loss, metrics


class AgentEnvLoop:
    """The actor-critic acting in a batched environment (official coroutines/env_loop.py), for imagined
    training, real collection and real evaluation. The LSTM state persists between `rollout` calls and is
    detached at the start of each, so gradients flow back through one rollout (truncated BPTT).

    env API (WorldModelEnv and the real TorchEnv alike): reset() -> (obs (B,3,H,W) float in [-1,1], info);
    step(act (B,)) -> (next_obs, rew (B,), end (B,), trunc (B,), info); for finished envs info has
    "final_observation" (n_dead,3,H,W) and the returned obs is already the next episode's first frame;
    an imagined env also gives "burnin_obs" (n_dead, K, 3, H, W): the new real context, fed to the LSTM."""

    def __init__(self, env, actor_critic: ActorCriticNetwork, epsilon: float = 0.0, generator=None):
        self.env, self.ac, self.epsilon = env, actor_critic, epsilon
        self.generator = generator  # torch.Generator (CPU) for action sampling and epsilon draws
        self.obs = self.hx = self.cx = None

    def rollout(self, num_steps: int, grad: bool = True) -> dict:
        """Step every env num_steps times; returns (B, T) tensors act, rew, end, trunc, val_bootstrap
        (no grad) and logits (B, T, A) and val (B, T) (with grad when `grad`), plus obs (B, T, 3, H, W)."""
        if self.obs is None:
            self.obs, _ = self.env.reset()
            n = self.obs.size(0)
            self.hx = torch.zeros(n, self.ac.lstm_dim, device=self.obs.device)
            self.cx = torch.zeros_like(self.hx)
        hx, cx, obs = self.hx.detach(), self.cx.detach(), self.obs
        keys = ("obs", "act", "rew", "end", "trunc", "logits", "val", "val_final")
        out = {k: [] for k in keys}
        with torch.set_grad_enabled(grad):
            for _ in range(num_steps):
                logits, val, (hx, cx) = self.ac(obs, (hx, cx))
                act = self.sample_actions(logits)
                next_obs, rew, end, trunc, info = self.env.step(act)
                dead = torch.logical_or(end.bool(), trunc.bool())
                val_final = torch.zeros_like(val.detach())
                if dead.any():
                    with torch.no_grad():  # value of the frame the episode ended on, from the post-step state
                        val_final[dead] = self.ac(info["final_observation"], (hx[dead], cx[dead]))[1]
                    keep = (~dead).float().unsqueeze(1)
                    hx, cx = hx * keep, cx * keep
                    if "burnin_obs" in info:  # imagination: read the new real context into the LSTM
                        with torch.no_grad():
                            h, c = hx[dead], cx[dead]
                            for i in range(info["burnin_obs"].size(1)):
                                _, _, (h, c) = self.ac(info["burnin_obs"][:, i], (h, c))
                        hx, cx = hx.clone(), cx.clone()
                        hx[dead], cx[dead] = h, c
                for k, v in zip(keys, (obs, act, rew, end, trunc, logits, val, val_final)):
                    out[k].append(v)
                obs = next_obs
            with torch.no_grad():  # bootstrap value of the last next-obs, without advancing the state
                val_last = self.ac(obs, (hx, cx))[1]
        self.obs, self.hx, self.cx = obs, hx, cx
        r = {k: torch.stack(v, dim=1) for k, v in out.items()}
        r["end"], r["trunc"] = r["end"].long(), r["trunc"].long()
        # vb_t = V(o_{t+1}): the next step's value, or the final frame's for an env that died at t
        next_val = torch.cat([r["val"][:, 1:].detach(), val_last.unsqueeze(1)], dim=1)
        dead = (r["end"] + r["trunc"]).clamp(max=1).bool()
        r["val_bootstrap"] = torch.where(dead, r.pop("val_final"), next_val)
        return r

    def sample_actions(self, logits: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits.detach().float(), dim=-1).cpu()
        act = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        if self.epsilon > 0 and torch.rand((), generator=self.generator).item() < self.epsilon:
            act = torch.randint(logits.size(-1), act.shape, generator=self.generator)  # one draw for all envs
        return act.to(logits.device)


def actor_critic_update(loop: AgentEnvLoop, cfg: DiamondConfig) -> tuple[torch.Tensor, dict]:
    """One actor-critic loss: imagine `imagination_horizon` steps in every env, then the loss on them."""
    r = loop.rollout(cfg.imagination_horizon)
    return actor_critic_loss(r["logits"], r["val"], r["act"], r["rew"], r["end"], r["trunc"], r["val_bootstrap"],
                             cfg.discount_factor, cfg.lambda_returns, cfg.value_weight, cfg.entropy_weight)

# =====================================================================================================
# training loop, evaluation, dreams  (owner: agent half; `dream` by the world-model half)
# =====================================================================================================

# (random, human) scores of the 26 Atari-100k games: the standard table (DQN / Atari-100k papers), with
# which the paper's mean HNS 1.46 is reproduced. HNS = (score - random) / (human - random).
ATARI_100K_SCORES = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0), "Asterix": (210.0, 8503.3),
    "BankHeist": (14.2, 753.1), "BattleZone": (2360.0, 37187.5), "Boxing": (0.1, 12.1), "Breakout": (1.7, 30.5),
    "ChopperCommand": (811.0, 7387.8), "CrazyClimber": (10780.5, 35829.4), "DemonAttack": (152.1, 1971.0),
    "Freeway": (0.0, 29.6), "Frostbite": (65.2, 4334.7), "Gopher": (257.6, 2412.5), "Hero": (1027.0, 30826.4),
    "Jamesbond": (29.0, 302.8), "Kangaroo": (52.0, 3035.0), "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3), "MsPacman": (307.3, 6951.6), "Pong": (-20.7, 14.6),
    "PrivateEye": (24.9, 69571.3), "Qbert": (163.9, 13455.0), "RoadRunner": (11.5, 7845.0),
    "Seaquest": (68.4, 42054.7), "UpNDown": (533.4, 11693.2),
}


def human_normalized_score(game: str, score: float) -> Optional[float]:
    """HNS of a raw game score, or None for a game outside the Atari-100k table."""
    name = game.split("/")[-1].split("-")[0].replace("NoFrameskip", "")
    if name not in ATARI_100K_SCORES:
        return None
    random_score, human_score = ATARI_100K_SCORES[name]
    return (score - random_score) / (human_score - random_score)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the official (minGPT) parameter groups: weights of Linear / Conv / LSTM layers decay;
    biases, embeddings and normalisation weights do not."""
    decay_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM, nn.LSTMCell)
    decay, no_decay = [], []
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            is_weight = p_name.startswith("weight")  # LSTM: weight_ih(_l0), weight_hh(_l0)
            (decay if is_weight and isinstance(mod, decay_types) else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def make_warmup(opt: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 (official: the factor is step / warmup, so the first update uses lr 0)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / warmup_steps) if warmup_steps > 0 else 1.0)


class NonFiniteLossError(RuntimeError):
    """A NaN / inf loss: training stops, the last good checkpoint is left untouched."""


def optimizer_step(name: str, loss: torch.Tensor, model: nn.Module, opt, sched, max_grad_norm: float,
                   step: int) -> float:
    """backward -> clip -> step -> warm-up: one update of one of the three models. Returns the grad norm.
    A non-finite loss or gradient raises before the weights change."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite {name} loss ({loss.item()}) at {name} step {step}; "
                                 "training stopped, the last checkpoint is the last good state")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if not torch.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite {name} gradient norm at {name} step {step}; "
                                 "training stopped, the last checkpoint is the last good state")
    opt.step()
    sched.step()
    return grad_norm.item()


@torch.no_grad()
def evaluate_policy(actor_critic: ActorCriticNetwork, env, max_steps: int, epsilon: float = 0.0,
                    generator=None, frames: Optional[list] = None) -> dict:
    """Play one episode in each of env's B parallel envs (a test env: no life-loss ends) with actions
    sampled from the policy (epsilon = 1: the uniform random policy). An episode still running after
    max_steps counts with its score so far. Returns raw scores; `frames` collects env 0's frames."""
    loop = AgentEnvLoop(env, actor_critic, epsilon=epsilon, generator=generator)
    returns, done, steps = None, None, 0
    while steps < max_steps and (done is None or not done.all()):
        r = loop.rollout(1, grad=False)
        if returns is None:
            returns = torch.zeros(r["rew"].size(0))
            done = torch.zeros(r["rew"].size(0), dtype=torch.bool)
        if frames is not None and not done[0]:
            frames.append(common.to_uint8(r["obs"][0, 0:1])[0].permute(1, 2, 0).numpy())
        returns += r["rew"][:, 0].float().cpu() * (~done)
        done |= (r["end"][:, 0] + r["trunc"][:, 0]).bool().cpu()
        steps += 1
    return dict(returns=returns.tolist(), return_mean=returns.mean().item(), return_max=returns.max().item(),
                finished=int(done.sum()), steps=steps)

# =====================================================================================================
# command line  (owner: agent half)
# =====================================================================================================

def config_parser(argv, description: str = "DIAMOND") -> tuple[argparse.ArgumentParser, DiamondConfig]:
    """A parser with one flag per DiamondConfig field whose defaults are those of the chosen --preset
    (read first), so `--preset small --num-sampling-steps 5` means: small, then that one change."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="large", choices=list(PRESETS))
    known, _ = pre.parse_known_args(argv)
    base = DiamondConfig(preset=known.preset)
    parser = argparse.ArgumentParser(description=description)
    common.add_config_args(parser, base)
    return parser, base


def parse_config(argv) -> DiamondConfig:
    """DiamondConfig from command-line flags only (used by tests and scripts)."""
    parser, base = config_parser(argv)
    return common.config_from_args(base, parser.parse_args(argv))
