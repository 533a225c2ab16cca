r"""diamond.py — DIAMOND: diffusion world models for Atari (Alonso et al. 2024, arXiv:2405.12399).

The agent never learns from the real game directly: real steps only train a world model, an EDM diffusion
model of the next frame given the last 4 frames and actions (plus a reward/end model), and the actor-critic
is trained purely on imagined rollouts sampled from it. Networks carry the official eloialonso/diamond
parameter names, so its published Atari agents load (`--from-official`).

    python diamond.py --preset smoke                        # CPU smoke run of every stage, under a minute
    python diamond.py --game catch                          # a built-in Catch the loop learns on a CPU
    python diamond.py --preset catch4                       # the same on a 4x4 board, in a few minutes
    python diamond.py --game Breakout-v5 --preset tiny      # the whole loop on a few CPU cores
    python diamond.py --game Breakout-v5 --preset large     # the paper's configuration (Atari 100k, GPU)
    python diamond.py --game Pong --preset small --num-sampling-steps 5
    python diamond.py --resume runs/diamond-Breakout-...    # continue after a kill
    python diamond.py --resume runs/diamond-Breakout-... --num-epochs 2000   # train longer
    python diamond.py eval --ckpt RUN --episodes 10 --compare-random [--gif play.gif]
    python diamond.py eval --from-official Breakout.pt --game Breakout-v5
    python diamond.py dream --ckpt RUN --steps 100          # RUN/dream.gif: the real game beside the dream

A run folder holds ckpt.pt, dataset/ (every real step), metrics.jsonl and curves.png (evaluation return
against real steps with the random policy's level, and the three losses), redrawn at each evaluation.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common

# =====================================================================================================
# config
# =====================================================================================================

# Presets scale networks and schedules; each lists what differs from `large`, the paper's configuration
# (official config/{trainer,agent/default}.yaml), whose values stand in the fields below. A field that presets
# set is declared with _p: its default None means "the preset's value", so an explicit value always wins, also
# one equal to large's (DiamondConfig(preset="tiny", obs_size=64)).
PRESETS: dict[str, dict] = {
    "large": {},
    # one consumer GPU (~8 GB): half-width world model, fewer updates per epoch
    "medium": dict(diffusion_channels=[48, 48, 48, 48], diffusion_cond_dim=192, rew_end_lstm_dim=256,
                   actor_critic_lstm_dim=256, denoiser_steps_first_epoch=4000,
                   rew_end_steps_first_epoch=4000, actor_critic_steps_first_epoch=2000,
                   denoiser_steps_per_epoch=200, rew_end_steps_per_epoch=200,
                   actor_critic_steps_per_epoch=200),
    # a small GPU or a long CPU run: 50k real steps, one res-block per level, 32 channels
    "small": dict(diffusion_channels=[32, 32, 32, 32], diffusion_depths=[1, 1, 1, 1], diffusion_cond_dim=128,
                  rew_end_channels=[16, 16, 16, 16], rew_end_depths=[1, 1, 1, 1], rew_end_cond_dim=64,
                  rew_end_lstm_dim=128, actor_critic_channels=[16, 16, 32, 32], actor_critic_lstm_dim=128,
                  env_steps=50_000, initial_collection_steps=2000, initial_collection_max=4000,
                  env_steps_per_epoch=200, num_epochs=300, denoiser_steps_first_epoch=1000,
                  rew_end_steps_first_epoch=1000, actor_critic_steps_first_epoch=300,
                  denoiser_steps_per_epoch=100, rew_end_steps_per_epoch=100, actor_critic_steps_per_epoch=50,
                  imagination_batch_size=16, eval_every=5, eval_max_steps=5000),
    # the whole loop on CPU cores (make demo): 32x32 frames, 8-channel nets
    "tiny": dict(obs_size=32, diffusion_channels=[8, 8, 8, 8], diffusion_depths=[1, 1, 1, 1],
                 diffusion_cond_dim=16, rew_end_channels=[8, 8, 8, 8], rew_end_depths=[1, 1, 1, 1],
                 rew_end_cond_dim=16, rew_end_lstm_dim=32, actor_critic_channels=[8, 8, 16, 16],
                 actor_critic_lstm_dim=32, env_steps=3000, initial_collection_steps=1000,
                 initial_collection_max=2000, env_steps_per_epoch=500, num_epochs=3,
                 denoiser_steps_first_epoch=120, rew_end_steps_first_epoch=80,
                 actor_critic_steps_first_epoch=30, denoiser_steps_per_epoch=40, rew_end_steps_per_epoch=30,
                 actor_critic_steps_per_epoch=15, batch_size=8, imagination_batch_size=8, learning_rate=5e-4,
                 actor_critic_learning_rate=5e-4, warmup_steps=20, eval_every=2, eval_episodes=8,
                 final_eval_episodes=8, eval_max_steps=1000),
    # the built-in Catch learnt on one CPU thread in minutes: tiny's nets on 16x16 frames, a 64-wide action
    # embedding (at 16 the imagined paddle ignored the action), short imagination, more entropy, lr 1e-3
    "catch": dict(game="catch", obs_size=16, diffusion_channels=[8, 8, 8, 8], diffusion_depths=[1, 1, 1, 1],
                  diffusion_cond_dim=64, rew_end_channels=[8, 8, 8, 8], rew_end_depths=[1, 1, 1, 1],
                  rew_end_cond_dim=16, rew_end_lstm_dim=32, actor_critic_channels=[16, 16, 16, 16],
                  actor_critic_lstm_dim=64, imagination_horizon=8, entropy_weight=0.01, env_steps=5000,
                  initial_collection_steps=2000, initial_collection_max=2000, env_steps_per_epoch=100,
                  num_epochs=21, denoiser_steps_first_epoch=600, rew_end_steps_first_epoch=1200,
                  actor_critic_steps_first_epoch=40, denoiser_steps_per_epoch=20, rew_end_steps_per_epoch=40,
                  actor_critic_steps_per_epoch=40, learning_rate=1e-3, actor_critic_learning_rate=1e-3,
                  warmup_steps=20, eval_every=2, eval_episodes=64, final_eval_episodes=200,
                  eval_max_steps=100),
}
# every stage once, with the fewest steps: the header's CPU smoke run
PRESETS["smoke"] = dict(PRESETS["tiny"], num_epochs=1, initial_collection_steps=300,
                        initial_collection_max=300, denoiser_steps_first_epoch=10,
                        rew_end_steps_first_epoch=10, actor_critic_steps_first_epoch=3, eval_episodes=2,
                        final_eval_episodes=2, eval_max_steps=200)
# the loop learning a 4x4 Catch in a few CPU minutes (make demo, the learning test): catch's nets, a short
# schedule, imagination as long as the game, no actor-critic updates before the world model has trained
PRESETS["catch4"] = dict(PRESETS["catch"], game="diamond/Catch4x4-v0", initial_collection_steps=1000,
                         initial_collection_max=1000, num_epochs=5, denoiser_steps_first_epoch=300,
                         rew_end_steps_first_epoch=400, actor_critic_steps_first_epoch=0,
                         rew_end_steps_per_epoch=20, actor_critic_steps_per_epoch=80, imagination_horizon=4,
                         actor_critic_learning_rate=3e-3, eval_every=1, final_eval_episodes=100)


def _p(large, help: str):
    """A field that presets set: None until __post_init__ fills in the preset's value (large: the paper's)."""
    return common.field(None, help, large=large)


@dataclass
class DiamondConfig:
    """Every knob of the method. `DiamondConfig(preset="small")` starts from a preset; keyword arguments
    override it and attributes may be assigned afterwards (a misspelt name raises)."""
    preset: str = common.field("large", "tiny | small | medium | large (the paper's) | smoke (every stage, "
                               "briefly) | catch (the built-in Catch, learnt on a CPU; the default of --game "
                               "catch) | catch4 (a 4x4 Catch, learnt in minutes)")
    # --- game and run ---
    game: Optional[str] = _p("Breakout-v5", "an Atari game (with or without ALE/), catch, or any gymnasium "
                             "id with discrete actions and image frames ('module:Env-v0' imports module)")
    obs_size: Optional[int] = _p(64, "frames are resized to obs_size x obs_size RGB")
    seed: int = common.field(0, "seed of the networks' init and of every random stream of the run")
    device: str = common.field("auto", "auto | cpu | cuda | mps")
    sticky_actions: float = common.field(0.0, "repeat_action_probability: 0 = Atari 100k protocol, 0.25 = "
                                              "ALE v5")
    # --- denoiser (EDM U-Net) ---
    num_steps_conditioning: int = common.field(4, "past frames and actions the denoiser conditions on")
    diffusion_channels: Optional[list] = _p([64, 64, 64, 64], "U-Net channels per level")
    diffusion_depths: Optional[list] = _p([2, 2, 2, 2], "U-Net res-blocks per level")
    diffusion_attn_depths: list = common.field([0, 0, 0, 0], "1 = self-attention in that level's res-blocks")
    diffusion_cond_dim: Optional[int] = _p(256, "width of the noise-level + action conditioning vector")
    num_sampling_steps: int = common.field(3, "denoising steps per imagined frame")
    diffusion_sampler: str = common.field("euler", "euler | heun (order 2: 2N-1 network calls per frame)")
    # --- reward / termination model ---
    rew_end_channels: Optional[list] = _p([32, 32, 32, 32], "encoder channels per level")
    rew_end_depths: Optional[list] = _p([2, 2, 2, 2], "encoder res-blocks per level")
    rew_end_cond_dim: Optional[int] = _p(128, "action embedding width (AdaGN conditioning)")
    rew_end_lstm_dim: Optional[int] = _p(512, "LSTM hidden size")
    # --- actor-critic ---
    actor_critic_channels: Optional[list] = _p([32, 32, 64, 64], "encoder channels per level (max-pooled)")
    actor_critic_lstm_dim: Optional[int] = _p(512, "LSTM hidden size")
    imagination_horizon: Optional[int] = _p(15, "imagined steps per actor-critic update (official "
                                                "backup_every)")
    imagination_batch_size: Optional[int] = _p(32, "parallel imagined environments")
    discount_factor: float = common.field(0.985, "gamma of the lambda-returns")
    lambda_returns: float = common.field(0.95, "lambda of the lambda-returns")
    entropy_weight: Optional[float] = _p(0.001, "weight of the entropy bonus")
    value_weight: float = common.field(1.0, "weight of the value MSE")
    # --- optimisation (AdamW for each of the three models) ---
    learning_rate: Optional[float] = _p(1e-4, "AdamW learning rate of the denoiser and reward/end model")
    actor_critic_learning_rate: Optional[float] = _p(1e-4, "AdamW learning rate of the actor-critic")
    weight_decay: float = common.field(1e-2, "AdamW weight decay of the denoiser and reward/end model")
    actor_critic_weight_decay: float = common.field(0.0, "AdamW weight decay of the actor-critic")
    warmup_steps: Optional[int] = _p(100, "linear learning-rate warm-up from 0, per model")
    max_grad_norm_denoiser: float = common.field(1.0, "gradient-norm clip of the denoiser")
    max_grad_norm_rew_end: float = common.field(100.0, "gradient-norm clip of the reward/end model")
    max_grad_norm_actor_critic: float = common.field(100.0, "gradient-norm clip of the actor-critic")
    batch_size: Optional[int] = _p(32, "segments per denoiser and reward/end batch")
    sample_weights: list = common.field([0.1, 0.1, 0.1, 0.7], "segment sampling weight of each chronological "
                                                              "quarter")
    # --- schedule (per epoch: collect, train denoiser, reward/end model, actor-critic; evaluate) ---
    num_epochs: Optional[int] = _p(1000, "training epochs")
    env_steps: Optional[int] = _p(100_000, "budget of real environment steps (Atari 100k)")
    initial_collection_steps: Optional[int] = _p(5000, "random-policy steps before the first training")
    initial_collection_max: Optional[int] = _p(10000, "the initial collection goes on until both rare reward "
                                                      "signs are seen, up to this many steps")
    env_steps_per_epoch: Optional[int] = _p(100, "real steps collected per epoch after the first")
    collect_epsilon: float = common.field(0.01, "epsilon-greedy exploration while collecting")
    denoiser_steps_first_epoch: Optional[int] = _p(10000, "denoiser updates in epoch 1")
    rew_end_steps_first_epoch: Optional[int] = _p(10000, "reward/end updates in epoch 1")
    actor_critic_steps_first_epoch: Optional[int] = _p(5000, "actor-critic updates in epoch 1")
    denoiser_steps_per_epoch: Optional[int] = _p(400, "denoiser updates in later epochs")
    rew_end_steps_per_epoch: Optional[int] = _p(400, "reward/end updates in later epochs")
    actor_critic_steps_per_epoch: Optional[int] = _p(400, "actor-critic updates in later epochs")
    eval_every: Optional[int] = _p(10, "evaluate on the real game every N epochs (and after the last one)")
    eval_episodes: Optional[int] = _p(4, "test episodes per evaluation")
    final_eval_episodes: Optional[int] = _p(100, "test episodes after the last epoch")
    eval_max_steps: Optional[int] = _p(27000, "cap on a test episode's steps (108k frames: the ALE cap)")

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for f in fields(self):
            if "large" in f.metadata and getattr(self, f.name) is None:
                value = PRESETS[self.preset].get(f.name, f.metadata["large"])
                setattr(self, f.name, list(value) if isinstance(value, list) else value)  # not an alias

    def __setattr__(self, name, value):  # a plain dataclass would silently keep a misspelt attribute
        if name not in self.__dataclass_fields__:
            close = difflib.get_close_matches(name, list(self.__dataclass_fields__), n=3)
            raise AttributeError(f"DiamondConfig has no field {name!r}" + (
                f"; did you mean {close}?" if close else "; see `python diamond.py --help` for the list"))
        if name == "preset" and "preset" in self.__dict__ and value != self.preset:
            raise AttributeError("set the preset at construction: DiamondConfig(preset=...)")
        object.__setattr__(self, name, value)


def check_config(cfg: DiamondConfig) -> None:
    """A ValueError naming the flag of an invalid value, before any work (collection, run folder)."""
    common.check_ranges(
        cfg, positive=("obs_size", "num_steps_conditioning", "diffusion_cond_dim", "num_sampling_steps",
                       "rew_end_cond_dim", "rew_end_lstm_dim", "actor_critic_lstm_dim", "imagination_horizon",
                       "imagination_batch_size", "batch_size", "num_epochs", "env_steps",
                       "env_steps_per_epoch", "eval_every", "eval_episodes", "final_eval_episodes",
                       "eval_max_steps", "learning_rate", "actor_critic_learning_rate",
                       "max_grad_norm_denoiser", "max_grad_norm_rew_end", "max_grad_norm_actor_critic"),
        non_negative=("seed", "warmup_steps", "initial_collection_steps", "initial_collection_max",
                      "denoiser_steps_first_epoch", "rew_end_steps_first_epoch",
                      "actor_critic_steps_first_epoch", "denoiser_steps_per_epoch", "rew_end_steps_per_epoch",
                      "actor_critic_steps_per_epoch", "weight_decay", "actor_critic_weight_decay",
                      "entropy_weight", "value_weight"),
        unit=("sticky_actions", "collect_epsilon", "discount_factor", "lambda_returns"))
    text = lambda values: " ".join(map(str, values))
    levels = {"diffusion": ("channels", "depths", "attn_depths"), "rew_end": ("channels", "depths")}
    for net, names in levels.items():
        lists = {common.flag(f"{net}_{k}"): getattr(cfg, f"{net}_{k}") for k in names}
        if len({len(v) for v in lists.values()}) != 1:
            raise ValueError(f"{', '.join(lists)} need one value per U-Net level each, got "
                             + ", ".join(f"{k} {text(v)}" for k, v in lists.items()))
    for name in ("diffusion_channels", "rew_end_channels", "actor_critic_channels"):
        if not getattr(cfg, name) or min(getattr(cfg, name)) <= 0:
            raise ValueError(f"{common.flag(name)} needs positive widths, got {text(getattr(cfg, name))}")
    if min(cfg.sample_weights, default=-1) < 0 or sum(cfg.sample_weights) <= 0:
        raise ValueError(f"--sample-weights must be >= 0 with a positive sum, got {text(cfg.sample_weights)}")
    if cfg.diffusion_sampler not in ("euler", "heun"):
        raise ValueError(f"--diffusion-sampler must be euler or heun, got {cfg.diffusion_sampler!r}")
    game_id(cfg.game)  # an unknown game names the closest ones


def load_run(path) -> tuple[DiamondConfig, dict]:
    """The one way from a checkpoint to its config: (DiamondConfig, checkpoint) of a run folder or its
    ckpt.pt (common.config_from_dict: fields a newer diamond.py added take their defaults)."""
    state = common.load_checkpoint(common.checkpoint_file(path), "diamond")
    return common.config_from_dict(DiamondConfig, state["config"]), state

# =====================================================================================================
# environment: Atari preprocessing, vectorised envs, recording into the replay dataset
# =====================================================================================================

# Official DIAMOND Atari protocol (src/envs/atari_preprocessing.py, config/env/atari.yaml)
ATARI_NOOP_MAX = 30           # reset: 1..30 random no-ops
ATARI_FRAME_SKIP = 4          # one agent step = the action repeated on 4 emulator frames
ATARI_MAX_FRAMES = 108_000    # ALE cap per episode (30 min of play = 27k agent steps), then truncation


def _import_ale():
    import ale_py
    import gymnasium as gym
    gym.register_envs(ale_py)  # gymnasium >= 1.0 needs the ALE ids registered explicitly
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner before our one-line errors
    return gym


def ale_game_ids() -> list:
    """Every Atari game id that ale-py ships (its ROMs come with the wheel), e.g. 'ALE/Breakout-v5'."""
    return sorted(k for k in _import_ale().registry if k.startswith("ALE/") and k.endswith("-v5"))


def resolve_game(game: str) -> str:
    """'Breakout-v5', 'Breakout', 'ALE/Breakout-v5' or 'BreakoutNoFrameskip-v4' -> 'ALE/Breakout-v5';
    an unknown game raises a ValueError naming the closest ones."""
    by_name = {i[4:-3].lower(): i for i in ale_game_ids()}  # 'breakout' -> 'ALE/Breakout-v5'
    name = game.split("/")[-1]
    for suffix in ("-v5", "-v4", "-v0", "NoFrameskip", "Deterministic"):
        name = name[:-len(suffix)] if name.endswith(suffix) else name
    if name.lower() in by_name:
        return by_name[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(by_name), n=5, cutoff=0.5)
    raise ValueError(f"--game {game!r} is not an Atari game of ale-py nor a registered gymnasium id; "
                     f"closest: {', '.join(by_name[c][4:] for c in close) or 'none'} "
                     f"(all: python -c \"import diamond; print(diamond.ale_game_ids())\")")


class AtariEnv:
    """One Atari game with the official preprocessing: 1..30 no-op starts, frame skip 4 with the max of the
    last two RGB screens (sprites flicker), area-average resize to obs_size (pillow BOX = OpenCV INTER_AREA),
    minimal action set, raw rewards summed over the skip, info["life_loss"]. Sticky actions are off as in
    Atari 100k (0.25 = ALE v5). The gymnasium env runs at frameskip=1 (official: NoFrameskip-v4 ids)."""

    def __init__(self, game: str, obs_size: int = 64, sticky_actions: float = 0.0,
                 noop_max: int = ATARI_NOOP_MAX, frame_skip: int = ATARI_FRAME_SKIP):
        self.env = _import_ale().make(resolve_game(game), frameskip=1, full_action_space=False,
                                      repeat_action_probability=sticky_actions, obs_type="ram",
                                      max_num_frames_per_episode=ATARI_MAX_FRAMES)
        self.ale, self.num_actions = self.env.unwrapped.ale, int(self.env.action_space.n)
        self.action_names = self.env.unwrapped.get_action_meanings()  # minimal set, e.g. NOOP FIRE RIGHT LEFT
        assert self.action_names[0] == "NOOP"
        self.obs_size, self.noop_max, self.frame_skip, self.lives = obs_size, noop_max, frame_skip, 0
        self.screens = np.zeros((2, *self.ale.getScreenDims(), 3), np.uint8)  # the last two frames of a step

    def reset(self, seed: Optional[int] = None):
        """-> (obs uint8 (3, S, S), info)."""
        _, info = self.env.reset(seed=seed)
        for _ in range(int(self.env.unwrapped.np_random.integers(1, self.noop_max + 1))):
            _, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                _, info = self.env.reset()
        self.lives = self.ale.lives()
        self.ale.getScreenRGB(self.screens[0])
        self.screens[1].fill(0)
        return self._obs(), info

    def step(self, action: int):
        """-> (obs uint8 (3, S, S), raw reward summed over the skip, terminated, truncated, info)."""
        reward, terminated, truncated, life_loss, info = 0.0, False, False, False, {}
        for t in range(self.frame_skip):
            _, r, terminated, truncated, info = self.env.step(action)
            reward += r
            if self.ale.lives() < self.lives:
                life_loss, self.lives = True, self.ale.lives()
            if terminated or truncated:  # official: keep the previous screens
                break
            if t >= self.frame_skip - 2:  # screens of the last two frames: [1] = 3rd, [0] = 4th
                self.ale.getScreenRGB(self.screens[self.frame_skip - 1 - t])
        return self._obs(), reward, terminated, truncated, dict(info, life_loss=life_loss)

    def _obs(self) -> np.ndarray:
        np.maximum(self.screens[0], self.screens[1], out=self.screens[0])  # in place, as officially
        img = Image.fromarray(self.screens[0]).resize((self.obs_size, self.obs_size), Image.BOX)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()

    def snapshot(self):
        return self.ale.cloneState(), self.screens.copy(), self.lives

    def restore(self, state):
        self.ale.restoreState(state[0])
        self.screens[:], self.lives = state[1], state[2]

    def close(self):
        self.env.close()


# --- any other gymnasium game: its frames resized to obs_size, nothing else ---------------------------

CATCH_ID = "diamond/Catch-v0"
GAME_ALIASES = {"catch": CATCH_ID}  # --game names that are not gymnasium ids (any case)


def game_id(game: str) -> str:
    """The gymnasium id of --game: an alias (GAME_ALIASES) -> its id; Atari names ('Breakout',
    'BreakoutNoFrameskip-v4') -> 'ALE/<Game>-v5'; any other registered id, or 'module:Env-v0' (gymnasium
    imports module), as it is."""
    game = GAME_ALIASES.get(game.lower(), game)
    spec = _import_ale().registry.get(game)
    return game if ":" in game or (spec and "ale_py" not in str(spec.entry_point)) else resolve_game(game)


def make_game(game: str, obs_size: int = 64, sticky_actions: float = 0.0):
    """An AtariEnv (official preprocessing) for Atari ids, a GymEnv for any other id."""
    gid = game_id(game)
    return AtariEnv(gid, obs_size, sticky_actions) if gid.startswith("ALE/") else GymEnv(gid, obs_size)


def _is_image(space) -> bool:
    return (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3
            and space.shape[2] == 3)


class GymEnv:
    """A gymnasium env with discrete actions behind AtariEnv's interface: (H, W, 3) uint8 observations, or
    else the frames of render_mode="rgb_array", area-resized to obs_size. A game that cannot be made, has no
    image frames or has non-discrete actions raises a one-line ValueError. snapshot()/restore() copy the
    env."""

    def __init__(self, game: str, obs_size: int = 64):
        try:
            self.env = gym.make(game)
            self.from_render = not _is_image(self.env.observation_space)
            if self.from_render and "rgb_array" in self.env.metadata.get("render_modes", []):
                self.env.close()
                self.env = gym.make(game, render_mode="rgb_array")
                self.env.reset()
                self.env.render()  # e.g. a missing pygame fails here, not in the middle of a run
        except (gym.error.Error, ImportError) as e:
            raise ValueError(f"--game {game!r} cannot be made by gymnasium: {common.one_line(e)}") from None
        space, self.obs_size = self.env.action_space, obs_size
        if not isinstance(space, gym.spaces.Discrete):
            raise ValueError(f"--game {game!r}: DIAMOND needs discrete actions, the env has {space}")
        if self.from_render and self.env.render_mode != "rgb_array":
            raise ValueError(f"--game {game!r}: observations {self.env.observation_space} are not (H, W, 3) "
                             "uint8 images and the env has no render_mode='rgb_array'")
        self.num_actions, self.action_start = int(space.n), int(space.start)
        meanings = getattr(self.env.unwrapped, "get_action_meanings", None)
        self.action_names = (meanings() if meanings
                             else [str(a + self.action_start) for a in range(self.num_actions)])

    def _obs(self, obs) -> np.ndarray:
        frame = np.asarray(self.env.render() if self.from_render else obs, np.uint8)
        if frame.shape[:2] != (self.obs_size, self.obs_size):
            frame = np.asarray(Image.fromarray(frame).resize((self.obs_size, self.obs_size), Image.BOX))
        return frame.transpose(2, 0, 1).copy()

    def reset(self, seed: Optional[int] = None):
        obs, info = self.env.reset(seed=seed)
        return self._obs(obs), info

    def step(self, action: int):
        obs, reward, terminated, truncated, info = self.env.step(int(action) + self.action_start)
        return self._obs(obs), float(reward), terminated, truncated, dict(info, life_loss=False)

    def snapshot(self):
        return copy.deepcopy(self.env)

    def restore(self, state):
        self.env = copy.deepcopy(state)

    def close(self):
        self.env.close()


class Catch(gym.Env):
    """bsuite's Catch (Osband et al. 2020) in pixels: a ball falls one row per step from a random column of
    the top row; the paddle (bottom row, starting in the middle) moves NOOP / LEFT / RIGHT; the step on which
    the ball reaches the bottom row gives +1 if the paddle is under it, else -1, and the next step (the ball
    gone) ends the episode: unlike bsuite, the outcome is not on the final frame, which DIAMOND's denoiser
    never trains on (official data pipeline). The paddle can reach any column in time (optimal return +1); any
    policy blind to the ball catches with probability 1 / columns (the ball's column is uniform): the random
    policy's mean return is 2 / columns - 1. Frames: (size, size, 3) uint8, a red ball and a green paddle."""
    metadata = {"render_modes": []}

    def __init__(self, rows: int = 8, columns: int = 8, size: int = 16):
        assert rows > columns // 2 and size % rows == 0 and size % columns == 0, (rows, columns, size)
        self.rows, self.columns, self.size = rows, columns, size
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(3)

    def get_action_meanings(self) -> list:
        return ["NOOP", "LEFT", "RIGHT"]

    def reset(self, seed: Optional[int] = None, options=None):
        super().reset(seed=seed)
        self.ball_row, self.ball_col = 0, int(self.np_random.integers(self.columns))
        self.paddle = self.columns // 2
        return self._frame(), {}

    def step(self, action: int):
        self.paddle = min(max(self.paddle + (0, -1, 1)[action], 0), self.columns - 1)
        self.ball_row += 1
        landed = self.ball_row == self.rows - 1
        reward = (1.0 if self.ball_col == self.paddle else -1.0) if landed else 0.0
        return self._frame(), reward, self.ball_row == self.rows, False, {}

    def _frame(self) -> np.ndarray:
        board = np.zeros((self.rows + 1, self.columns, 3), np.uint8)  # row `rows`: the ball has left
        board[self.ball_row, self.ball_col, 0] = 255  # red ball
        board[self.rows - 1, self.paddle, 1] = 255  # green paddle
        board = board[:self.rows]
        return np.repeat(np.repeat(board, self.size // self.rows, 0), self.size // self.columns, 1)


if CATCH_ID not in gym.registry:  # python diamond.py imports it twice: as __main__ and as diamond
    gym.register(CATCH_ID, entry_point=Catch)
    gym.register("diamond/Catch4x4-v0", entry_point=Catch, kwargs=dict(rows=4, columns=4))


def frames_to_float(frames) -> torch.Tensor:
    """uint8 frames (..., C, H, W) -> float32 in [-1, 1] (official u / 255 * 2 - 1)."""
    return torch.as_tensor(frames).float().div(255).mul(2).sub(1)


class VecEnv:
    """num_envs games (make_game: AtariEnv or GymEnv) stepped in a loop with same-step auto-reset, with the
    torch interface of AgentEnvLoop: reset() -> (obs, info); step(act) -> (obs, rew, end, trunc, info); obs
    (B, 3, S, S) float in [-1, 1], rew raw float32, end/trunc uint8. For the envs that finished,
    info["final_observation"] (n_dead, 3, S, S) is their last frame and obs is already the next episode's.
    done_on_life_loss (training): a lost life is an end but the game goes on; at game over the final
    observation is the game's last frame (the official DoneOnLifeLoss puts the new game's first frame there).
    info also holds "frames" (B, 3, S, S) uint8, "dead" (B,) bool and "scores", the raw returns of the games
    that ended (the reported score)."""

    def __init__(self, game: str, num_envs: int = 1, obs_size: int = 64, done_on_life_loss: bool = False,
                 sticky_actions: float = 0.0, seed: int = 0, device="cpu"):
        self.envs = [make_game(game, obs_size, sticky_actions) for _ in range(num_envs)]
        self.num_envs, self.num_actions = num_envs, self.envs[0].num_actions
        self.done_on_life_loss, self.device = done_on_life_loss, torch.device(device)
        self.rng, self.frames = np.random.default_rng(seed), None  # rng: the seeds of new games
        self.scores = np.zeros(num_envs)  # raw return of each running game (over all its lives)

    def reset(self):
        s = int(self.rng.integers(2 ** 31 - 1))  # official: seeds s + i
        self.frames = np.stack([env.reset(seed=s + i)[0] for i, env in enumerate(self.envs)])
        self.scores[:] = 0
        return frames_to_float(self.frames).to(self.device), {"frames": self.frames.copy()}

    def step(self, act):
        act = torch.as_tensor(act).cpu().numpy()
        frames, final, scores = self.frames.copy(), [], []
        rew, end, trunc, dead = (np.zeros(self.num_envs, t) for t in (np.float32, np.uint8, np.uint8, bool))
        for i, env in enumerate(self.envs):
            frames[i], rew[i], terminated, truncated, info = env.step(int(act[i]))
            self.scores[i] += rew[i]
            end[i] = terminated or (self.done_on_life_loss and info["life_loss"])
            trunc[i] = truncated and not end[i]
            dead[i] = end[i] or trunc[i]
            if dead[i]:
                final.append(frames[i].copy())
            if terminated or truncated:  # game over: report the score, start a new game
                scores.append(float(self.scores[i]))
                self.scores[i] = 0
                frames[i] = env.reset()[0]
        self.frames = frames
        info = {"frames": frames.copy(), "dead": dead, "scores": scores}
        if dead.any():
            info["final_frames"] = np.stack(final)
            info["final_observation"] = frames_to_float(info["final_frames"]).to(self.device)
        to = lambda a: torch.from_numpy(a).to(self.device)
        return frames_to_float(frames).to(self.device), to(rew), to(end), to(trunc), info

    def close(self):
        for env in self.envs:
            env.close()


class Recorder:
    """A real vector env (same interface) that appends every transition it steps to a ReplayDataset: each env
    writes into its own open episode, closed with its final frame at an end or truncation. Collection is
    AgentEnvLoop(Recorder(env, dataset), actor_critic, epsilon).rollout(n), so the env keeps running between
    calls; `scores` lists the raw returns of the games that ended."""

    def __init__(self, env: VecEnv, dataset: "ReplayDataset"):
        self.env, self.dataset, self.scores = env, dataset, []
        self.episode_ids = [None] * env.num_envs

    def reset(self):
        return self.env.reset()

    def step(self, act):
        frames, act = self.env.frames, torch.as_tensor(act).cpu()  # the frames the actions were taken on
        obs, rew, end, trunc, info = self.env.step(act)
        ds, ids, k = self.dataset, self.episode_ids, 0
        for i, (r, e, t) in enumerate(zip(rew.tolist(), end.tolist(), trunc.tolist())):
            ids[i] = ds.new_episode() if ids[i] is None else ids[i]
            ds.append(ids[i], frames[i], int(act[i]), r, e, t)
            if info["dead"][i]:
                ds.close_episode(ids[i], info["final_frames"][k])
                ids[i], k = None, k + 1
        self.scores += info["scores"]
        return obs, rew, end, trunc, info

# =====================================================================================================
# replay dataset
# =====================================================================================================

class Episode:
    """One episode in growable arrays: obs[t] is the frame seen BEFORE act[t]; rew[t], end[t], trunc[t]
    belong to the transition (obs[t], act[t], obs[t+1]). final_obs is the frame after the last action (an
    episode that ended or was truncated), None while it is collected."""

    ARRAYS = dict(obs=np.uint8, act=np.int64, rew=np.float32, end=np.uint8, trunc=np.uint8)  # name -> dtype

    def __init__(self, frame_shape, capacity: int = 64):
        for k, dtype in self.ARRAYS.items():
            setattr(self, k, np.zeros((capacity, *frame_shape) if k == "obs" else capacity, dtype))
        self.len, self.final_obs, self.finished, self.saved = 0, None, False, False

    def append(self, frame, act, rew, end, trunc):
        if self.len == len(self.act):  # double the capacity
            for k in self.ARRAYS:
                setattr(self, k, np.concatenate([getattr(self, k), np.zeros_like(getattr(self, k))]))
        t = self.len
        self.obs[t], self.act[t], self.rew[t], self.end[t], self.trunc[t] = frame, act, rew, end, trunc
        self.len, self.saved = t + 1, False


class ReplayDataset:
    """Every real transition collected, as uint8 frames (12 KB a 64x64 frame), sampled as fixed-length
    segments with padding masks like the official BatchSampler + Dataset: episode ~ P(ep) (proportional to
    length with sample_weights None or fewer episodes than weights; else the episodes are split
    chronologically into len(weights) chunks and chunk k gets w_k, spread uniformly over its episodes, so
    [.1, .1, .1, .7] draws 70% from the newest quarter); t ~ U{0..len-1}; left padding only:
    stop = min(len, t + 1 + U{0..L-1}), start = stop - L; both sides: start = t - U{0..L-1}. Padding frames
    are 0 (mid-grey), actions 0, mask False. save()/load(): one .npz per episode (finished ones written
    once) and an index written last, each atomically, so a kill leaves the previous complete dataset."""

    def __init__(self, frame_shape=(3, 64, 64)):
        self.frame_shape, self.episodes = tuple(frame_shape), []

    def __len__(self) -> int:
        return sum(ep.len for ep in self.episodes)

    def new_episode(self) -> int:
        self.episodes.append(Episode(self.frame_shape))
        return len(self.episodes) - 1

    def append(self, ep_id: int, frame, act: int, rew: float, end: int, trunc: int):
        assert not self.episodes[ep_id].finished, f"episode {ep_id} is closed"
        assert frame.shape == self.frame_shape and frame.dtype == np.uint8, (frame.shape, frame.dtype)
        self.episodes[ep_id].append(frame, act, rew, end, trunc)

    def close_episode(self, ep_id: int, final_frame):
        ep = self.episodes[ep_id]
        ep.final_obs, ep.finished, ep.saved = np.asarray(final_frame, np.uint8).copy(), True, False

    def add_episode(self, obs, act, rew, end, trunc, final_obs=None) -> int:
        """A whole episode at once (tests, imports): obs (T, C, H, W) uint8, the rest (T,)."""
        i = self.new_episode()
        for t in range(len(act)):
            self.append(i, obs[t], act[t], rew[t], end[t], trunc[t])
        if final_obs is not None:
            self.close_episode(i, final_obs)
        return i

    def episode_probs(self, sample_weights=None) -> np.ndarray:
        lengths = np.array([ep.len for ep in self.episodes], np.float64)
        n, k = len(lengths), len(sample_weights or [])
        if sample_weights is None or n < k:
            return lengths / lengths.sum()
        chunk, p = n // k, np.zeros(n)  # the last chunk takes the remainder
        for j, w in enumerate(sample_weights):
            lo, hi = j * chunk, (n if j == k - 1 else (j + 1) * chunk)
            p[lo:hi] = w / (hi - lo)
        return p / p.sum()

    def sample_segments(self, batch_size: int, seq_len: int, pad_right: bool = False, sample_weights=None,
                        rng: Optional[np.random.Generator] = None) -> dict:
        """batch_size random segments of L = seq_len steps: obs (B, L, C, H, W) float in [-1, 1], act (B, L)
        long, rew (B, L) float, end, trunc (B, L) uint8, mask_padding (B, L) bool, final_obs (B, C, H, W)
        float (the episode's final frame, zeros when it has none). Left padding only unless pad_right."""
        rng = rng if rng is not None else np.random.default_rng()
        ep_ids = rng.choice(len(self.episodes), size=batch_size, p=self.episode_probs(sample_weights))
        L = seq_len
        out = {k: np.zeros((batch_size, L, *self.frame_shape) if k == "obs" else (batch_size, L), d)
               for k, d in Episode.ARRAYS.items()}
        pad = np.ones((batch_size, L), bool)
        final = np.zeros((batch_size, *self.frame_shape), np.uint8)
        has_final = np.zeros(batch_size, bool)
        for b, i in enumerate(ep_ids):
            ep = self.episodes[i]
            t = rng.integers(ep.len)
            if pad_right:
                start = t - rng.integers(L)
            else:
                start = min(ep.len, t + 1 + rng.integers(L)) - L
            lo, hi = max(start, 0), min(start + L, ep.len)
            for k in out:
                out[k][b, lo - start:hi - start] = getattr(ep, k)[lo:hi]
            pad[b, lo - start:hi - start] = False
            if ep.final_obs is not None:
                final[b], has_final[b] = ep.final_obs, True
        x = frames_to_float(out.pop("obs"))
        x[torch.from_numpy(pad)] = 0.0  # official padding: zeros in [-1, 1] space
        f = frames_to_float(final) * torch.from_numpy(has_final)[:, None, None, None]
        return dict({k: torch.from_numpy(v) for k, v in out.items()}, obs=x, final_obs=f,
                    mask_padding=torch.from_numpy(~pad))

    def save(self, folder) -> None:
        """Write new or changed episodes (each atomically), then the index (atomically, last)."""
        folder = Path(folder)
        for i, ep in enumerate(self.episodes):
            if not ep.saved:
                arrays = {k: getattr(ep, k)[:ep.len] for k in Episode.ARRAYS}
                arrays.update({} if ep.final_obs is None else {"final_obs": ep.final_obs})
                common.atomic_write(folder / f"episode_{i:06d}.npz", lambda f: np.savez(f, **arrays))
                ep.saved = True
        index = {"frame_shape": list(self.frame_shape), "lengths": [ep.len for ep in self.episodes],
                 "finished": [ep.finished for ep in self.episodes]}
        common.atomic_write(folder / "index.json", lambda f: f.write(json.dumps(index).encode()))

    @classmethod
    def load(cls, folder) -> "ReplayDataset":
        """The dataset as of the last completed save(). Episodes that were still open become closed-unfinished
        (no final frame; a resumed collector starts new episodes, as the official code does)."""
        folder = Path(folder)
        index = json.loads((folder / "index.json").read_text())
        ds = cls(tuple(index["frame_shape"]))
        for i, (n, finished) in enumerate(zip(index["lengths"], index["finished"])):
            ep = Episode(ds.frame_shape, capacity=max(n, 1))
            with np.load(folder / f"episode_{i:06d}.npz") as z:
                for k in Episode.ARRAYS:
                    getattr(ep, k)[:n] = z[k][:n]  # an open episode may have grown after the index
                ep.final_obs = z["final_obs"].copy() if "final_obs" in z.files and finished else None
            ep.len, ep.finished, ep.saved = n, True, finished
            ds.episodes.append(ep)
        return ds

# =====================================================================================================
# world model: denoiser U-Net, EDM denoiser, sampler, reward/end model
# =====================================================================================================

# Official eloialonso/diamond constants (config/agent/default.yaml, config/trainer.yaml, models/blocks.py).
SIGMA_DATA = 0.5           # EDM sigma_data of frames in [-1, 1]
SIGMA_OFFSET_NOISE = 0.3   # std of the per-channel offset noise; also enters every conditioner
ATTN_HEAD_DIM = 8          # SelfAttention2d: heads = max(1, C // 8)
GN_GROUP_SIZE = 32         # GroupNorm with max(1, C // 32) groups, eps 1e-5


class _NormWrap(nn.Module):
    """GroupNorm under the attribute `.norm` (official blocks.GroupNorm), for the official key names."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(max(1, channels // GN_GROUP_SIZE), channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine, then GN(x) (1 + scale) + shift with [scale, shift] = linear(cond)."""

    def __init__(self, channels: int, cond_channels: int):
        super().__init__()
        self.num_groups = max(1, channels // GN_GROUP_SIZE)
        self.linear = nn.Linear(cond_channels, 2 * channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(cond)[:, :, None, None].chunk(2, dim=1)
        return F.group_norm(x, self.num_groups, eps=1e-5) * (1 + scale) + shift


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions. The residual adds to the NORMALISED input
    (official), so with the zero-initialised out_proj the block starts as a plain GroupNorm."""

    def __init__(self, channels: int, head_dim: int = ATTN_HEAD_DIM):
        super().__init__()
        self.n_head = max(1, channels // head_dim)
        self.norm = _NormWrap(channels)
        self.qkv_proj = nn.Conv2d(channels, 3 * channels, 1)
        self.out_proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = self.norm(x)
        qkv = self.qkv_proj(x).view(n, 3 * self.n_head, c // self.n_head, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=1)  # each (N, heads, H*W, C/heads): head i = channels [8i, 8i + 8)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/heads)) v over the H*W tokens
        return x + self.out_proj(y.transpose(2, 3).reshape(n, c, h, w))


class ResBlock(nn.Module):
    """x -> AdaGN -> SiLU -> conv -> AdaGN -> SiLU -> conv (zero-init) + skip, then optional attention."""

    def __init__(self, in_channels: int, out_channels: int, cond_channels: int, attn: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.norm1 = AdaGroupNorm(in_channels, cond_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(out_channels, cond_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.attn = SelfAttention2d(out_channels) if attn else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as (nearly) the identity

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        r = self.proj(x)
        x = self.conv1(F.silu(self.norm1(x, cond)))
        x = self.conv2(F.silu(self.norm2(x, cond)))
        return self.attn(x + r)


class ResBlocks(nn.Module):
    """A chain of ResBlocks; with `skips`, block j first concatenates skips[j] after its input."""

    def __init__(self, in_list: list, out_list: list, cond_channels: int, attn: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(i, o, cond_channels, attn) for i, o in zip(in_list, out_list))

    def forward(self, x, cond, skips=None):
        outputs = []
        for j, block in enumerate(self.resblocks):
            x = block(x if skips is None else torch.cat((x, skips[j]), dim=1), cond)
            outputs.append(x)
        return x, outputs


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        nn.init.orthogonal_(self.conv.weight)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The official U-Net: level i has depths[i] down blocks (c_{i-1} -> c_i) and depths[i] + 1 up blocks
    whose skips are the level's outputs in reverse, ending with the level's (down-sampled) input; two
    attention blocks in the middle. u_blocks, upsamples are stored deepest level first."""

    def __init__(self, cond_channels: int, depths, channels, attn_depths):
        super().__init__()
        assert len(depths) == len(channels) == len(attn_depths)
        self.num_down = len(channels) - 1
        d_blocks, u_blocks = [], []
        for i, n in enumerate(depths):
            c1, c2, attn = channels[max(0, i - 1)], channels[i], bool(attn_depths[i])
            d_blocks.append(ResBlocks([c1] + [c2] * (n - 1), [c2] * n, cond_channels, attn))
            u_blocks.append(ResBlocks([2 * c2] * n + [c1 + c2], [c2] * n + [c1], cond_channels, attn))
        self.d_blocks = nn.ModuleList(d_blocks)
        self.u_blocks = nn.ModuleList(reversed(u_blocks))
        self.mid_blocks = ResBlocks([channels[-1]] * 2, [channels[-1]] * 2, cond_channels, True)
        self.downsamples = nn.ModuleList([nn.Identity()] + [Downsample(c) for c in channels[:-1]])
        self.upsamples = nn.ModuleList([nn.Identity()] + [Upsample(c) for c in reversed(channels[:-1])])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2 ** self.num_down  # zero-pad right/bottom to a multiple of 2^(levels-1) (no-op at 64x64)
        x = F.pad(x, (0, -w % m, 0, -h % m))
        kept = []
        for block, down in zip(self.d_blocks, self.downsamples):
            x_down = down(x)
            x, outs = block(x_down, cond)
            kept.append((x_down, *outs))
        x, _ = self.mid_blocks(x, cond)
        for block, up, skips in zip(self.u_blocks, self.upsamples, reversed(kept)):
            x, _ = block(up(x), cond, skips[::-1])
        return x[..., :h, :w]


class FourierFeatures(nn.Module):
    """[cos(2 pi c w), sin(2 pi c w)] with fixed w ~ N(0, 1): a buffer, saved in the state dict."""

    def __init__(self, cond_channels: int):
        super().__init__()
        assert cond_channels % 2 == 0
        self.register_buffer("weight", torch.randn(1, cond_channels // 2))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * c.unsqueeze(1) @ self.weight
        return torch.cat([f.cos(), f.sin()], dim=-1)


class DiffusionUNet(nn.Module):
    """The denoiser network F (official `InnerModel`): noisy next frame + K past frames (channel concat)
    -> U-Net conditioned on cond = MLP(Fourier(c_noise) + [embeddings of the K past actions])."""

    def __init__(self, num_actions: int, channels=(64, 64, 64, 64), depths=(2, 2, 2, 2),
                 attn_depths=(0, 0, 0, 0), cond_channels: int = 256, num_steps_conditioning: int = 4,
                 img_channels: int = 3):
        super().__init__()
        assert cond_channels % num_steps_conditioning == 0
        self.noise_emb = FourierFeatures(cond_channels)
        self.act_emb = nn.Sequential(nn.Embedding(num_actions, cond_channels // num_steps_conditioning),
                                     nn.Flatten())
        self.cond_proj = nn.Sequential(nn.Linear(cond_channels, cond_channels), nn.SiLU(),
                                       nn.Linear(cond_channels, cond_channels))
        self.conv_in = nn.Conv2d((num_steps_conditioning + 1) * img_channels, channels[0], 3, padding=1)
        self.unet = UNet(cond_channels, list(depths), list(channels), list(attn_depths))
        self.norm_out = _NormWrap(channels[0])
        self.conv_out = nn.Conv2d(channels[0], img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the bias keeps PyTorch's default init (official)

    def forward(self, x_noisy: torch.Tensor, c_noise: torch.Tensor, obs: torch.Tensor, act: torch.Tensor):
        """x_noisy (B, C, H, W) already scaled by c_in; c_noise (B,); obs (B, K*C, H, W) past frames, oldest
        first, already divided by sigma_data; act (B, K) long. Returns F (B, C, H, W)."""
        cond = self.cond_proj(self.noise_emb(c_noise) + self.act_emb(act))  # (B, cond)
        x = self.unet(self.conv_in(torch.cat((obs, x_noisy), dim=1)), cond)
        return self.conv_out(F.silu(self.norm_out(x)))


def quantize_frame(x: torch.Tensor) -> torch.Tensor:
    """Official quantisation of a denoised frame onto the 256 levels of a uint8 image: clamp, scale to
    [0, 255], TRUNCATE (a uint8 cast, not rounding), map back to [-1, 1]."""
    return x.clamp(-1, 1).add(1).div(2).mul(255).byte().div(255).mul(2).sub(1)


class EDMPreconditioner(nn.Module):
    """EDM preconditioning of the next-frame denoiser (official `Denoiser`; Karras et al. 2022, Table 1)
    with DIAMOND's offset noise: the conditioners use s = sqrt(sigma^2 + sigma_offset^2).
    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, obs / sigma_data, act), quantised to uint8 levels.
    Training noise levels: ln(sigma) ~ N(sigma_loc, sigma_scale^2), clipped to [sigma_min, sigma_max]."""

    def __init__(self, inner_model: DiffusionUNet, sigma_data: float = SIGMA_DATA,
                 sigma_offset_noise: float = SIGMA_OFFSET_NOISE, sigma_loc: float = -0.4,
                 sigma_scale: float = 1.2, sigma_min: float = 2e-3, sigma_max: float = 20.0):
        super().__init__()
        self.inner_model = inner_model
        self.sigma_data, self.sigma_offset_noise = sigma_data, sigma_offset_noise
        self.sigma_loc, self.sigma_scale = sigma_loc, sigma_scale
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def conditioners(self, sigma: torch.Tensor):
        """sigma (B,) -> c_in, c_out, c_skip, c_noise (B,): with s^2 = sigma^2 + sigma_offset^2,
        c_in = 1 / sqrt(s^2 + sd^2), c_skip = sd^2 / (s^2 + sd^2), c_out = s sd c_in, c_noise = ln(s) / 4."""
        return common.edm_precond(sigma, self.sigma_data, self.sigma_offset_noise)

    def forward(self, x_noisy, sigma, prev_obs, prev_act):
        """Raw network output F and the conditioners. x_noisy (B, C, H, W); sigma (B,);
        prev_obs (B, K, C, H, W) or (B, K*C, H, W) in [-1, 1]; prev_act (B, K)."""
        c_in, c_out, c_skip, c_noise = cs = self.conditioners(sigma)
        prev_obs = prev_obs.flatten(1, 2) if prev_obs.ndim == 5 else prev_obs
        x_in = x_noisy * c_in[:, None, None, None]
        return self.inner_model(x_in, c_noise, prev_obs / self.sigma_data, prev_act), cs

    @torch.no_grad()
    def denoise(self, x_noisy, sigma, prev_obs, prev_act) -> torch.Tensor:
        """The quantised estimate D of the clean next frame (B, C, H, W)."""
        out, (_, c_out, c_skip, _) = self(x_noisy, sigma, prev_obs, prev_act)
        return quantize_frame(c_skip[:, None, None, None] * x_noisy + c_out[:, None, None, None] * out)

    def sample_sigma(self, n: int, device=None, generator=None) -> torch.Tensor:
        return common.sample_lognormal_sigma(n, self.sigma_loc, self.sigma_scale, self.sigma_min,
                                             self.sigma_max, generator=generator, device=device)

    def loss(self, obs: torch.Tensor, act: torch.Tensor, mask: torch.Tensor, generator=None):
        """Official training loss on segments of K + n frames: for i < n, predict frame K+i from the K before
        it (conditioning on the model's own quantised previous prediction). The target of F is
        (x0 - c_skip x_noisy) / c_out, a plain MSE over unpadded targets, averaged over the n steps.
        obs (B, T, C, H, W) in [-1, 1]; act (B, T) long; mask (B, T) bool (False = padding).
        Random draws per step, in order: sigma (B,), offset (B, C, 1, 1), noise (B, C, H, W)."""
        K = self.inner_model.conv_in.in_channels // obs.size(2) - 1
        n = obs.size(1) - K
        assert n >= 1, f"segments need more than {K} frames, got {obs.size(1)}"
        all_obs, loss = obs.clone(), 0.0
        for i in range(n):
            x0, m = all_obs[:, K + i], mask[:, K + i]
            b, c = x0.shape[:2]
            sigma = self.sample_sigma(b, x0.device, generator)
            offset = self.sigma_offset_noise * torch.randn(b, c, 1, 1, device=x0.device, generator=generator)
            noise = torch.randn(x0.shape, device=x0.device, generator=generator)
            x_noisy = x0 + offset + noise * sigma[:, None, None, None]
            out, (_, c_out, c_skip, _) = self(x_noisy, sigma, all_obs[:, i:K + i], act[:, i:K + i])
            c_out, c_skip = c_out[:, None, None, None], c_skip[:, None, None, None]
            loss = loss + F.mse_loss(out[m], ((x0 - c_skip * x_noisy) / c_out)[m])
            with torch.no_grad():  # the next step conditions on this prediction (no gradient through it)
                all_obs[:, K + i] = quantize_frame(c_skip * x_noisy + c_out * out)
        loss = loss / n
        return loss, {"loss_denoising": loss.item()}



class DiffusionSampler:
    """The official next-frame sampler: Euler (order 1) or Heun (order 2; common.sample_euler / sample_heun)
    on the Karras noise levels, from UNIT Gaussian noise (not scaled by sigma_max, as officially). Every
    denoiser call quantises D; the last step to sigma = 0 is Euler, so NFE = N (Euler) or 2N - 1 (Heun).
    s_churn > 0 adds the "churn" of Karras et al. Algorithm 2 (official default 0), where common's samplers
    give D the raised level sigma_hat as Karras et al. do (the official code passes sigma_i)."""

    def __init__(self, denoiser: EDMPreconditioner, num_steps_denoising: int = 3, sigma_min: float = 2e-3,
                 sigma_max: float = 5.0, rho: float = 7.0, order: int = 1, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (Euler) or 2 (Heun), got {order}")
        self.denoiser, self.order = denoiser, order
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise
        # float32, as the official build_sigmas: N=3 gives [4.9999986, 0.28308171, 0.0019999975, 0]
        self.sigmas = common.karras_sigmas(num_steps_denoising, sigma_min, sigma_max, rho, torch.float32)

    @torch.no_grad()
    def sample(self, prev_obs: torch.Tensor, prev_act: torch.Tensor, generator=None):
        """prev_obs (B, K, C, H, W) in [-1, 1], prev_act (B, K) -> (next frame (B, C, H, W), trajectory)."""
        b, _, c, h, w = prev_obs.shape
        prev_obs = prev_obs.reshape(b, -1, h, w)
        x = torch.randn(b, c, h, w, device=prev_obs.device, generator=generator)  # unit variance (official)
        trajectory = [x]
        step = common.sample_euler if self.order == 1 else common.sample_heun
        x = step(lambda x_, sigma: self.denoiser.denoise(x_, sigma, prev_obs, prev_act), x,
                 self.sigmas.to(prev_obs.device), churn=self.s_churn, s_tmin=self.s_tmin, s_tmax=self.s_tmax,
                 s_noise=self.s_noise, generator=generator, callback=lambda i, x_: trajectory.append(x_))
        return x, trajectory


class RewEndEncoder(nn.Module):
    """Conv encoder of (frame, next frame) with action-conditioned AdaGN: len(depths) levels (down-sampled
    between levels), then two attention res-blocks at the lowest resolution."""

    def __init__(self, in_channels: int, cond_channels: int, depths, channels, attn_depths):
        super().__init__()
        assert len(depths) == len(channels) == len(attn_depths)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks = []
        for i, n in enumerate(depths):
            c1, c2 = channels[max(0, i - 1)], channels[i]
            blocks.append(ResBlocks([c1] + [c2] * (n - 1), [c2] * n, cond_channels, bool(attn_depths[i])))
        blocks.append(ResBlocks([channels[-1]] * 2, [channels[-1]] * 2, cond_channels, True))
        self.blocks = nn.ModuleList(blocks)
        # no down-sampling before the first level nor before the attention blocks
        self.downsamples = nn.ModuleList([nn.Identity(), *map(Downsample, channels[:-1]), nn.Identity()])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block, down in zip(self.blocks, self.downsamples):
            x, _ = block(down(x), cond)
        return x


class RewardTerminationModel(nn.Module):
    """Reward and termination predictor (official `RewEndModel`): per transition (o_t, a_t, o_{t+1}) a conv
    encoder conditioned on a_t, an LSTM over time, two classification heads: reward sign {-1, 0, +1}
    (logits[:3]) and end {0, 1} (logits[3:])."""

    def __init__(self, num_actions: int, channels=(32, 32, 32, 32), depths=(2, 2, 2, 2),
                 attn_depths=(0, 0, 0, 0), cond_channels: int = 128, lstm_dim: int = 512, img_size: int = 64,
                 img_channels: int = 3):
        super().__init__()
        self.encoder = RewEndEncoder(2 * img_channels, cond_channels, list(depths), list(channels),
                                     list(attn_depths))
        self.act_emb = nn.Embedding(num_actions, cond_channels)
        feat_dim = channels[-1] * (img_size // 2 ** (len(depths) - 1)) ** 2  # (c, 8, 8) flattened at 64x64
        self.lstm_dim = lstm_dim
        self.lstm = nn.LSTM(feat_dim, lstm_dim, batch_first=True)
        self.head = nn.Sequential(nn.Linear(lstm_dim, lstm_dim), nn.SiLU(),
                                  nn.Linear(lstm_dim, 3 + 2, bias=False))
        init_lstm_weights(self.lstm)

    def predict_rew_end(self, obs, act, next_obs, hx_cx=None):
        """obs, next_obs (B, T, C, H, W) in [-1, 1]; act (B, T); hx_cx None or (h, c) each (1, B, lstm_dim).
        Returns logits_rew (B, T, 3), logits_end (B, T, 2), (h, c)."""
        b, t = obs.shape[:2]
        x = self.encoder(torch.cat((obs, next_obs), dim=2).flatten(0, 1), self.act_emb(act.flatten()))
        x, hx_cx = self.lstm(x.reshape(b, t, -1), hx_cx)  # channel-major flatten per step
        logits = self.head(x)
        return logits[:, :, :-2], logits[:, :, -2:], hx_cx

    def loss(self, obs, act, rew, end, mask, final_obs=None):
        """Official loss on segments (B, T+1): transitions t < T, cross-entropy of the reward sign and of the
        end flag on unpadded steps. A segment with an end uses its episode's true final frame (final_obs
        (B, C, H, W); only rows with an end are read) as the end step's next frame instead of the padding."""
        next_obs = obs[:, 1:].clone()
        obs, act, rew, end, mask = obs[:, :-1], act[:, :-1], rew[:, :-1], end[:, :-1], mask[:, :-1]
        dead = end.bool().any(dim=1)
        if dead.any():
            next_obs[dead, end[dead].argmax(dim=1)] = final_obs[dead].to(next_obs.dtype)
        logits_rew, logits_end, _ = self.predict_rew_end(obs, act, next_obs)
        loss_rew = F.cross_entropy(logits_rew[mask], rew[mask].sign().long().add(1))
        loss_end = F.cross_entropy(logits_end[mask], end[mask].long())
        loss = loss_rew + loss_end
        return loss, {"loss_rew": loss_rew.item(), "loss_end": loss_end.item(), "loss_rew_end": loss.item()}

# =====================================================================================================
# imagination: WorldModelEnv
# =====================================================================================================

class WorldModelEnv:
    """A batch of imagined games (official envs/world_model_env.py) with the real env's interface:
    reset() -> (obs (B, C, H, W), info); step(act (B,)) -> (obs, rew (B,), end (B,), trunc (B,), info).
    Each env starts from a real K-frame context of the replay dataset (left padding only, the agent's
    sample_weights), with the reward/end LSTM burnt in on its K-1 real transitions. step samples the next
    frame with the diffusion sampler, then reward and end (sampled from their logits, reward in {-1, 0, 1})
    with the LSTM state carried; an env ends when `end` is drawn or after `horizon` steps (truncation).
    Finished envs restart from a new real context at once: info["final_observation"] (n_dead, C, H, W) is
    their last imagined frame, info["burnin_obs"] (n_dead, K-1, C, H, W) the new context's first frames (for
    the agent's LSTM), and the returned obs is the new context's last frame."""

    def __init__(self, sampler: DiffusionSampler, rew_end_model: RewardTerminationModel,
                 dataset: ReplayDataset, num_envs: int, horizon: int = 15, num_steps_conditioning: int = 4,
                 sample_weights=None, seed: int = 0, device="cpu"):
        self.sampler, self.rew_end_model, self.dataset = sampler, rew_end_model, dataset
        self.num_envs, self.horizon, self.K = num_envs, horizon, num_steps_conditioning
        self.sample_weights, self.device = sample_weights, torch.device(device)
        self.rng = np.random.default_rng(seed)  # contexts
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # frames, rewards, ends
        self.obs_buffer = self.act_buffer = self.ep_len = self.hx_cx = None

    @torch.no_grad()
    def _contexts(self, n: int, contexts=None):
        """n K-frame contexts (obs, act), by default real ones from the dataset, and the reward/end LSTM state
        (h, c) after their K-1 transitions."""
        if contexts is None:
            seg = self.dataset.sample_segments(n, self.K, sample_weights=self.sample_weights, rng=self.rng)
            contexts = seg["obs"], seg["act"]
        obs, act = contexts[0].to(self.device), contexts[1].to(self.device)
        _, _, hx_cx = self.rew_end_model.predict_rew_end(obs[:, :-1], act[:, :-1], obs[:, 1:])
        return obs, act, hx_cx

    @torch.no_grad()
    def reset(self, contexts=None):
        """contexts: optional (obs (B, K, C, H, W) in [-1, 1], act (B, K)) to start from; by default random
        contexts from the dataset."""
        obs, act, self.hx_cx = self._contexts(self.num_envs, contexts)
        self.obs_buffer, self.act_buffer = obs.clone(), act.clone()
        self.ep_len = torch.zeros(obs.size(0), dtype=torch.long, device=self.device)
        return self.obs_buffer[:, -1], {}

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(F.softmax(logits.float(), dim=-1), 1, generator=self.generator).squeeze(1)

    @torch.no_grad()
    def step(self, act: torch.Tensor):
        self.act_buffer[:, -1] = act.to(self.device)
        next_obs, _ = self.sampler.sample(self.obs_buffer, self.act_buffer, generator=self.generator)
        logits_rew, logits_end, self.hx_cx = self.rew_end_model.predict_rew_end(
            self.obs_buffer[:, -1:], self.act_buffer[:, -1:], next_obs.unsqueeze(1), self.hx_cx)
        rew = self._sample(logits_rew[:, 0]).float() - 1  # classes (-1, 0, +1)
        end = self._sample(logits_end[:, 0])
        self.ep_len += 1
        trunc = (self.ep_len >= self.horizon).long()
        self.obs_buffer, self.act_buffer = self.obs_buffer.roll(-1, dims=1), self.act_buffer.roll(-1, dims=1)
        self.obs_buffer[:, -1] = next_obs
        dead, info = torch.logical_or(end.bool(), trunc.bool()), {}
        if dead.any():
            obs, act_ctx, (h, c) = self._contexts(int(dead.sum()))
            self.obs_buffer[dead], self.act_buffer[dead], self.ep_len[dead] = obs, act_ctx, 0
            self.hx_cx[0][:, dead], self.hx_cx[1][:, dead] = h, c
            info = {"final_observation": next_obs[dead], "burnin_obs": obs[:, :-1]}
        return self.obs_buffer[:, -1], rew, end, trunc, info

# =====================================================================================================
# agent: actor-critic, lambda-returns, loss, env loop
# =====================================================================================================

class SmallResBlock(nn.Module):
    """x + f(x) with f = GroupNorm -> SiLU -> Conv3x3 (official blocks.SmallResBlock; a 1x1 projection on
    the skip path when the width changes). f.0 holds the GroupNorm as `.norm`: the key f.0.norm.weight."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.f = nn.Sequential(_NormWrap(in_channels), nn.SiLU(), conv)
        self.skip_projection = (nn.Identity() if in_channels == out_channels else
                                nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_projection(x) + self.f(x)


class ActorCriticNetwork(nn.Module):
    """The DIAMOND policy and value (official `ActorCritic`): one frame -> conv encoder (Conv3x3, then per
    level a SmallResBlock and a 2x2 max-pool: 64x64 becomes (c3, 4, 4), flattened channel-major) -> LSTMCell
    -> (action logits, value). Memory lives only in the LSTM state."""

    def __init__(self, num_actions: int, channels=(32, 32, 64, 64), lstm_dim: int = 512,
                 img_size: int = 64, img_channels: int = 3):
        super().__init__()
        assert img_size % 2 ** len(channels) == 0, f"img_size {img_size} not divisible by 2^{len(channels)}"
        layers = [nn.Conv2d(img_channels, channels[0], 3, padding=1)]
        for i, c in enumerate(channels):  # keys encoder.encoder.{1,3,5,7}; the pools (2,4,6,8) have none
            layers += [SmallResBlock(channels[max(0, i - 1)], c), nn.MaxPool2d(2)]
        self.encoder = nn.Module()
        self.encoder.encoder = nn.Sequential(*layers)
        self.lstm_dim = lstm_dim
        self.lstm = nn.LSTMCell(channels[-1] * (img_size // 2 ** len(channels)) ** 2, lstm_dim)
        self.critic_linear = nn.Linear(lstm_dim, 1)
        self.actor_linear = nn.Linear(lstm_dim, num_actions)
        self.initialize_weights()

    def initialize_weights(self):
        for head in (self.actor_linear, self.critic_linear):  # official: a uniform policy and zero value
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        init_lstm_weights(self.lstm)

    def forward(self, obs: torch.Tensor, hx_cx=None):
        """obs (B, 3, H, W) in [-1, 1]; hx_cx None (zero state) or (hx, cx), each (B, lstm_dim).
        Returns logits (B, A), value (B,), (hx, cx): official `predict_act_value`."""
        assert obs.ndim == 4, f"expected one frame per env (B, C, H, W), got {tuple(obs.shape)}"
        hx, cx = self.lstm(self.encoder.encoder(obs).flatten(start_dim=1), hx_cx)
        return self.actor_linear(hx), self.critic_linear(hx).squeeze(1), (hx, cx)


def init_lstm_weights(lstm: nn.Module):
    """Official init_lstm: W_ih xavier-uniform, W_hh orthogonal, biases 0 but the forget-gate part of
    b_ih (rows [H, 2H)) at 1 so the cell remembers at the start of training."""
    sfx = "_l0" if isinstance(lstm, nn.LSTM) else ""  # nn.LSTM keys end in _l0, nn.LSTMCell keys do not
    w_ih, w_hh, b_ih, b_hh = (getattr(lstm, n + sfx) for n in ("weight_ih", "weight_hh", "bias_ih",
                                                                  "bias_hh"))
    nn.init.xavier_uniform_(w_ih)
    nn.init.orthogonal_(w_hh)
    nn.init.zeros_(b_ih)
    nn.init.zeros_(b_hh)
    with torch.no_grad():
        b_ih[lstm.hidden_size:2 * lstm.hidden_size] = 1.0


def compute_lambda_returns(rew, end, trunc, val_bootstrap, gamma: float, lambda_: float) -> torch.Tensor:
    """TD(lambda) returns of an imagined rollout, all (B, T); rew is sign-clipped here.
    G_t = r_t + gamma (1-d_t) [(1-tau_t)(1-lambda) + tau_t] vb_t + (1-e_t) gamma lambda G_{t+1}, e = d or tau,
    vb_t = V(o_{t+1}) (for a finished env the value of its final frame): an end (d) cuts the value, a
    truncation (tau) bootstraps fully on vb_t. The sum starts from G_T := vb_{T-1}."""
    rew, end, trunc = rew.sign(), end.float(), trunc.float()
    not_end_or_trunc = 1 - (end + trunc).clamp(max=1)
    returns = rew + gamma * (1 - end) * ((1 - trunc) * (1 - lambda_) + trunc) * val_bootstrap
    out = [val_bootstrap[:, -1]]  # G_T, then G_{T-1} .. G_0
    for t in reversed(range(rew.size(1))):
        out.append(returns[:, t] + not_end_or_trunc[:, t] * gamma * lambda_ * out[-1])
    return torch.stack(out[:0:-1], dim=1)


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
    return loss_actions + loss_values + loss_entropy, dict(
        loss_actions=loss_actions.item(), loss_values=loss_values.item(), loss_entropy=loss_entropy.item(),
        policy_entropy_bits=entropy.item() / math.log(2), lambda_return_mean=returns.mean().item())


class AgentEnvLoop:
    """The actor-critic acting in a batched env (official coroutines/env_loop.py): imagined training, real
    collection (through a Recorder) and evaluation. The LSTM state persists between `rollout` calls and is
    detached at the start of each, so gradients flow back through one rollout (truncated BPTT). Actions are
    sampled from the logits; with prob. epsilon (one draw per step for all envs, as officially) they are
    uniform instead. The env (WorldModelEnv, VecEnv) gives reset() -> (obs (B, 3, H, W), info) and
    step(act (B,)) -> (next_obs, rew, end, trunc, info) (B,); for finished envs info has "final_observation"
    (n_dead, 3, H, W) and next_obs is already the next episode's first frame; an imagined env also gives
    "burnin_obs" (n_dead, K-1, 3, H, W), the new real context, read into the LSTM."""

    def __init__(self, env, actor_critic: ActorCriticNetwork, epsilon: float = 0.0, generator=None):
        self.env, self.ac, self.epsilon = env, actor_critic, epsilon
        self.generator = generator  # torch.Generator (CPU) for action sampling and epsilon draws
        self.obs = self.hx = self.cx = None

    def rollout(self, num_steps: int, grad: bool = True) -> dict:
        """Step every env num_steps times; returns (B, T) tensors act, rew, end, trunc, val_bootstrap
        (no grad) and logits (B, T, A) and val (B, T) (with grad when `grad`), plus obs (B, T, 3, H, W)."""
        if self.obs is None:
            self.obs, _ = self.env.reset()
            self.hx = torch.zeros(self.obs.size(0), self.ac.lstm_dim, device=self.obs.device)
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

# =====================================================================================================
# training loop
# =====================================================================================================

MODEL_NAMES = ("denoiser", "rew_end_model", "actor_critic")
DENOISER_SEGMENT_EXTRA = 2  # official: num_autoregressive_steps 1 -> segments of K + 2 frames, 2 predictions
PROGRESS_SECONDS = 30.0  # at most one progress line per phase this often: long phases are never silent
STREAMS = ("collect", *MODEL_NAMES, "eval")  # the run's random streams, one per phase

# (random, human) scores of the 26 Atari-100k games: the standard table (DQN / Atari-100k papers), with
# which the paper's mean HNS 1.46 is reproduced. HNS = (score - random) / (human - random).
ATARI_100K_SCORES = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0), "Asterix": (210.0, 8503.3),
    "BankHeist": (14.2, 753.1), "BattleZone": (2360.0, 37187.5), "Boxing": (0.1, 12.1),
    "Breakout": (1.7, 30.5), "ChopperCommand": (811.0, 7387.8), "CrazyClimber": (10780.5, 35829.4),
    "DemonAttack": (152.1, 1971.0),
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
    for mod in model.modules():
        for p_name, p in mod.named_parameters(recurse=False):
            is_weight = p_name.startswith("weight")  # LSTM: weight_ih(_l0), weight_hh(_l0)
            (decay if is_weight and isinstance(mod, decay_types) else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             **common.fused_adam(next(model.parameters()).device))


def make_warmup(opt: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 (official: the factor is step / warmup, so the first update uses lr 0)."""
    factor = lambda s: min(1.0, s / warmup_steps) if warmup_steps > 0 else 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class NonFiniteLossError(RuntimeError):
    """A NaN / inf loss: training stops, the last good checkpoint is left untouched."""


def optimizer_step(name: str, loss: torch.Tensor, model: nn.Module, opt, sched, max_grad_norm: float,
                   step: int) -> float:
    """backward -> clip -> step -> warm-up: one update of one of the three models. Returns the grad norm.
    A non-finite loss or gradient raises before the weights change."""
    stopped = "training stopped, the last checkpoint is the last good state"
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite {name} loss ({loss.item()}) at {name} step {step}; {stopped}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if not torch.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite {name} gradient norm at {name} step {step}; {stopped}")
    opt.step()
    sched.step()
    return grad_norm.item()


@torch.no_grad()
def evaluate_policy(actor_critic: ActorCriticNetwork, env, max_steps: int, epsilon: float = 0.0,
                    generator=None, frames: Optional[list] = None, progress=None) -> dict:
    """Play one episode in each of env's B envs (a test env: no life-loss ends) with actions sampled from the
    policy (epsilon 1 = the uniform random policy); an episode still running after max_steps counts with its
    score so far. Returns raw scores; `frames` collects env 0's frames; progress(steps) after every step."""
    loop = AgentEnvLoop(env, actor_critic, epsilon=epsilon, generator=generator)
    returns, done, steps = torch.zeros(env.num_envs), torch.zeros(env.num_envs, dtype=torch.bool), 0
    action_counts = torch.zeros(env.num_actions, dtype=torch.long)
    while steps < max_steps and not done.all():
        r = loop.rollout(1, grad=False)
        if frames is not None and not done[0]:
            frames.append(common.to_uint8(r["obs"][0, 0:1])[0].permute(1, 2, 0).numpy())
        returns += r["rew"][:, 0].float().cpu() * (~done)
        action_counts += torch.bincount(r["act"][:, 0].cpu()[~done], minlength=env.num_actions)
        done |= (r["end"][:, 0] + r["trunc"][:, 0]).bool().cpu()
        steps += 1
        if progress:
            progress(steps)
    return dict(returns=returns.tolist(), return_mean=returns.mean().item(), return_max=returns.max().item(),
                finished=int(done.sum()), steps=steps,
                action_freq=(action_counts / action_counts.sum()).tolist())


class Agent(nn.Module):
    """The three networks under the official attribute names: Agent.state_dict() has the key layout of an
    official agent checkpoint (denoiser.*, rew_end_model.*, actor_critic.*)."""

    def __init__(self, cfg: DiamondConfig, num_actions: int):
        super().__init__()
        self.denoiser, self.rew_end_model = build_world_model(cfg, num_actions)
        self.actor_critic = ActorCriticNetwork(num_actions, cfg.actor_critic_channels,
                                               cfg.actor_critic_lstm_dim, cfg.obs_size)


def build_world_model(cfg: DiamondConfig, num_actions: int) -> tuple:
    """(EDMPreconditioner, RewardTerminationModel) at cfg's sizes (the official ones at preset `large`)."""
    levels = max(len(cfg.diffusion_channels), len(cfg.rew_end_channels))
    if cfg.obs_size % 2 ** (levels - 1):
        raise ValueError(f"--obs-size {cfg.obs_size} must be divisible by 2^(levels-1) = {2 ** (levels - 1)} "
                         f"(levels of the U-Net and of the reward/end encoder)")
    inner = DiffusionUNet(num_actions, cfg.diffusion_channels, cfg.diffusion_depths,
                          cfg.diffusion_attn_depths, cfg.diffusion_cond_dim, cfg.num_steps_conditioning)
    rew_end = RewardTerminationModel(num_actions, cfg.rew_end_channels, cfg.rew_end_depths,
                                     [0] * len(cfg.rew_end_depths), cfg.rew_end_cond_dim,
                                     cfg.rew_end_lstm_dim, cfg.obs_size)
    return EDMPreconditioner(inner), rew_end


def make_sampler(denoiser: EDMPreconditioner, cfg: DiamondConfig) -> DiffusionSampler:
    order = {"euler": 1, "heun": 2}[cfg.diffusion_sampler]
    return DiffusionSampler(denoiser, cfg.num_sampling_steps, order=order)


def read_agent(path) -> dict:
    """The flat agent state dict (denoiser.*, rew_end_model.*, actor_critic.*) of an official agent checkpoint
    (Hugging Face eloialonso/diamond, atari_100k/models/<Game>.pt) or of a run of ours (folder or ckpt.pt)."""
    sd = common.torch_load(common.checkpoint_file(path), want="an official agent (eloialonso/diamond "
                           "atari_100k/models/<Game>.pt) or a diamond.py run")
    return sd["model"] if isinstance(sd, dict) and sd.get("kind") == "diamond" else sd


def check_actions(sd: dict, game: str, num_actions: int, trained_on: str = "") -> None:
    """A checkpoint of a game with another action set ends as one line, before loading."""
    n = sd.get("denoiser.inner_model.act_emb.0.weight", torch.zeros(num_actions)).shape[0]
    if n != num_actions and trained_on:
        raise ValueError(f"this run was trained on {trained_on} ({n} actions) and {game} has {num_actions}: "
                         f"drop --game, or use a checkpoint trained on {game}")
    if n != num_actions:
        raise ValueError(f"this agent has {n} actions and {game} has {num_actions}: use a checkpoint of "
                         f"{game}")


def split_agent_state_dict(sd: dict) -> dict:
    """{'denoiser': ..., 'rew_end_model': ..., 'actor_critic': ...} from a flat agent state dict (official
    Agent.load: keys are grouped by their first name, which is stripped)."""
    return {n: {k[len(n) + 1:]: v for k, v in sd.items() if k.startswith(n + ".")} for n in MODEL_NAMES}


def load_agent(agent: Agent, sd: dict, where) -> None:
    """Each of denoiser. / rew_end_model. / actor_critic. strictly, as the official Agent.load."""
    for name, part in split_agent_state_dict(sd).items():
        if not part:
            raise ValueError(f"{where}: no '{name}.' keys; an official agent checkpoint has denoiser., "
                             "rew_end_model. and actor_critic. entries")
        try:
            getattr(agent, name).load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{where}: the {name} weights do not fit this configuration (official agents "
                             f"need --preset large and the game they were trained on): {common.one_line(e)}"
                             ) from None


class Trainer:
    """The DIAMOND loop (official trainer.py): an initial collection with the untrained (uniform) policy, then
    per epoch: collect real steps with the current policy -> train the denoiser -> the reward/end model -> the
    actor-critic in imagination -> evaluate on the real game (every eval_every) -> checkpoint. run_dir holds
    ckpt.pt (networks, optimisers, warm-up schedulers, epoch and update counters), dataset/ (every real step),
    metrics.jsonl and curves.png. Every random draw comes from a stream seeded by (seed, phase, epoch, update)
    (`streams`), so the checkpoint keeps counters, not generator states. resume=True continues after the last
    checkpoint with every step collected so far (the running Atari game is not restored, as officially)."""

    def __init__(self, cfg: DiamondConfig, run_dir, resume: bool = False, world_model_only: bool = False,
                 log=print, progress_every: float = PROGRESS_SECONDS):
        check_config(cfg)
        self.cfg, self.run_dir, self.log, self.world_model_only = cfg, Path(run_dir), log, world_model_only
        self.progress_every, self.device = progress_every, common.pick_device(cfg.device)
        common.seed_everything(cfg.seed)  # the networks' initialisation
        self.train_env = VecEnv(cfg.game, 1, cfg.obs_size, done_on_life_loss=True,
                                sticky_actions=cfg.sticky_actions, device=self.device)
        self.num_actions = self.train_env.num_actions
        self.agent = Agent(cfg, self.num_actions).to(self.device)
        wd = dict(denoiser=cfg.weight_decay, rew_end_model=cfg.weight_decay,
                  actor_critic=cfg.actor_critic_weight_decay)
        lr = dict(denoiser=cfg.learning_rate, rew_end_model=cfg.learning_rate,
                  actor_critic=cfg.actor_critic_learning_rate)
        self.opt = {n: make_optimizer(getattr(self.agent, n), lr[n], wd[n]) for n in MODEL_NAMES}
        self.sched = {n: make_warmup(self.opt[n], cfg.warmup_steps) for n in MODEL_NAMES}
        self.max_grad_norm = dict(denoiser=cfg.max_grad_norm_denoiser,
                                  rew_end_model=cfg.max_grad_norm_rew_end,
                                  actor_critic=cfg.max_grad_norm_actor_critic)
        self.steps = {n: 0 for n in MODEL_NAMES}  # optimiser updates of each model
        self.epoch, self.random_return = 0, None  # the random policy's mean return on the evaluation episodes
        self.heldout = None  # real transitions of the world-model diagnostics, made at the first evaluation
        self.ckpt_path, self.dataset_dir = self.run_dir / "ckpt.pt", self.run_dir / "dataset"
        self.dataset = ReplayDataset((3, cfg.obs_size, cfg.obs_size))
        if resume:
            self.load()
        self.metrics = common.MetricsLog(self.run_dir)
        self.recorder = Recorder(self.train_env, self.dataset)
        self.collection = AgentEnvLoop(self.recorder, self.agent.actor_critic, cfg.collect_epsilon)
        self.wm_env = WorldModelEnv(make_sampler(self.agent.denoiser, cfg), self.agent.rew_end_model,
                                    self.dataset, cfg.imagination_batch_size, cfg.imagination_horizon,
                                    cfg.num_steps_conditioning, cfg.sample_weights, device=self.device)
        self.imagination = AgentEnvLoop(self.wm_env, self.agent.actor_critic)

    def streams(self, phase: str, update: int = 0) -> tuple:
        """(numpy, torch on the device, torch on the CPU) generators of one phase of one epoch or update."""
        seq = np.random.SeedSequence([self.cfg.seed, STREAMS.index(phase), self.epoch, update])
        a, b, c = (int(s.generate_state(1, np.uint64)[0] >> np.uint64(1)) for s in seq.spawn(3))
        return (np.random.default_rng(a), torch.Generator(self.device).manual_seed(b),
                torch.Generator().manual_seed(c))

    def progress(self, phase: str, total: int, unit: str):
        """A callback done -> None that logs "epoch e/n | phase done/total unit | rate | ETA" at most every
        progress_every seconds, so a short phase prints nothing."""
        t0 = last = time.time()

        def tick(done: int):
            nonlocal last
            now = time.time()
            if now - last >= self.progress_every and done > 0:
                last, rate = now, done / max(now - t0, 1e-9)
                eta = time.strftime("%H:%M:%S", time.gmtime((total - done) / rate))
                self.log(f"epoch {self.epoch}/{self.cfg.num_epochs} | {phase} {done}/{total} {unit} | "
                         f"{rate:.1f} {unit}/s | ETA {eta}")
        return tick

    # ---- checkpoint: the data first (new episodes, then its index), then ckpt.pt, so that after a kill at
    # any point the checkpoint never refers to data that is not on disk
    def save(self) -> None:
        self.dataset.save(self.dataset_dir)
        common.save_checkpoint(self.ckpt_path, dict(
            kind="diamond", config=asdict(self.cfg), num_actions=self.num_actions,
            model=self.agent.state_dict(), ema=None, opt={n: o.state_dict() for n, o in self.opt.items()},
            sched={n: s.state_dict() for n, s in self.sched.items()}, step=sum(self.steps.values()),
            steps=dict(self.steps), epoch=self.epoch, env_steps=len(self.dataset),
            random_return=self.random_return))

    def load(self) -> None:
        s = common.load_checkpoint(self.ckpt_path, "diamond")
        check_actions(s["model"], self.cfg.game, self.num_actions, s["config"]["game"])
        self.agent.load_state_dict(s["model"])
        for n in MODEL_NAMES:
            self.opt[n].load_state_dict(s["opt"][n])
            self.sched[n].load_state_dict(s["sched"][n])
        self.steps, self.epoch, self.random_return = dict(s["steps"]), s["epoch"], s.get("random_return")
        # every step saved so far, also those collected after the checkpoint (a kill mid-epoch)
        self.dataset = ReplayDataset.load(self.dataset_dir)

    # ---- the three kinds of updates ---------------------------------------------------------------------
    def world_model_loss(self, name: str):
        """Denoiser: segments of K + 2 frames, left padding; reward/end: horizon + K, padded on both sides
        (official)."""
        cfg, K = self.cfg, self.cfg.num_steps_conditioning
        rng, generator, _ = self.streams(name, self.steps[name])
        seq_len = K + DENOISER_SEGMENT_EXTRA if name == "denoiser" else cfg.imagination_horizon + K
        b = self.dataset.sample_segments(cfg.batch_size, seq_len, pad_right=name != "denoiser",
                                         sample_weights=cfg.sample_weights, rng=rng)
        b = {k: v.to(self.device) for k, v in b.items()}
        if name == "denoiser":
            return self.agent.denoiser.loss(b["obs"], b["act"], b["mask_padding"], generator)
        return self.agent.rew_end_model.loss(b["obs"], b["act"], b["rew"], b["end"], b["mask_padding"],
                                             b["final_obs"])

    def actor_critic_loss(self):
        """imagination_horizon imagined steps in every env (they go on from the previous update), then the
        loss on them."""
        cfg = self.cfg
        self.wm_env.rng, self.wm_env.generator, self.imagination.generator = self.streams(
            "actor_critic", self.steps["actor_critic"])
        r = self.imagination.rollout(cfg.imagination_horizon)
        return actor_critic_loss(r["logits"], r["val"], r["act"], r["rew"], r["end"], r["trunc"],
                                 r["val_bootstrap"], cfg.discount_factor, cfg.lambda_returns,
                                 cfg.value_weight, cfg.entropy_weight)

    def train_model(self, name: str, num_steps: int) -> dict:
        """num_steps updates of one of the three models -> its mean metrics."""
        model, tick, sums = getattr(self.agent, name), self.progress(name, num_steps, "updates"), {}
        self.agent.eval()
        model.train()
        for i in range(num_steps):
            loss, m = self.actor_critic_loss() if name == "actor_critic" else self.world_model_loss(name)
            self.steps[name] += 1
            grad_norm = optimizer_step(name, loss, model, self.opt[name], self.sched[name],
                                       self.max_grad_norm[name], self.steps[name])
            for k, v in dict(m, loss=loss.item(), grad_norm=grad_norm).items():
                sums[k] = sums.get(k, 0.0) + v
            tick(i + 1)
        return {k: v / max(num_steps, 1) for k, v in sums.items()}

    # ---- real environment -------------------------------------------------------------------------------
    def collect(self, num_steps: int) -> list:
        """Real steps with the current policy (epsilon-greedy), recorded into the dataset (saved at once).
        Returns the scores of the games that ended."""
        self.agent.actor_critic.eval()
        self.train_env.rng, _, self.collection.generator = self.streams("collect")  # rng: seeds of new games
        tick, n0 = self.progress("collect", num_steps, "steps"), len(self.recorder.scores)
        for i in range(num_steps):
            self.collection.rollout(1, grad=False)
            tick(i + 1)
        self.dataset.save(self.dataset_dir)
        return self.recorder.scores[n0:]

    def collect_initial(self) -> list:
        """Official: initial_collection_steps with the untrained agent (uniform policy: zero actor head), then
        100 more at a time until the two rarer reward signs total >= 10, up to initial_collection_max. Goes on
        from what the dataset holds (a run killed during it)."""
        cfg, scores = self.cfg, []
        if len(self.dataset) < cfg.initial_collection_steps:
            scores = self.collect(cfg.initial_collection_steps - len(self.dataset))
        rew = lambda: np.concatenate([ep.rew[:ep.len] for ep in self.dataset.episodes] + [np.zeros(0)])
        rare = lambda: np.sort(np.bincount(np.sign(rew()).astype(int) + 1, minlength=3))[:2].sum()
        while len(self.dataset) < cfg.initial_collection_max and rare() < 10:
            scores += self.collect(min(100, cfg.initial_collection_max - len(self.dataset)))
        return scores

    def evaluate(self, episodes: int, epsilon: float = 0.0) -> dict:
        """Test episodes on the real game (no life-loss ends, actions sampled): raw scores, HNS. The episodes'
        starts are the same at every evaluation (and for the random policy's level)."""
        cfg = self.cfg
        env = VecEnv(cfg.game, episodes, cfg.obs_size, sticky_actions=cfg.sticky_actions, seed=cfg.seed,
                     device=self.device)
        self.agent.actor_critic.eval()
        tick = self.progress("eval" if epsilon == 0 else "random policy", cfg.eval_max_steps, "steps")
        r = evaluate_policy(self.agent.actor_critic, env, cfg.eval_max_steps, epsilon,
                            self.streams("eval")[2], progress=tick)
        env.close()
        return dict(r, hns=human_normalized_score(cfg.game, r["return_mean"]))

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, result, scores = self.cfg, {}, []
        if self.epoch == 0:
            self.save()  # the config first: a run killed in the initial collection resumes from its data
            scores = self.collect_initial()
        while self.epoch < cfg.num_epochs:
            self.epoch += 1
            t0 = time.time()
            first = self.steps["denoiser"] == 0  # the long first round of training (also resumed)
            if self.epoch > 1 and len(self.dataset) < cfg.env_steps:
                scores = self.collect(min(cfg.env_steps_per_epoch, cfg.env_steps - len(self.dataset)))
            logs = dict(epoch=self.epoch, env_steps=len(self.dataset), collect_seconds=time.time() - t0)
            logs.update({"collect/return_mean": float(np.mean(scores))} if scores else {})
            scores = []
            n = dict(denoiser=(cfg.denoiser_steps_first_epoch, cfg.denoiser_steps_per_epoch),
                     rew_end_model=(cfg.rew_end_steps_first_epoch, cfg.rew_end_steps_per_epoch),
                     actor_critic=(cfg.actor_critic_steps_first_epoch, cfg.actor_critic_steps_per_epoch))
            for name in MODEL_NAMES[:2] if self.world_model_only else MODEL_NAMES:
                t = time.time()
                logs.update({f"{name}/{k}": v for k, v in self.train_model(name, n[name][not first]).items()})
                logs[f"{name}/seconds"], logs[f"{name}/updates"] = time.time() - t, self.steps[name]
            last = self.epoch == cfg.num_epochs
            evaluate = not self.world_model_only and (self.epoch % cfg.eval_every == 0 or last)
            if evaluate:
                t = time.time()
                if self.random_return is None:  # the level to beat, on the same episodes
                    self.random_return = self.evaluate(cfg.eval_episodes, epsilon=1.0)["return_mean"]
                    logs["eval/random_return_mean"] = self.random_return
                result = self.evaluate(cfg.final_eval_episodes if last else cfg.eval_episodes)
                logs.update({f"eval/{k}": v for k, v in result.items() if k != "returns"})
                if self.heldout is None:
                    self.heldout = collect_heldout(cfg.game, cfg.obs_size, cfg.sticky_actions, HELDOUT_STEPS,
                                                   cfg.seed + 1)
                diagnostics = world_model_diagnostics(self.wm_env.sampler, self.agent.rew_end_model,
                                                      self.heldout, cfg.num_steps_conditioning,
                                                      cfg.imagination_horizon)
                logs.update({f"wm/{k}": v for k, v in diagnostics.items()})
                logs["eval/seconds"] = time.time() - t
            logs["epoch_seconds"] = time.time() - t0
            self.save()  # after a non-finite loss we never get here: the last good checkpoint stays
            self.metrics.log(step=self.epoch, **logs)
            if evaluate:
                self.save_curves()
            self.log(self.summary(logs))
            if evaluate:
                self.log(diagnostics_text(diagnostics))
        return result

    def save_curves(self) -> None:
        """curves.png from metrics.jsonl (so a resumed run draws its whole history): the evaluation return
        against real steps with the random policy's level, and each model's loss against its updates."""
        rows = [json.loads(line) for line in open(self.metrics.path)]
        ev = [(r["env_steps"], r["eval/return_mean"]) for r in rows if "eval/return_mean" in r]
        level = {} if self.random_return is None else {"random policy": self.random_return}
        panels = [dict(title=f"evaluation return ({self.cfg.game})", xlabel="real environment steps",
                       series={"agent": ev}, hlines=level)]
        for name, title in zip(MODEL_NAMES, ("denoiser loss", "reward/end loss", "actor-critic loss")):
            points = [(r[f"{name}/updates"], r[f"{name}/loss"]) for r in rows if f"{name}/loss" in r]
            panels.append(dict(title=title, xlabel="updates", series={"mean loss per epoch": points}))
        common.save_curves(self.run_dir / "curves.png", panels)

    def summary(self, logs: dict) -> str:
        s = f"epoch {logs['epoch']}/{self.cfg.num_epochs} | env steps {logs['env_steps']}"
        for name, short in zip(MODEL_NAMES, ("denoiser", "rew/end", "actor-critic")):
            s += f" | {short} loss {logs[f'{name}/loss']:.4f}" if f"{name}/loss" in logs else ""
        if "eval/return_mean" in logs:
            hns = logs.get("eval/hns")
            s += (f" | eval return {logs['eval/return_mean']:.2f} (max {logs['eval/return_max']:.0f}, random "
                  f"policy {self.random_return:.2f}" + (f", HNS {hns:.3f})" if hns is not None else ")"))
        return s + f" | {logs['epoch_seconds']:.0f} s"

# =====================================================================================================
# dreams, GIFs
# =====================================================================================================

GIF_PIXELS = 256   # GIF frames are upscaled (nearest neighbour) to about this size: 32 px is unreadable
LABEL_HEIGHT = 14  # a white strip above the frames for PIL's default font


@torch.no_grad()
def dream_rollout(sampler: DiffusionSampler, env: VecEnv, actor_critic: ActorCriticNetwork, steps: int,
                  num_steps_conditioning: int = 4, seed: int = 0) -> dict:
    """Play the real game (an env with one game) for K + steps steps with actor_critic (a fresh one plays
    uniformly at random), and let the world model imagine the last `steps` frames from the first K real frames
    with the same actions (open loop: after the start it only sees its own frames). Returns real, dream: uint8
    (n, C, H, W) (the `context` first frames are shared) and the per-frame mean absolute error of the imagined
    frames in pixel levels (0..255). Stops at the end of the real game; in a game shorter than K + steps the
    dream starts earlier, after 1 to K real frames, its context zero-padded before the game as training
    segments are."""
    K, device = num_steps_conditioning, next(sampler.denoiser.parameters()).device
    loop = AgentEnvLoop(env, actor_critic, generator=torch.Generator().manual_seed(seed))
    r = loop.rollout(K + steps, grad=False)
    dead = (r["end"][0] + r["trunc"][0]).nonzero()
    n = K + steps if len(dead) == 0 else int(dead[0]) + 1  # frames after an end belong to another game
    real, acts = common.to_uint8(r["obs"][0, :n]), r["act"][0, :n].to(device)  # real (n, C, H, W)
    s = min(K, max(1, n - steps))  # real frames before the first imagined one
    obs_buf = torch.cat([torch.zeros(K - s, *real.shape[1:]), frames_to_float(real[:s])])  # (K, C, H, W)
    obs_buf, acts = obs_buf.unsqueeze(0).to(device), torch.cat([acts.new_zeros(K - s), acts])
    gen, dream = torch.Generator(device=device).manual_seed(seed), list(real[:s])
    for t in range(s, n):
        nxt, _ = sampler.sample(obs_buf, acts[t - s:t - s + K].unsqueeze(0), generator=gen)  # a_{t-K}...
        obs_buf = torch.cat([obs_buf[:, 1:], nxt.unsqueeze(1)], dim=1)
        dream.append(common.to_uint8(nxt)[0].cpu())
    real, dream = real.cpu().numpy(), torch.stack(dream).numpy()
    err = np.abs(real[s:].astype(np.float32) - dream[s:].astype(np.float32)).mean(axis=(1, 2, 3))
    return {"real": real, "dream": dream, "frame_mae": err.tolist(), "context": s}


def gif_path(path, flag_name: str) -> Path:
    """Before any work: an output path ending in .gif, ~ expanded."""
    path = common.expand_path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"{flag_name} {path}: give a file name ending in .gif")
    return path


def write_gif(frames: np.ndarray, path: Path, fps: float, what: str) -> None:
    """Save uint8 frames (T, H, W, 3), upscaled to about GIF_PIXELS, and say what the file holds: pillow
    stores identical consecutive frames as one longer frame, so the frame count is read back."""
    existed = path.exists()
    common.save_gif(frames, path, fps=fps, scale=max(1, GIF_PIXELS // max(frames.shape[1:3])))
    with Image.open(path) as gif:
        n = gif.n_frames
    print(f"wrote {path}{' (replaced the existing file)' if existed else ''}: {what}, {len(frames)} steps in "
          f"{n} GIF frames" + (" (repeated frames merged)" if n < len(frames) else ""))


def side_by_side(panels: dict, scale: int) -> np.ndarray:
    """{label: uint8 frames (T, C, H, W)} -> uint8 (T, LABEL_HEIGHT + scale H, W', 3): the panels upscaled by
    pixel repetition, left to right with a white bar between them, each label written above its panel."""
    ups = [np.asarray(v).transpose(0, 2, 3, 1).repeat(scale, 1).repeat(scale, 2) for v in panels.values()]
    t, h, w, _ = ups[0].shape
    bar = np.full((t, h, 2 * scale, 3), 255, np.uint8)
    body = np.concatenate([x for u in ups for x in (bar, u)][1:], axis=2)
    head = Image.new("RGB", (body.shape[2], LABEL_HEIGHT), "white")
    for i, label in enumerate(panels):
        ImageDraw.Draw(head).text((i * (w + 2 * scale) + 2, 1), label, fill="black")
    head = np.broadcast_to(np.asarray(head), (t, LABEL_HEIGHT, *body.shape[2:]))
    return np.concatenate([head, body], axis=1)


def dream(ckpt, steps: int = 100, out=None, seed: int = 0, device: str = "cpu") -> dict:
    """The real game ("real") and the world model's open-loop continuation of it ("dream") side by side in one
    GIF (default RUN/dream.gif), with the run's policy (uniform random actions if it has none); prints the
    per-frame error."""
    out = common.run_folder(ckpt) / "dream.gif" if out is None else gif_path(out, "--out")
    cfg, state = load_run(ckpt)
    parts = split_agent_state_dict(state["model"])
    env = VecEnv(cfg.game, 1, cfg.obs_size, sticky_actions=cfg.sticky_actions, seed=seed)
    check_actions(state["model"], cfg.game, env.num_actions)
    denoiser, _ = build_world_model(cfg, env.num_actions)
    denoiser.load_state_dict(parts["denoiser"], strict=True)
    ac = ActorCriticNetwork(env.num_actions, cfg.actor_critic_channels, cfg.actor_critic_lstm_dim,
                            cfg.obs_size)  # plays the real game on the CPU, beside env
    if parts["actor_critic"]:
        ac.load_state_dict(parts["actor_critic"], strict=True)
    r = dream_rollout(make_sampler(denoiser.to(device).eval(), cfg), env, ac.eval(), steps,
                      cfg.num_steps_conditioning, seed)
    env.close()
    mae, s = r["frame_mae"], r["context"]
    frames = side_by_side({"real": r["real"], "dream": r["dream"]}, max(1, GIF_PIXELS // cfg.obs_size))
    write_gif(frames, out, fps=10, what=f"{len(mae)} imagined frames after {s} real one{'s' * (s > 1)}")
    print("per-frame mean abs error (0-255): " + " ".join(f"{e:.1f}" for e in mae))
    if mae:
        print(f"mean {np.mean(mae):.2f}, first 10 {np.mean(mae[:10]):.2f}, last 10 {np.mean(mae[-10:]):.2f}")
    return dict(r, out=out)

# --- world-model diagnostics on held-out real transitions --------------------------------------------

HELDOUT_STEPS = 2000  # random-policy steps the diagnostics use (Breakout, seed 1: 17 points, 50 lost lives)


def collect_heldout(game: str, obs_size: int, sticky_actions: float, steps: int, seed: int) -> list:
    """steps transitions of the uniform random policy in a fresh env (never trained on), split into episodes
    at ends (life losses too, as in training), each a dict: obs (T + 1, C, H, W) uint8 (the final frame last),
    act, rew, end (T,), and per step another action alt_act (T,) with the frame alt_next (T, C, H, W) it would
    have given (from an env snapshot): the real difference the action makes."""
    env, rng = make_game(game, obs_size, sticky_actions), np.random.default_rng(seed)
    keys = ("act", "rew", "end", "alt_act", "alt_next")
    episodes, ep = [], dict({k: [] for k in keys}, obs=[env.reset(seed=seed)[0]])
    for i in range(steps):
        act, alt = rng.choice(env.num_actions, 2, replace=False)
        state = env.snapshot()
        alt_next = env.step(alt)[0]
        env.restore(state)
        obs, rew, terminated, truncated, info = env.step(act)
        for k, v in zip(keys + ("obs",), (act, rew, terminated or info["life_loss"], alt, alt_next, obs)):
            ep[k].append(v)
        if ep["end"][-1] or truncated or i == steps - 1:
            episodes.append({k: np.stack(v) for k, v in ep.items()})
            ep = dict({k: [] for k in keys}, obs=[env.reset()[0] if terminated or truncated else obs])
    env.close()
    return episodes


@torch.no_grad()
def world_model_diagnostics(sampler: DiffusionSampler, rew_end_model: RewardTerminationModel, heldout: list,
                            K: int, depth: int, n: int = 256, seed: int = 0) -> dict:
    """Where imagination departs from the real game, on held-out transitions (collect_heldout):
    action_sensitivity: mean |next frame sampled after the real last action - after another one| (same
      noise; frames in [-1, 1]) beside action_sensitivity_real, the same between the real next frames: a
      world model that ignores actions has ~0; action_accuracy: where the real frames differ, the share of
      samples closer to the real next frame than to the other action's;
    precision and recall of rewards +1, -1 (sign) and of ends (argmax of the logits along each episode);
    frame_mae_by_depth: mean |dream - real| in pixel levels (0-255) at depth 1..depth of open-loop dreams
      from n real K-frame contexts (zero-padded before the episode) with the real actions, while it lasts."""
    dev, rng, out = next(rew_end_model.parameters()).device, np.random.default_rng(seed), {}
    pred, true = [], []
    for ep in heldout:
        o = frames_to_float(ep["obs"])[None].to(dev)
        act = torch.as_tensor(ep["act"])[None].to(dev)
        rew, end, _ = rew_end_model.predict_rew_end(o[:, :-1], act, o[:, 1:])
        pred.append(torch.stack([rew[0].argmax(-1) - 1, end[0].argmax(-1)], 1).cpu())
        true.append(torch.as_tensor(np.stack([np.sign(ep["rew"]), ep["end"]], 1)).long())
    pred, true = torch.cat(pred), torch.cat(true)
    for name, k, c in (("reward_pos", 0, 1), ("reward_neg", 0, -1), ("end", 1, 1)):
        p, t = pred[:, k] == c, true[:, k] == c
        out[f"{name}_precision"] = (p & t).sum().item() / p.sum().item() if p.any() else None
        out[f"{name}_recall"] = (p & t).sum().item() / t.sum().item() if t.any() else None
    lengths = np.array([len(ep["act"]) for ep in heldout])
    picked = rng.choice(len(heldout), n, p=lengths / lengths.sum())
    starts = [(heldout[e], rng.integers(lengths[e])) for e in picked]

    def window(key, first, stop):  # (n, stop - first, ...): ep[key][t + j], zeros outside the episode
        at = lambda a, i: a[i] if 0 <= i < len(a) else np.zeros_like(a[0])
        return np.stack([[at(ep[key], t + j) for j in range(first, stop)] for ep, t in starts])

    frames = window("obs", 1 - K, depth + 1)  # (n, K + depth, C, H, W)
    act = torch.tensor(window("act", 1 - K, depth))  # (n, K - 1 + depth)
    alt = torch.cat([act[:, :K - 1], torch.tensor([ep["alt_act"][t] for ep, t in starts])[:, None]], dim=1)
    gen = torch.Generator(device=dev).manual_seed(seed)
    state, buf, errors = gen.get_state(), frames_to_float(frames[:, :K]).to(dev), []
    alt_pred = sampler.sample(buf, alt.to(dev), generator=gen)[0].cpu()
    gen.set_state(state)  # the same noise: only the last action differs
    mae = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))
    for d in range(depth):
        live = torch.tensor([t + d < len(ep["act"]) for ep, t in starts])
        x = sampler.sample(buf, act[:, d:d + K].to(dev), generator=gen)[0]
        buf = torch.cat([buf[:, 1:], x[:, None]], dim=1)
        x, real = x.cpu(), frames_to_float(frames[:, K + d])
        if d == 0:
            real_alt = frames_to_float(np.stack([ep["alt_next"][t] for ep, t in starts]))
            differ = mae(real, real_alt) > 0
            closer = (mae(x, real) < mae(x, real_alt))[differ]
            out.update(action_sensitivity=mae(x, alt_pred).mean().item(),
                       action_sensitivity_real=mae(real, real_alt).mean().item(),
                       action_accuracy=closer.float().mean().item() if differ.any() else None)
        if not live.any():
            break
        errors.append(127.5 * (x[live] - real[live]).abs().mean().item())
    return dict(out, frame_mae_by_depth=errors)


def diagnostics_text(d: dict) -> str:
    f = lambda k: "n/a" if d[k] is None else f"{d[k]:.2f}"
    pr = lambda name: f"{f(name + '_precision')}/{f(name + '_recall')}"
    return (f"world model on {HELDOUT_STEPS} held-out random-policy steps: action sensitivity "
            f"{d['action_sensitivity']:.4f} (real frames {d['action_sensitivity_real']:.4f}), "
            f"action accuracy {f('action_accuracy')}; precision/recall of reward +1 {pr('reward_pos')}, "
            f"reward -1 {pr('reward_neg')}, end {pr('end')}; frame error (0-255) by depth: "
            + " ".join(f"{e:.1f}" for e in d["frame_mae_by_depth"]))


# =====================================================================================================
# command line
# =====================================================================================================

def config_parser(argv, description: str = "DIAMOND") -> tuple[argparse.ArgumentParser, DiamondConfig]:
    """A parser with one flag per DiamondConfig field whose defaults are those of the chosen --preset (read
    first), so `--preset small --num-sampling-steps 5` means: small, then that one change; with --resume RUN
    the defaults are the run's own config."""
    pre = common.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=list(PRESETS))
    pre.add_argument("--game")
    pre.add_argument("--resume")
    known = pre.parse_known_args(argv)[0]
    game = known.game and GAME_ALIASES.get(known.game.lower(), known.game)  # not game_id: --help must work
    preset = known.preset or ("catch" if game == CATCH_ID else "large")
    base = load_run(known.resume)[0] if known.resume else DiamondConfig(preset=preset)
    return common.add_config_args(common.ArgumentParser(description=description), base), base


# What a resumed run cannot change: the networks' shapes, and what the checkpoint restores (optimizer state
# with its learning rate and warm-up; the seed of every random stream). The schedule may be extended.
FIXED_ON_RESUME = ("preset", "game", "obs_size", "num_steps_conditioning", "diffusion_channels",
                   "diffusion_depths", "diffusion_attn_depths", "diffusion_cond_dim", "rew_end_channels",
                   "rew_end_depths", "rew_end_cond_dim", "rew_end_lstm_dim", "actor_critic_channels",
                   "actor_critic_lstm_dim", "seed", "learning_rate", "actor_critic_learning_rate",
                   "weight_decay", "actor_critic_weight_decay", "warmup_steps")


def parse_config(argv) -> DiamondConfig:
    """DiamondConfig from command-line flags only (used by tests and scripts)."""
    parser, base = config_parser(argv)
    return common.config_from_args(base, parser.parse_args(argv))


def _hns_text(hns: Optional[float]) -> str:
    return "n/a" if hns is None else f"{hns:.3f}"


def train_command(argv) -> dict:
    parser, base = config_parser(argv, "Train DIAMOND on a real game (Atari, catch, or any gymnasium pixel "
                                       "game): world model, reward/end model, and an actor-critic trained in "
                                       "imagination.")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in RUN (its folder or its ckpt.pt)")
    parser.add_argument("--train-world-model-only", action="store_true",
                        help="train only the denoiser and the reward/end model (on random-policy data)")
    parser.add_argument("--from-official", metavar="PATH", help="start from an official DIAMOND agent")
    args = parser.parse_args(argv)
    cfg = common.config_from_args(base, args)
    check_config(cfg)  # an unknown game fails here, before any work
    official = read_agent(args.from_official) if args.from_official and not args.resume else None
    if args.resume:  # e.g. --resume RUN --num-epochs 60 trains longer
        run_dir = common.run_folder(args.resume)
        changed = [common.flag(f) for f in FIXED_ON_RESUME if getattr(cfg, f) != getattr(base, f)]
        if changed:
            raise ValueError(f"--resume continues {run_dir} as it was saved: {', '.join(changed)} cannot "
                             f"change (start a new run to change them)")
    else:
        make_game(cfg.game, cfg.obs_size).close()  # a game that cannot be played fails before the run folder
        name = game_id(cfg.game).split("/")[-1].split(":")[-1].split("-")[0]  # 'ALE/Breakout-v5' -> Breakout
        run_dir = common.make_run_dir("diamond", name)
    print(f"run folder: {run_dir}\nconfig: {asdict(cfg)}", flush=True)
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume), world_model_only=args.train_world_model_only,
                      log=lambda s: print(s, flush=True))
    if official is not None:
        check_actions(official, cfg.game, trainer.num_actions)
        load_agent(trainer.agent, official, args.from_official)
    t0 = time.time()
    result = trainer.run()
    if result:
        level = trainer.random_return
        level = "" if level is None else f", random policy {level:.2f} on the first {cfg.eval_episodes}"
        print(f"final evaluation, {len(result['returns'])} test episodes: mean return "
              f"{result['return_mean']:.2f}, max {result['return_max']:.0f}, "
              f"HNS {_hns_text(result['hns'])}{level} | {time.time() - t0:.0f} s | {run_dir}")
    if not args.train_world_model_only:
        try:
            dream(run_dir, steps=min(60, cfg.eval_max_steps), seed=cfg.seed, device="cpu")
        except Exception as e:  # a dream is a bonus: never lose a finished run over it
            print(f"(no dream GIF: {type(e).__name__}: {e})")
    return result


def eval_command(argv) -> dict:
    p = common.ArgumentParser(description="Play the real game with a trained DIAMOND agent.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="RUN", help="a run of this script (its folder or its ckpt.pt)")
    src.add_argument("--from-official", metavar="PATH", help="an official DIAMOND agent (needs --game)")
    p.add_argument("--game", help="the game to play; default %(default)s = the run's")
    p.add_argument("--episodes", type=int, default=10, help="test episodes, played in parallel")
    p.add_argument("--max-steps", type=int, help="cap per episode; default %(default)s = the run's")
    p.add_argument("--seed", type=int, default=0, help="seed of the test episodes (no-op starts) and actions")
    p.add_argument("--epsilon", type=float, default=0.0, help="epsilon-greedy actions (1 = random policy)")
    p.add_argument("--compare-random", action="store_true", help="also play the same episodes at random")
    p.add_argument("--gif", help="save the first episode as an animated GIF (a .gif path)")
    p.add_argument("--diagnostics", type=int, default=256,
                   help="held-out start points of the world-model diagnostics (0: none)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = p.parse_args(argv)
    if not (args.ckpt or args.game):
        p.error("--from-official needs --game (e.g. --game Breakout-v5)")
    common.check_ranges(args, positive=("episodes", "max_steps"), non_negative=("seed",), unit=("epsilon",))
    gif = gif_path(args.gif, "--gif") if args.gif else None
    cfg, state = load_run(args.ckpt) if args.ckpt else (DiamondConfig(), None)  # official: the paper's sizes
    sd, trained_on = (state["model"], cfg.game) if state else (read_agent(args.from_official), "")
    cfg.game, cfg.eval_max_steps = args.game or cfg.game, args.max_steps or cfg.eval_max_steps
    device = common.pick_device(args.device)
    # the same seed gives the same episodes (no-op starts) for the policy and the random comparison
    make_env = lambda: VecEnv(cfg.game, args.episodes, cfg.obs_size, sticky_actions=cfg.sticky_actions,
                              seed=args.seed, device=device)
    env = make_env()
    check_actions(sd, cfg.game, env.num_actions, trained_on)
    agent = Agent(cfg, env.num_actions)
    load_agent(agent, sd, args.ckpt or args.from_official)
    ac, frames, t0 = agent.to(device).actor_critic.eval(), [] if gif else None, time.time()
    gen = lambda: torch.Generator().manual_seed(args.seed)
    r = evaluate_policy(ac, env, cfg.eval_max_steps, args.epsilon, gen(), frames)
    r["hns"] = human_normalized_score(cfg.game, r["return_mean"])
    cut = args.episodes - r["finished"]
    cut = f" ({cut} cut at {cfg.eval_max_steps} steps)" if cut else ""
    print(f"{cfg.game}: {args.episodes} episodes, returns {r['returns']}\nmean {r['return_mean']:.2f}, max "
          f"{r['return_max']:.0f}, HNS {_hns_text(r['hns'])}{cut} | {time.time() - t0:.0f} s")
    names = env.envs[0].action_names  # what the policy does: its most frequent actions
    top = sorted(zip(r["action_freq"], names), reverse=True)[:4]
    print("actions: " + ", ".join(f"{name} {freq:.0%}" for freq, name in top)
          + f" (uniform {1 / len(names):.0%})")
    if args.compare_random:
        r["random"] = evaluate_policy(ac, make_env(), cfg.eval_max_steps, 1.0, gen())
        print(f"random policy, same episodes: returns {r['random']['returns']}\nmean "
              f"{r['random']['return_mean']:.2f}, max {r['random']['return_max']:.0f}")
    if args.diagnostics:
        heldout = collect_heldout(cfg.game, cfg.obs_size, cfg.sticky_actions, HELDOUT_STEPS, args.seed + 1)
        d = world_model_diagnostics(make_sampler(agent.denoiser, cfg), agent.rew_end_model, heldout,
                                    cfg.num_steps_conditioning, cfg.imagination_horizon, args.diagnostics,
                                    args.seed)
        print(diagnostics_text(d))
        r.update({f"wm/{k}": v for k, v in d.items()})
    if gif:
        write_gif(np.stack(frames), gif, fps=15, what="episode 1")
    return r


def dream_command(argv) -> dict:
    p = common.ArgumentParser(description="The real game and the world model's dream of it, side by side.")
    p.add_argument("--ckpt", metavar="RUN", required=True, help="a run of this script (folder or ckpt.pt)")
    p.add_argument("--steps", type=int, default=100, help="imagined steps after the real context frames")
    p.add_argument("--out", help="the GIF to write; default %(default)s = RUN/dream.gif")
    p.add_argument("--seed", type=int, default=0, help="seed of the real game and of the sampler")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    args = p.parse_args(argv)
    common.check_ranges(args, positive=("steps",), non_negative=("seed",))
    out = gif_path(args.out, "--out") if args.out else None
    return dream(args.ckpt, args.steps, out, args.seed, args.device)


COMMANDS = {"train": (train_command, "collect, train the world model and the agent (default)"),
            "eval": (eval_command, "play the real game with a trained agent"),
            "dream": (dream_command, "a GIF of the real game beside the world model's dream")}


def main(argv=None):
    """python diamond.py [train|eval|dream] [flags]; without a sub-command: train."""
    return common.dispatch(sys.argv[1:] if argv is None else argv, "diamond.py", COMMANDS)


if __name__ == "__main__":
    common.run_cli(main)
