"""DIAMOND world-model half: official parity of the denoiser, samplers and reward/end model, the real Atari
preprocessing, the replay dataset, a short Breakout training run, imagination and dreams.

Golden values: tests/golden/diamond_small.pt (official eloialonso/diamond, tiny configs, perturbed weights;
conventions in its `meta` entries, quoted where used)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import diamond  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "diamond_small.pt"
# float32 against a golden made on another CPU: ~40 conv / norm / attention ops in sequence, sums of <= a few
# hundred terms in a CPU-dependent order (measured <= 9e-7 of the size): 1e-5 of a quantity's size, at least 1e-5
# (every quantity is built from order-1 terms: frames in [-1, 1], unit noise)
RTOL = 1e-5
RTOL_ELEMENTWISE = 1e-6  # a few float32 elementwise ops (sigma's EDM conditioners, log-normal draws): a few ulp
LEVEL = 2 / 255  # one uint8 quantisation level in [-1, 1]


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def maxerr(a, b):
    return (a - b).abs().max().item()


def assert_f32_close(got, ref, rtol=RTOL):
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    tol = rtol * max(1.0, ref.abs().max().item())
    assert maxerr(got, ref) <= tol, (maxerr(got, ref), tol)


def official_denoiser(golden):
    c = golden["configs"]["denoiser"]["inner_model"]
    inner = diamond.DiffusionUNet(c["num_actions"], c["channels"], c["depths"], c["attn_depths"], c["cond_channels"],
                                  c["num_steps_conditioning"], c["img_channels"])
    cd, cs = golden["configs"]["denoiser"], golden["configs"]["sigma_distribution"]
    den = diamond.EDMPreconditioner(inner, cd["sigma_data"], cd["sigma_offset_noise"], cs["loc"], cs["scale"],
                                    cs["sigma_min"], cs["sigma_max"])
    den.load_state_dict(golden["state_dicts"]["denoiser"], strict=True)
    return den


def official_rew_end(golden):
    c = golden["configs"]["rew_end_model"]
    net = diamond.RewardTerminationModel(c["num_actions"], c["channels"], c["depths"], c["attn_depths"],
                                         c["cond_channels"], c["lstm_dim"], c["img_size"], c["img_channels"])
    net.load_state_dict(golden["state_dicts"]["rew_end_model"], strict=True)
    return net


def golden_obs(golden):
    return golden["inputs"]["obs_seq_u8"].float() / 255 * 2 - 1, golden["inputs"]["act_seq"]  # meta/frame_decode


# --- official parity -------------------------------------------------------------------------------------

def test_keys_and_sizes_match_official(golden):
    keys = golden["agent_state_dict_keys"]
    for prefix, net in (("denoiser.", official_denoiser(golden)), ("rew_end_model.", official_rew_end(golden))):
        assert {prefix + k for k in net.state_dict()} == {k for k in keys if k.startswith(prefix)}
    # default sizes: official parameter counts (diamond facts, verified) and zero-initialised layers
    A = 4
    den = diamond.EDMPreconditioner(diamond.DiffusionUNet(A))
    assert len(den.state_dict()) == 236 and sum(p.numel() for p in den.parameters()) == 4_405_699 + 64 * A
    assert den.inner_model.noise_emb.weight.shape == (1, 128)  # a buffer, not a parameter
    assert den.inner_model.conv_out.weight.abs().sum() == 0 and den.inner_model.conv_out.bias.abs().sum() > 0
    zero = [k for k, v in den.state_dict().items() if v.dim() > 1 and v.abs().sum() == 0]
    assert len([k for k in zero if k.endswith("conv2.weight")]) == 22
    rem = diamond.RewardTerminationModel(A)
    assert len(rem.state_dict()) == 108 and sum(p.numel() for p in rem.parameters()) == 5_900_352 + 128 * A
    H = rem.lstm_dim
    assert torch.all(rem.lstm.bias_ih_l0[H:2 * H] == 1) and rem.lstm.bias_hh_l0.abs().sum() == 0
    assert rem.head[2].bias is None


def test_denoiser_parity(golden):
    den, gd, inp = official_denoiser(golden), golden["denoiser"], golden["inputs"]
    obs, act = golden_obs(golden)
    sigma = inp["sigma"]
    for got, name in zip(den.conditioners(sigma), ("c_in", "c_out", "c_skip", "c_noise")):
        assert_f32_close(got, gd[name], RTOL_ELEMENTWISE)
    # meta/denoiser_direct_inputs: past = obs[:, 0:4], next = obs[:, 4], noisy = next + 0.3 offset + sigma noise
    x0 = obs[:, 4]
    noisy = x0 + 0.3 * inp["offset_noise"] + sigma[:, None, None, None] * inp["noise"]
    out, (_, c_out, c_skip, _) = den(noisy, sigma, obs[:, 0:4], act[:, 0:4])
    assert_f32_close(out, gd["model_output"])
    codes = ((den.denoise(noisy, sigma, obs[:, 0:4], act[:, 0:4]) + 1) / 2 * 255).round().to(torch.int32)
    diff = (codes - gd["denoised_code_u8"].int()).abs()
    # README: a code may differ by 1 at a quantisation boundary. Expected flips = sum over pixels of |code change|,
    # ~0.2 per frame for one CPU's rounding (float32 vs float64, measured): more than 5 in 2 frames has odds < 1e-3
    assert diff.max() <= 1 and diff.sum() <= 5
    target = (x0 - c_skip[:, None, None, None] * noisy) / c_out[:, None, None, None]
    assert_f32_close(torch.nn.functional.mse_loss(out, target).item(), gd["loss_fixed_noise"])
    # meta/denoiser_train: seeded official training step on a batch with one padded first frame
    obs_t, act_t = obs.clone(), act.clone()
    obs_t[1, 0], act_t[1, 0] = 0.0, 0
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 0] = False
    torch.manual_seed(gd["train_seed"])
    loss, _ = den.loss(obs_t, act_t, mask)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in den.parameters()))
    assert_f32_close(loss.item(), gd["train_loss"])
    assert_f32_close(grad_norm.item(), gd["train_grad_norm"])  # the backward pass doubles the depth: still ~1e-6
    # the same draws through an explicit generator
    loss_g, _ = den.loss(obs_t, act_t, mask, generator=torch.Generator().manual_seed(gd["train_seed"]))
    assert loss_g.item() == loss.item()
    # the sigmas it drew: log-normal(-0.4, 1.2), clipped
    g = torch.Generator().manual_seed(gd["train_seed"])
    s0 = den.sample_sigma(2, generator=g)
    assert_f32_close(s0, gd["train_sigmas"][0], RTOL_ELEMENTWISE)


def test_sampler_parity(golden):
    den, gs = official_denoiser(golden), golden["sampler"]
    obs, act = golden_obs(golden)
    for name in ("euler", "heun"):
        sampler = diamond.DiffusionSampler(den, **golden["configs"]["sampler_" + name])
        assert_f32_close(sampler.sigmas, gs["sigmas"], RTOL_ELEMENTWISE)
        torch.manual_seed(gs["seed"])  # meta/sampler: prev = obs[:, 1:5], act[:, 1:5]; x0 = first randn
        x, traj = sampler.sample(obs[:, 1:5], act[:, 1:5])
        assert len(traj) == 4
        # mean and std of 24576 unit normals: float32 sums in a CPU-dependent order, ~1e-6
        assert_f32_close(torch.stack([traj[0].mean(), traj[0].std()]), gs["x0_mean_std"])
        err = (x - gs[name + "_next_obs"]).abs()
        # Every denoiser call quantises; our float32 convolutions differ from the reference's by ~1e-6, so a
        # value within that of a level boundary can land one level away (README). Expected flips = sum over pixels
        # of |code change| ~ 0.2 per call and frame (float32 vs float64, measured): rare, a few at most.
        # Euler: a flip moves later values by less than a level (c_skip < 1), so such pixels differ by exactly one
        # level; one flip ends as ~10 such pixels (0.1%). Heun divides by the next sigma (0.28, 0.002): one flip at
        # the first call ends as ~170-250 pixels off (1.4-2%, measured between kernel paths and against the golden).
        # Both bounds allow ~10 flips in a frame; a wrong step or schedule changes > 85% of the pixels (measured
        # with Euler <-> Heun and 4 steps for 3).
        frac = (err > LEVEL / 2).flatten(1).float().mean(1)  # per frame; quantised: 0 or >= one level apart
        if name == "euler":
            assert err.max() < 1.5 * LEVEL and frac.max() < 0.01, frac
        else:
            assert frac.max() < 0.2, frac
    # heun needs 2N - 1 network calls, euler N
    calls = []
    den_denoise = den.denoise
    den.denoise = lambda *a: calls.append(1) or den_denoise(*a)
    diamond.DiffusionSampler(den, 3, order=2).sample(obs[:, 1:5], act[:, 1:5])
    assert len(calls) == 5


def test_rew_end_parity(golden):
    net, gr = official_rew_end(golden), golden["rew_end_model"]
    obs, act = golden_obs(golden)
    logits_rew, logits_end, (hx, cx) = net.predict_rew_end(obs[:, :-1], act[:, :-1], obs[:, 1:])
    for got, name in ((logits_rew, "logits_rew"), (logits_end, "logits_end"), (hx, "hx"), (cx, "cx")):
        assert_f32_close(got, gr[name])
    # batch_obs_u8_note: obs with [0, 4:] and [1, 0] zeroed (padding); final_observation = obs_seq[0, 4]
    bobs = obs.clone()
    bobs[0, 4:], bobs[1, 0] = 0.0, 0.0
    final = torch.zeros(2, 3, 64, 64)
    final[0] = obs[0, 4]
    loss, m = net.loss(bobs, gr["batch_act"], gr["batch_rew"], gr["batch_end"], gr["batch_mask_padding"], final)
    assert_f32_close(loss.item(), gr["loss_total"])
    assert_f32_close(m["loss_rew"], gr["loss_rew"])
    assert_f32_close(m["loss_end"], gr["loss_end"])
    # without the final frame the loss differs: the end step must see the true last frame, not padding
    loss_pad, _ = net.loss(bobs, gr["batch_act"], gr["batch_rew"], gr["batch_end"], gr["batch_mask_padding"],
                           torch.zeros(2, 3, 64, 64))
    assert abs(loss_pad.item() - loss.item()) > 1e-4  # measured 4e-3; float32 noise of the loss ~2e-6


# --- environment --------------------------------------------------------------------------------------------

def test_game_names():
    for name in ("Breakout-v5", "ALE/Breakout-v5", "breakout", "BreakoutNoFrameskip-v4"):
        assert diamond.resolve_game(name) == "ALE/Breakout-v5"
    with pytest.raises(ValueError, match="Breakout-v5"):
        diamond.resolve_game("Breakot-v5")
    with pytest.raises(ValueError, match="not an Atari game"):
        diamond.AtariEnv("NoSuchGame")


def test_atari_preprocessing_frame_skip_max_pool_noops():
    env = diamond.AtariEnv("Breakout-v5", obs_size=64)
    assert env.num_actions == 4  # minimal action set
    starts = set()
    for seed in range(4):
        obs, info = env.reset(seed=seed)
        assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8
        assert 1 <= info["episode_frame_number"] <= 30  # 1..30 no-ops after the reset
        starts.add(info["episode_frame_number"])
    assert len(starts) > 1
    ale, pooled_differs = env.ale, False
    for step in range(12):
        a = [1, 2, 3, 0][step % 4]
        state = ale.cloneState()
        frame0 = ale.getEpisodeFrameNumber()
        obs, _, _, _, _ = env.step(a)
        assert ale.getEpisodeFrameNumber() == frame0 + 4  # frame skip 4
        ale.restoreState(state)  # replay the 4 frames by hand: max of the last two screens, area resize
        screens = []
        for _ in range(4):
            env.env.step(a)
            screens.append(ale.getScreenRGB().copy())
        ref = np.asarray(Image.fromarray(np.maximum(screens[2], screens[3])).resize((64, 64), Image.BOX))
        assert np.array_equal(obs, ref.transpose(2, 0, 1))
        last = np.asarray(Image.fromarray(screens[3]).resize((64, 64), Image.BOX)).transpose(2, 0, 1)
        pooled_differs |= not np.array_equal(obs, last)
    assert pooled_differs  # the ball flickers / moves: the max-pool is visible


def test_life_loss_ends_only_in_training_mode():
    kw = dict(game="Breakout-v5", num_envs=1, obs_size=32, seed=3)
    train, test = diamond.VecEnv(done_on_life_loss=True, **kw), diamond.VecEnv(**kw)
    o1, _ = train.reset()
    o2, _ = test.reset()
    assert torch.equal(o1, o2) and o1.shape == (1, 3, 32, 32) and o1.dtype == torch.float32
    rng = np.random.default_rng(0)
    for _ in range(3000):
        a = torch.tensor([rng.integers(4)])
        lives = train.envs[0].ale.lives()
        _, _, e1, _, i1 = train.step(a)
        _, _, e2, _, i2 = test.step(a)
        if train.envs[0].ale.lives() < lives and lives > 1:  # a life lost, the game goes on
            assert e1.item() == 1 and e2.item() == 0
            assert torch.equal(i1["final_observation"][0], diamond.frames_to_float(i1["frames"][0]))
            return
        assert e1.item() == e2.item() == 0
    pytest.fail("no life lost in 3000 random steps")


# --- replay dataset -----------------------------------------------------------------------------------------

def fake_dataset(lengths, finished=True, shape=(3, 4, 4)):
    """Episodes whose frame t of episode e is filled with 10 e + t (so segments can be checked)."""
    ds = diamond.ReplayDataset(shape)
    for e, n in enumerate(lengths):
        obs = np.stack([np.full(shape, 10 * e + t, np.uint8) for t in range(n)])
        end = np.zeros(n, np.uint8)
        end[-1] = finished
        ds.add_episode(obs, np.arange(n) % 4, np.arange(n, dtype=np.float32), end, np.zeros(n, np.uint8),
                       np.full(shape, 200 + e, np.uint8) if finished else None)
    return ds


def test_dataset_segments_and_padding_masks():
    ds = fake_dataset([3, 10, 7])
    rng = np.random.default_rng(0)
    for pad_right in (False, True):
        b = ds.sample_segments(256, 6, pad_right=pad_right, rng=rng)
        assert b["obs"].shape == (256, 6, 3, 4, 4) and b["act"].dtype == torch.int64
        codes = ((b["obs"][:, :, 0, 0, 0] + 1) / 2 * 255).round()
        mask = b["mask_padding"]
        assert torch.all(b["obs"][~mask] == 0) and torch.all(b["act"][~mask] == 0)  # official padding
        for i in range(256):
            m = mask[i]
            real = codes[i][m]
            assert m.any() and torch.all(real[1:] - real[:-1] == 1)  # consecutive frames of one episode
            idx = m.nonzero().squeeze(1)
            assert torch.all(idx[1:] - idx[:-1] == 1)  # one contiguous block of real steps
            if not pad_right:
                assert m[-1]  # left padding only: the segment ends on a real frame
                if not m[0]:
                    assert real[0] % 10 == 0  # padding only before an episode start
            ep = int(real[0] // 10)
            assert b["final_obs"][i, 0, 0, 0] == (200 + ep) / 255 * 2 - 1
            assert torch.all(b["rew"][i][m] == real % 10)  # rewards aligned with their frames
        assert (~mask[:, 0]).any()
        assert (~mask[:, -1]).any() == pad_right
    # recency weights: chunk k of the episodes in order gets w_k (official [.1, .1, .1, .7])
    ds = fake_dataset([5] * 8)
    p = ds.episode_probs([0.1, 0.1, 0.1, 0.7])
    assert np.allclose(p, [0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.35, 0.35])
    assert np.allclose(fake_dataset([2, 6]).episode_probs([0.1, 0.1, 0.1, 0.7]), [0.25, 0.75])  # < 4: by length
    b = ds.sample_segments(2000, 4, sample_weights=[0.1, 0.1, 0.1, 0.7], rng=np.random.default_rng(1))
    first = ((b["obs"][:, -1, 0, 0, 0] + 1) / 2 * 255).round() // 10
    assert abs((first >= 6).float().mean().item() - 0.7) < 0.04


def collection(env, ds, seed=0):
    """The Trainer's collection: an untrained actor-critic (zero heads: uniform) stepping a Recorder."""
    ac = diamond.ActorCriticNetwork(env.num_actions, (4, 4, 4, 4), 8, env.envs[0].obs_size)
    return diamond.AgentEnvLoop(diamond.Recorder(env, ds), ac, generator=torch.Generator().manual_seed(seed))


def test_replay_save_load_round_trip(tmp_path):
    env = diamond.VecEnv("Breakout-v5", num_envs=2, obs_size=32, done_on_life_loss=True, seed=0)
    ds = diamond.ReplayDataset((3, 32, 32))
    loop = collection(env, ds)
    loop.rollout(60, grad=False)
    assert len(ds) == 120
    assert any(ep.finished for ep in ds.episodes) and any(not ep.finished for ep in ds.episodes)
    ds.save(tmp_path / "replay")
    loop.rollout(20, grad=False)  # the open episodes grow; a crash before the next save keeps the saved state
    ds.episodes[0].saved = False
    ds_tmp_files = sorted(p.name for p in (tmp_path / "replay").iterdir())
    assert "index.json" in ds_tmp_files and not any(n.startswith(".") for n in ds_tmp_files)
    back = diamond.ReplayDataset.load(tmp_path / "replay")
    assert len(back) == 120
    for a, b in zip(back.episodes, ds.episodes):
        n = a.len
        for k in diamond.Episode.ARRAYS:
            assert np.array_equal(getattr(a, k)[:n], getattr(b, k)[:n]), k
        assert (a.final_obs is None) == (not b.finished or n < b.len) or np.array_equal(a.final_obs, b.final_obs)
    ds.save(tmp_path / "replay")
    again = diamond.ReplayDataset.load(tmp_path / "replay")
    assert len(again) == 160 and json.loads((tmp_path / "replay" / "index.json").read_text())["lengths"] == \
        [ep.len for ep in ds.episodes]
    for a, b in zip(again.episodes, ds.episodes):
        assert np.array_equal(a.obs[:a.len], b.obs[:b.len])
        if b.finished:
            assert np.array_equal(a.final_obs, b.final_obs)


# --- training, imagination, dreams on real Breakout ----------------------------------------------------------

def tiny_world_model(num_actions, obs_size=32):
    cfg = diamond.DiamondConfig(preset="tiny", obs_size=obs_size)
    return cfg, *diamond.build_world_model(cfg, num_actions)


@pytest.fixture(scope="module")
def breakout_data():
    env = diamond.VecEnv("Breakout-v5", num_envs=2, obs_size=32, done_on_life_loss=True, seed=0)
    ds = diamond.ReplayDataset((3, 32, 32))
    collection(env, ds).rollout(150, grad=False)
    return ds


def test_short_breakout_run_lowers_denoiser_loss(breakout_data):
    torch.manual_seed(0)
    cfg, den, _ = tiny_world_model(4)
    held = breakout_data.sample_segments(16, 6, rng=np.random.default_rng(123))

    def held_loss():
        with torch.no_grad():
            return den.loss(held["obs"], held["act"], held["mask_padding"],
                            generator=torch.Generator().manual_seed(7))[0].item()

    before = held_loss()
    opt = torch.optim.AdamW(den.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = breakout_data.sample_segments(4, 6, rng=rng)
        loss, _ = den.loss(b["obs"], b["act"], b["mask_padding"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
        opt.step()
    after = held_loss()
    assert after < 0.5 * before, (before, after)


def test_world_model_env_steps(breakout_data):
    torch.manual_seed(0)
    cfg, den, rem = tiny_world_model(4)
    wm = diamond.WorldModelEnv(diamond.make_sampler(den, cfg), rem, breakout_data, num_envs=5, horizon=3, seed=0)
    obs, _ = wm.reset()
    assert obs.shape == (5, 3, 32, 32)
    age = torch.zeros(5, dtype=torch.long)  # imagined steps since each env's (re)start
    for t in range(5):
        obs, rew, end, trunc, info = wm.step(torch.randint(4, (5,)))
        assert obs.shape == (5, 3, 32, 32) and set(rew.tolist()) <= {-1.0, 0.0, 1.0}
        age += 1
        assert torch.equal(trunc.bool(), age >= 3)  # horizon 3
        dead = (end.bool() | trunc.bool())
        age[dead] = 0
        if dead.any():
            n = int(dead.sum())
            assert info["final_observation"].shape == (n, 3, 32, 32)
            assert info["burnin_obs"].shape == (n, 3, 3, 32, 32)
            assert torch.equal(obs[dead], wm.obs_buffer[dead, -1])
    # imagined frames lie on the uint8 grid (quantised denoiser)
    codes = (wm.obs_buffer + 1) / 2 * 255
    assert (codes - codes.round()).abs().max() < 1e-3  # float32 round trip k -> [-1, 1] -> k: ~255 eps = 3e-5


def test_dream_gif_from_checkpoint(tmp_path, capsys):
    cfg, den, rem = tiny_world_model(4)
    sd = {**{"denoiser." + k: v for k, v in den.state_dict().items()},
          **{"rew_end_model." + k: v for k, v in rem.state_dict().items()}}
    config = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    common.save_checkpoint(tmp_path / "ckpt.pt", {"kind": "diamond", "config": config, "model": sd})
    r = diamond.dream(tmp_path, steps=5)  # the run folder; the GIF goes into it
    assert r["real"].shape == r["dream"].shape == (4 + 5, 3, 32, 32) and r["out"] == tmp_path / "dream.gif"
    assert np.array_equal(r["real"][:4], r["dream"][:4]) and len(r["frame_mae"]) == 5
    head, scale = diamond.LABEL_HEIGHT, diamond.GIF_PIXELS // 32  # 32 px frames become 256 px
    with Image.open(tmp_path / "dream.gif") as gif:
        assert gif.size == (2 * 32 * scale + 2 * scale, head + 32 * scale)
        frames = gif.n_frames
        first = np.asarray(gif.convert("RGB"))
    # "real" above the left half, "dream" above the right one: dark text pixels on the white strip
    ink = (first[:head] < 128).all(axis=2)
    assert ink[:, :32 * scale].sum() > 20 and ink[:, 34 * scale:].sum() > ink[:, :32 * scale].sum()
    assert (first[head:, 32 * scale:34 * scale] == 255).all()  # the white bar between the halves
    nearest = r["real"][0].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)  # a pixel: a scale^2 block
    assert np.array_equal(first[head:, :32 * scale], nearest)
    out = capsys.readouterr().out
    assert f"dream.gif: 5 imagined frames after 4 real ones, 9 steps in {frames} GIF frames" in out
    assert "per-frame mean abs error" in out
    # a checkpoint of a game with another action count is refused
    cfg_pong = dict(config, game="Pong-v5")
    common.save_checkpoint(tmp_path / "pong.pt", {"kind": "diamond", "config": cfg_pong, "model": sd})
    with pytest.raises(ValueError, match="this agent has 4 actions and Pong-v5 has 6"):
        diamond.dream(str(tmp_path / "pong.pt"), steps=2, out=str(tmp_path / "x.gif"))


def test_recorder_keeps_every_transition_and_episode_boundary():
    env = diamond.VecEnv("Breakout-v5", num_envs=2, obs_size=32, done_on_life_loss=True, seed=1)
    ds = diamond.ReplayDataset((3, 32, 32))
    rec = diamond.Recorder(env, ds)
    obs, _ = rec.reset()
    seen, first = [], torch.ones(2, dtype=torch.bool)  # first: the env's episode starts at this step
    for t in range(150):  # env 0 cycles FIRE, RIGHT, LEFT (loses lives); env 1 always NOOP
        seen.append((obs.clone(), first.clone()))
        obs, _, _, _, info = rec.step(torch.tensor([(t + 1) % 3 + 1, 0]))
        first = torch.from_numpy(info["dead"].copy())
    # each env's episodes, in order, hold exactly the frames and actions it saw; `first` marks their starts
    for i in range(2):
        mine = [ep for ep in ds.episodes if (ep.act[:ep.len] == 0).all() == (i == 1)]  # chronological
        frames = torch.stack([o[i] for o, _ in seen])
        starts = [t for t, (_, f) in enumerate(seen) if f[i]]
        assert sum(ep.len for ep in mine) == 150 and len(mine) == len(starts)
        lives_lost = 0
        for ep, t0 in zip(mine, starts):
            assert torch.equal(diamond.frames_to_float(ep.obs[:ep.len]), frames[t0:t0 + ep.len])
            assert ep.act[:ep.len].tolist() == [(t + 1) % 3 + 1 if i == 0 else 0 for t in range(t0, t0 + ep.len)]
            if ep.finished:  # closed at an end (a lost life) with its final frame
                lives_lost += 1
                assert ep.end[ep.len - 1] == 1 and t0 + ep.len < 150
                if lives_lost % 5:  # the game goes on: the final frame is the next obs the agent sees
                    assert torch.equal(diamond.frames_to_float(ep.final_obs), frames[t0 + ep.len])
                else:  # the 5th life: game over, the next obs is a new game's first frame
                    assert not torch.equal(diamond.frames_to_float(ep.final_obs), frames[t0 + ep.len])
    assert len(starts) == 1 and sum(ep.finished for ep in ds.episodes) >= 1  # env 1 never launched the ball
    # collection is AgentEnvLoop over the Recorder: the policy's actions are recorded; with epsilon = 1 (one
    # draw per step for all envs) they are uniform whatever the policy prefers
    ac = diamond.ActorCriticNetwork(4, (4, 4, 4, 4), 8, 32)
    torch.nn.init.constant_(ac.actor_linear.bias[0], 30.0)  # the policy: NOOP, almost surely
    n0 = [ep.len for ep in ds.episodes]
    for epsilon, uniform in ((0.0, False), (1.0, True)):
        r = diamond.AgentEnvLoop(rec, ac, epsilon, torch.Generator().manual_seed(0)).rollout(40, grad=False)
        counts = torch.bincount(r["act"].flatten(), minlength=4)
        assert (counts > 5).all() if uniform else counts[0] == 80, counts
    new = np.concatenate([ep.act[n0[j] if j < len(n0) else 0:ep.len] for j, ep in enumerate(ds.episodes)])
    assert len(new) == 160 and sorted(new.tolist()) == sorted(r["act"].flatten().tolist() + [0] * 80)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's own imports
def test_networks_are_plain_pytorch_blocks():
    """Standard modules and functional ops only: torch.func's forward-mode jvp and vmap run through the
    denoiser U-Net (attention included), and every nn.Conv2d / nn.Linear a forward pass uses is called as a
    module (its forward hook fires), in all three networks."""
    from torch.func import jvp, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    net = diamond.DiffusionUNet(4, channels=(8, 8), depths=(1, 1), attn_depths=(0, 1), cond_channels=16)
    for p in net.parameters():  # no zero-initialised layer: every path carries a tangent
        torch.nn.init.normal_(p, std=0.2)
    x, c, obs = torch.randn(3, 3, 8, 8), torch.randn(3), torch.randn(3, 12, 8, 8)
    act = torch.randint(4, (3, 4))
    f = lambda x_: net(x_, c, obs, act)
    v = torch.randn_like(x)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():  # fused CPU attention kernels: no forward-mode rule
        out, tangent = jvp(f, (x,), (v,))
        batched = vmap(lambda *a: net(*(t.unsqueeze(0) for t in a)).squeeze(0))(x, c, obs, act)
        eps = 1e-3  # central difference: error O(eps^2) against float32 rounding ~1e-7 / eps
        fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    assert torch.equal(out, f(x)) and (tangent - fd).abs().max() < 1e-3 * tangent.abs().max()
    assert (batched - out).abs().max() < 1e-5  # per-sample vs batched kernels: rounding only
    cfg = diamond.DiamondConfig(preset="tiny")
    agent = diamond.Agent(cfg, 4)
    fired, layers = set(), [m for m in agent.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for m in layers:
        m.register_forward_hook(lambda mod, inp, out: fired.add(mod))
    frames, a = torch.rand(2, 5, 3, 32, 32) * 2 - 1, torch.randint(4, (2, 5))
    agent.denoiser.loss(frames, a, torch.ones(2, 5, dtype=torch.bool))
    agent.rew_end_model.predict_rew_end(frames[:, :-1], a[:, :-1], frames[:, 1:])
    agent.actor_critic(frames[:, 0])
    assert fired == set(layers), [n for n, m in agent.named_modules() if m in set(layers) - fired]
