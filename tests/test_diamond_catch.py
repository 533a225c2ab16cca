"""DIAMOND beyond Atari: the built-in Catch, any gymnasium pixel game, the world-model diagnostics, and the whole
loop learning Catch on one CPU thread."""
import math
import sys

import numpy as np
import pytest
import torch

import diamond

gym = diamond.gym


# ---------------------------------------------------------------------------------------------------
# Catch
# ---------------------------------------------------------------------------------------------------

def positions(frame, cell=2):
    """(3, 16, 16) uint8 or float frame of the 8x8 Catch -> ((ball row, ball column) or None, paddle column)."""
    ball, paddle = np.argwhere(np.asarray(frame[0, ::cell, ::cell]) > 0), np.asarray(frame[1, -1, ::cell]) > 0
    return (tuple(int(i) for i in ball[0]) if len(ball) else None), int(np.flatnonzero(paddle)[0])


def test_catch_dynamics_and_rewards():
    env = diamond.make_game("catch", obs_size=16)
    assert (env.num_actions, env.action_names) == (3, ["NOOP", "LEFT", "RIGHT"])
    obs, _ = env.reset(seed=3)
    (row, col), paddle = positions(obs)
    assert obs.shape == (3, 16, 16) and obs.dtype == np.uint8 and (row, paddle) == (0, 4)  # paddle in the middle
    for t in range(1, 9):  # LEFT until the wall: the paddle stops at column 0, the ball falls one row a step
        obs, rew, end, trunc, _ = env.step(1)
        paddle = max(paddle - 1, 0)
        assert positions(obs) == ((t, col) if t < 8 else None, paddle) and not trunc
        # the landing step has the outcome, the next one (the ball gone) ends the episode
        assert rew == ((1.0 if col == 0 else -1.0) if t == 7 else 0.0) and end == (t == 8)
    assert positions(env.reset(seed=3)[0])[0] == (0, col)  # the same seed, the same ball
    cols = [positions(env.reset(seed=s)[0])[0][1] for s in range(400)]  # uniform over the 8 columns
    assert set(cols) == set(range(8)) and max(np.bincount(cols)) < 400 / 8 + 4 * math.sqrt(400 / 8)


def play(policy, episodes: int, seed: int = 0) -> float:
    env, rng, total = diamond.make_game("catch", obs_size=16), np.random.default_rng(seed), 0.0
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        end = False
        while not end:
            obs, rew, end, _, _ = env.step(policy(obs, rng))
            total += rew
    return total / episodes


def toward_ball(obs, rng):
    ball, paddle = positions(obs)
    return 0 if ball is None or ball[1] == paddle else 1 if ball[1] < paddle else 2


def test_catch_optimal_and_random_returns():
    assert play(toward_ball, 100) == 1.0  # the paddle reaches every column in time
    # a random paddle catches with probability 1/8 (the ball's column is uniform): mean return 2/8 - 1 = -0.75,
    # standard deviation sqrt(1 - 0.75^2) = 0.66 per episode; 4 standard errors over 2000 episodes = 0.059
    assert play(lambda obs, rng: int(rng.integers(3)), 2000) == pytest.approx(-0.75, abs=0.059)


# ---------------------------------------------------------------------------------------------------
# any gymnasium game
# ---------------------------------------------------------------------------------------------------

USER_ENV = '''
import gymnasium as gym, numpy as np

class Blink(gym.Env):
    """A user's pixel game: a 12x12 frame whose brightness is the last action; reward 1 for action 1."""
    def __init__(self, obs="image"):
        self.observation_space = (gym.spaces.Box(0, 255, (12, 12, 3), np.uint8) if obs == "image"
                                  else gym.spaces.Box(-1, 1, (4,), np.float32))
        self.action_space = gym.spaces.Discrete(2) if obs != "box_actions" else gym.spaces.Box(-1, 1, (1,))
    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(0), {}
    def step(self, a):
        self.t += 1
        return self._obs(a), float(a == 1), self.t >= 5, False, {}
    def _obs(self, a):
        return np.full((12, 12, 3), 200 * int(a), np.uint8) if self.observation_space.shape[-1] == 3 else np.zeros(4, np.float32)

for name, obs in (("Blink-v0", "image"), ("BlinkVector-v0", "vector"), ("BlinkBox-v0", "box_actions")):
    gym.register("blinkgames/" + name, entry_point=Blink, kwargs=dict(obs=obs))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `blinkgames` on the path that registers three envs when imported (gymnasium's `module:Env-v0`)."""
    (tmp_path / "blinkgames.py").write_text(USER_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "blinkgames"
    for name in ("Blink-v0", "BlinkVector-v0", "BlinkBox-v0"):
        gym.registry.pop("blinkgames/" + name, None)
    sys.modules.pop("blinkgames", None)


def test_any_gymnasium_pixel_game(user_module):
    game = "blinkgames:blinkgames/Blink-v0"  # gymnasium imports the module, which registers the env
    assert diamond.game_id(game) == game and diamond.game_id("catch") == diamond.CATCH_ID
    env = diamond.VecEnv(game, num_envs=2, obs_size=8, seed=0)
    obs, _ = env.reset()
    assert obs.shape == (2, 3, 8, 8) and (obs == -1).all()  # 12x12 frames area-resized to 8x8, nothing else
    obs, rew, end, trunc, info = env.step(torch.tensor([1, 0]))
    assert rew.tolist() == [1.0, 0.0] and obs[0].unique().tolist() == pytest.approx([200 / 255 * 2 - 1])
    for _ in range(4):
        obs, rew, end, trunc, info = env.step(torch.tensor([1, 1]))
    assert end.tolist() == [1, 1] and info["final_frames"].shape == (2, 3, 8, 8) and (obs == -1).all()  # new games


@pytest.mark.parametrize("game, message", [
    ("blinkgames:blinkgames/BlinkVector-v0", "observations Box.* are not .*images and the env has no render_mode"),
    ("blinkgames:blinkgames/BlinkBox-v0", "DIAMOND needs discrete actions, the env has Box"),
    ("blinkgames:blinkgames/NoSuch-v0", "cannot be made by gymnasium"),
    ("nosuchmodule:Foo-v0", "cannot be made by gymnasium: No module named 'nosuchmodule'"),
    ("NoSuchGame-v0", "is not an Atari game of ale-py nor a registered gymnasium id"),
])
def test_unusable_games_fail_with_one_line_before_the_run_folder(user_module, tmp_path, monkeypatch, game, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        diamond.main(["--preset", "tiny", "--game", game])
    assert "\n" not in str(err.value) and f"--game {game!r}" in str(err.value)
    assert not (tmp_path / "runs").exists()


def micro_argv(game: str, **changes) -> list:
    """The tiny preset cut to seconds: 2 epochs of a few updates each (the actor-critic's only in the second)."""
    cfg = dict(obs_size=16, initial_collection_steps=60, initial_collection_max=60, env_steps_per_epoch=20,
               num_epochs=2, denoiser_steps_first_epoch=3, rew_end_steps_first_epoch=3, actor_critic_steps_first_epoch=0,
               denoiser_steps_per_epoch=2, rew_end_steps_per_epoch=2, actor_critic_steps_per_epoch=1, batch_size=4,
               imagination_batch_size=4, imagination_horizon=4, eval_episodes=2, final_eval_episodes=2,
               eval_max_steps=20, eval_every=1, device="cpu", **changes)
    argv = ["--preset", "tiny", "--game", game]
    for k, v in cfg.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def test_user_game_trains_evaluates_dreams_and_resumes(user_module, tmp_path, monkeypatch, capsys):
    """The whole loop, eval, dream and resume on a user's env, without touching diamond.py."""
    monkeypatch.chdir(tmp_path)
    game = "blinkgames:blinkgames/Blink-v0"
    diamond.main(micro_argv(game))
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("diamond-Blink-") and (run_dir / "dream.gif").exists()
    # a game of 5 steps, shorter than 4 context frames + the dream: the dream starts after its first frame
    assert "dream.gif: 4 imagined frames after 1 real one, 5 steps" in capsys.readouterr().out
    rows = [__import__("json").loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert rows[-1]["eval/hns"] is None and "wm/action_sensitivity" in rows[-1]
    r = diamond.main(["eval", "--ckpt", str(run_dir / "ckpt.pt"), "--episodes", "2", "--compare-random"])
    assert len(r["returns"]) == 2 and "wm/action_sensitivity" in r
    assert "action sensitivity" in capsys.readouterr().out
    diamond.main(["--resume", str(run_dir), "--num-epochs", "3"])
    assert __import__("torch").load(run_dir / "ckpt.pt", weights_only=True)["epoch"] == 3


# ---------------------------------------------------------------------------------------------------
# world-model diagnostics
# ---------------------------------------------------------------------------------------------------

class CatchOracle:
    """A perfect Catch world model on 16x16 frames: the ball (red) falls a row (and leaves after the bottom row),
    the paddle (green) moves by the last action; a final frame (no ball) stays as it is."""

    def sample(self, prev_obs, prev_act, generator=None):
        frames = prev_obs[:, -1].clone()
        for x, a in zip(frames, prev_act[:, -1]):
            ball, paddle = positions(x)
            if ball is not None:
                x.fill_(-1)
                if ball[0] < 7:
                    x[0, 2 * ball[0] + 2:2 * ball[0] + 4, 2 * ball[1]:2 * ball[1] + 2] = 1
                p = min(max(paddle + (0, -1, 1)[int(a)], 0), 7)
                x[1, 14:, 2 * p:2 * p + 2] = 1
        return frames, None


class LastFrame:
    """A world model that ignores the actions: the next frame is the last one."""

    def sample(self, prev_obs, prev_act, generator=None):
        return prev_obs[:, -1].clone(), None


class AlwaysCatch(torch.nn.Module):
    """A reward/end model that predicts reward +1 and an end at every step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def predict_rew_end(self, obs, act, next_obs, hx_cx=None):
        b, t = act.shape
        return torch.tensor([0., 0., 1.]).expand(b, t, 3), torch.tensor([0., 1.]).expand(b, t, 2), None


def test_diagnostics_on_known_world_models():
    heldout = diamond.collect_heldout("catch", 16, 0.0, 400, seed=0)
    assert sum(len(ep["act"]) for ep in heldout) == 400 and all(ep["end"][-1] for ep in heldout[:-1])
    for ep in heldout:  # the other action's frame comes from the same state: same ball, paddle one move apart
        assert ep["obs"].shape[0] == len(ep["act"]) + 1 and (ep["alt_act"] != ep["act"]).all()
        assert positions(ep["alt_next"][0])[0] == positions(ep["obs"][1])[0]
    rew_end = AlwaysCatch()
    good = diamond.world_model_diagnostics(CatchOracle(), rew_end, heldout, K=4, depth=10, n=128)
    blind = diamond.world_model_diagnostics(LastFrame(), rew_end, heldout, K=4, depth=10, n=128)
    # a perfect model: its frames change with the action exactly as the real ones, and its dreams have no error
    assert good["action_sensitivity"] == pytest.approx(good["action_sensitivity_real"]) and good["action_accuracy"] == 1
    assert good["frame_mae_by_depth"] == [0.0] * 8  # episodes of 8 steps: no depth beyond 8
    # paddles one cell apart: 2 cells of 2x2 pixels of the green channel differ by 2 -> 2 * 2 * 4 / 768 = 0.0208
    assert 0 < good["action_sensitivity_real"] <= 2 * 2 * 4 / 768
    assert blind["action_sensitivity"] == 0 and blind["action_sensitivity_real"] == good["action_sensitivity_real"]
    assert blind["action_accuracy"] <= 0.5 and blind["frame_mae_by_depth"][0] > 0
    # "+1 and an end at every step": recall 1, precision = the share of catches (of ends) among all steps
    steps = sum(len(ep["act"]) for ep in heldout)
    catches, ends = sum(int((ep["rew"] > 0).sum()) for ep in heldout), sum(int(ep["end"].sum()) for ep in heldout)
    assert good["reward_pos_precision"] == pytest.approx(catches / steps) and good["reward_pos_recall"] == 1
    assert good["reward_neg_precision"] is None and good["reward_neg_recall"] == 0
    assert good["end_precision"] == pytest.approx(ends / steps) and good["end_recall"] == 1


# ---------------------------------------------------------------------------------------------------
# the whole loop learns
# ---------------------------------------------------------------------------------------------------

# --preset catch4: the catch preset on a 4x4 Catch, cut to 5 epochs (1,400 real steps; 380 denoiser, 480
# reward/end and 320 actor-critic updates; imagination horizon 4 = the game's length). Measured with one
# thread, 100 final test games (the random policy on 64 of the same games; its exact level is 2 / 4 - 1 =
# -0.5): seed 0: 0.98 (random -0.53), seed 1: -0.14 (-0.56), seed 2: 0.98 (-0.47); evaluating every epoch
# (the preset's eval_every 1) draws no training randomness: seed 0 gives 0.98 either way. Another CPU or
# thread count rounds differently and so follows another trajectory: the bound must hold for the worst seed.
LEARNT = -0.3  # 0.2 above the exact random level: a loop that learns nothing scores -0.5 +- 0.087 (sd 0.87
# over 100 games), 2.3 standard errors below it; the worst seed (sd 0.99) is 1.6 standard errors above it


def test_the_loop_learns_catch(tmp_path, monkeypatch):
    """From scratch to a policy that catches: real steps train only the world model, the policy learns only in
    imagination, and it is then scored on the real game against the random policy on the same games."""
    monkeypatch.chdir(tmp_path)
    result = diamond.main(["--preset", "catch4", "--seed", "0", "--device", "cpu"])
    run_dir = next((tmp_path / "runs").iterdir())
    rows = [__import__("json").loads(line) for line in open(run_dir / "metrics.jsonl")]
    random_level = next(r["eval/random_return_mean"] for r in rows if "eval/random_return_mean" in r)
    assert abs(random_level - -0.5) < 0.45  # returns +-1 with p = 1/4: sd 0.87, 4 standard errors of 64
    assert result["return_mean"] > max(LEARNT, random_level), (result["return_mean"], random_level)
    assert (run_dir / "curves.png").exists()
