"""A newcomer's first hour with ddpm.py and dit.py, run as a user runs them: `python SCRIPT ...` in a fresh folder.

Each test names the point of the first-hour review it covers (sampling defaults, resume budgets, exact --n,
discoverable commands, errors before work, paths, the Python example, pictures, defaults that agree).
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_cli.py
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import ddpm  # noqa: E402
import dit  # noqa: E402

# Micro versions of the tiny presets: the same code paths, seconds on one core.
MICRO = {"ddpm.py": ["--preset", "tiny", "--ch", "8", "--norm-groups", "4", "--steps", "4", "--log-every", "2",
                     "--sample-n", "10", "--sample-steps", "2"],
         "dit.py": ["--preset", "tiny", "--width", "32", "--depth", "1", "--heads", "2", "--steps", "4",
                    "--log-every", "2", "--sample-n", "10", "--sample-steps", "2"]}


def run(script, *args, cwd, check=True, env=None):
    out = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                         text=True, timeout=300, env=env)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def fails(script, *args, cwd, message):
    """A user error: one `error: ...` line naming the fix (or argparse's usage + error), exit status 1 or 2."""
    out = run(script, *args, cwd=cwd, check=False)
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr, out.stderr
    assert re.search(message, out.stderr), out.stderr
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished micro run of each script (tiny presets: class-conditional shapes, 16 px)."""
    root = tmp_path_factory.mktemp("cli")
    for script in MICRO:
        run(script, *MICRO[script], cwd=root)
    return root, {s: next((root / "runs").glob(f"{s[:-3]}-shapes-*")) for s in MICRO}


# 1. sampling defaults: the run's own grid settings, printed -----------------------------------------------

@pytest.mark.parametrize("script", list(MICRO))
def test_sample_and_evaluate_default_to_the_runs_grid_settings(runs, script):
    root, run_dirs = runs
    cfg = json.loads((run_dirs[script] / "config.json").read_text())
    expect = (f"sampler {cfg['sample_sampler']}, {cfg['sample_steps']} steps, guidance {cfg['sample_guidance']}, "
              f"clip {'on' if cfg['sample_clip'] else 'off'}")
    assert cfg["sample_guidance"] > 0  # the tiny presets' grids are guided: the old sample default (0) differed
    out = run(script, "sample", "--ckpt", run_dirs[script], "--n", "4", "--steps", "2", cwd=root).stdout
    assert expect.replace(f"{cfg['sample_steps']} steps", "2 steps") in out
    out = run(script, "evaluate", "--ckpt", run_dirs[script], "--n", "10", "--steps", "2", "--cache-dir", root,
              cwd=root).stdout
    assert expect.replace(f"{cfg['sample_steps']} steps", "2 steps") in out
    # with no flags, sample redraws the run's last grid, pixel for pixel (same weights, settings, size and seed)
    redraw = root / f"{script}-redraw.png"
    run(script, "sample", "--ckpt", run_dirs[script], "--out", redraw, cwd=root)
    final = next(run_dirs[script].glob("samples_*.png"))
    assert np.array_equal(np.asarray(Image.open(redraw)), np.asarray(Image.open(final)))
    # Python draws with the same defaults
    model = (ddpm if script == "ddpm.py" else dit).load(run_dirs[script])[0]
    assert common.settings_of(model) == dict(sampler=cfg["sample_sampler"], steps=cfg["sample_steps"],
                                             guidance=cfg["sample_guidance"], clip=cfg["sample_clip"])


# 2. resume budgets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", list(MICRO))
def test_resume_refuses_a_budget_at_or_below_the_saved_step(runs, script):
    root, run_dirs = runs
    config = (run_dirs[script] / "config.json").read_text()
    before = sorted(p.name for p in run_dirs[script].iterdir())
    fails(script, "--resume", run_dirs[script], "--steps", "2", cwd=root,
          message=r"the run is at step 4 and --steps 2 is below it; give --steps above 4")
    fails(script, "--resume", run_dirs[script], cwd=root, message=r"the run is at step 4 and it is finished")
    assert (run_dirs[script] / "config.json").read_text() == config  # not rewritten with the refused budget
    assert sorted(p.name for p in run_dirs[script].iterdir()) == before  # no new grid


# 3. dit sample --n draws exactly n, one block of rows per class ----------------------------------------

def test_sample_draws_exactly_n_with_a_row_per_class(runs):
    root, run_dirs = runs
    out = root / "sixteen.png"
    run("dit.py", "sample", "--ckpt", run_dirs["dit.py"], "--n", "16", "--steps", "2", "--out", out,
        "--npz", "5", cwd=root)
    assert np.load(out.with_suffix(".npz"))["arr_1"].tolist() == [0, 2, 4, 6, 8]
    width, height = Image.open(out).size
    assert height == 10 * 66 + 2 and width < 2 * 66 + 80  # 10 rows of <= 2 tiles of 64 px (16 px x 4), names
    run("dit.py", "sample", "--ckpt", run_dirs["dit.py"], "--n", "5", "--steps", "2", "--out", out, cwd=root)
    assert Image.open(out).size[1] == 5 * 66 + 2  # 5 images: classes 0, 2, 4, 6, 8, one row each


# 4. discoverable commands, no prefix matching, did-you-mean ---------------------------------------------

@pytest.mark.parametrize("script", ["ddpm.py", "dit.py", "diamond.py"])
def test_help_lists_the_commands_and_typos_get_a_suggestion(tmp_path, script):
    out = run(script, "--help", cwd=tmp_path).stdout
    commands = ["train", "sample", "evaluate"] if script != "diamond.py" else ["train", "eval", "dream"]
    for c in commands:
        assert re.search(rf"^  {c} +\S", out, re.M), out
    typo = "smaple" if script != "diamond.py" else "evl"
    fails(script, typo, "--ckpt", "RUN", cwd=tmp_path, message=rf"unknown command '{typo}'; did you mean "
                                                               rf"'{'sample' if typo == 'smaple' else 'eval'}'")
    if script != "diamond.py":  # --ckpt is no abbreviation of --ckpt-every
        fails(script, "--ckpt", "RUN", cwd=tmp_path, message=r"unrecognized arguments: --ckpt RUN \(--ckpt: did "
                                                             r"you mean --ckpt-every")
    assert not any(tmp_path.iterdir())


# 5. errors before work -------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", list(MICRO))
def test_output_and_count_errors_come_before_any_sampling(runs, script):
    root, run_dirs = runs
    out = fails(script, "sample", "--ckpt", run_dirs[script], "--out", root / "noext", cwd=root,
                message=r"--out .*noext: give a picture file name ending in .png")
    assert "samples" not in out.stdout and not (root / "noext").exists()
    fails(script, "evaluate", "--ckpt", run_dirs[script], "--n", "3", cwd=root,
          message=r"--n 3: evaluate needs at least 10 samples")
    fails(script, "sample", "--ckpt", run_dirs[script], "--class", "hexagon", cwd=root,
          message=r"--class 'hexagon': use 0..9 or a class name")


# 6. paths: run folder or ckpt.pt everywhere, ~ expanded, also inside folder: ----------------------------

def test_paths_take_a_run_folder_or_its_ckpt_and_expand_home(runs, tmp_path):
    root, run_dirs = runs
    home = tmp_path / "home"
    pics = home / "pics"
    for name, cls in (("a", 1), ("b", 4)):  # a labelled folder of images: two classes
        (pics / name).mkdir(parents=True)
        images, _ = common.make_shapes(8, seed=cls, size=16)
        for i, img in enumerate(images):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(pics / name / f"{i}.png")
    env = dict(os.environ, HOME=str(home))
    out = run("dit.py", *MICRO["dit.py"], "--dataset", "folder:~/pics", "--steps", "2", "--sample-n", "4",
              cwd=tmp_path, env=env)
    assert "16 images, 2 classes" in out.stdout
    folder_run = next((tmp_path / "runs").glob("dit-folder-*"))
    fails("dit.py", "--resume", folder_run / "ckpt.pt", "--steps", "2", cwd=tmp_path, message="the run is at step 2")
    run("dit.py", "--resume", folder_run / "ckpt.pt", "--steps", "3", cwd=tmp_path)  # RUN/ckpt.pt, not RUN/ckpt.pt/...
    run("dit.py", "sample", "--ckpt", folder_run, "--n", "2", "--steps", "2", "--out", "~/two.png", cwd=tmp_path,
        env=env)
    assert (home / "two.png").exists()


# 7. the Python example of each header runs and goes past the config ------------------------------------

@pytest.mark.parametrize("module", [ddpm, dit])
def test_the_headers_python_example_runs(module, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    doc = module.__doc__
    code = doc[doc.index("Python:") + len("Python:"):]
    code = "\n".join(line[4:] for line in code.splitlines() if line.startswith("    "))
    assert "sample_images" in code and "num_params" in code
    namespace = {}
    exec(compile(code, f"{module.__name__} header", "exec"), namespace)  # noqa: S102 (our own docstring)
    assert namespace["images"].shape[0] == 16
    with pytest.raises(TypeError, match="dit.build_model"):
        dit.DiT(dit.get_dit_config())


# 9. pictures: class names, --class by name, the same layout in both scripts ----------------------------

@pytest.mark.parametrize("script", list(MICRO))
def test_grids_name_their_classes_and_class_takes_a_name(runs, script):
    root, run_dirs = runs
    out = root / f"{script}-plus.png"
    run(script, "sample", "--ckpt", run_dirs[script], "--class", "plus", "--n", "2", "--steps", "2", "--out", out,
        cwd=root)
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] == 64 + 4  # one row: a single class
    strip = grid[:, :grid.shape[1] - 2 * 66 - 2]  # left of the tiles: the label strip with "plus" written in it
    assert strip.shape[1] > 20 and (strip > 128).any()
    final = next(run_dirs[script].glob("samples_*.png"))  # the training grid: 10 classes, one row each
    assert Image.open(final).size[1] == 10 * 66 + 2
    curves = np.asarray(Image.open(run_dirs[script] / "curves.png").convert("RGB"))  # the loss against steps
    assert ((curves[..., 2] > 150) & (curves[..., 0] < 80)).sum() > 50  # the blue loss line is drawn


# 10. defaults that agree ------------------------------------------------------------------------------

def test_help_shows_defaults_and_outputs_land_in_the_run_folder(runs):
    root, run_dirs = runs
    for script, command in (("ddpm.py", "sample"), ("dit.py", "evaluate")):
        text = run(script, command, "--help", cwd=root).stdout
        assert "(default: 256)" in text and "(default: auto)" in text  # --batch-size, --device
    out = run("ddpm.py", "sample", "--ckpt", run_dirs["ddpm.py"], "--n", "2", "--steps", "2", cwd=root).stdout
    assert (run_dirs["ddpm.py"] / "samples.png").exists() and not (root / "samples.png").exists()
    out = run("ddpm.py", "sample", "--ckpt", run_dirs["ddpm.py"], "--n", "2", "--steps", "2", cwd=root).stdout
    assert "(replaced the file that was there)" in out
    # one DDPM variance default (beta, as the official CIFAR-10 sampling) for every caller
    assert ddpm.PRESETS["cifar10"].sample_sampler == "ddpm"
    import inspect
    assert inspect.signature(common.sample_ddpm).parameters["variance"].default == "large"
    assert "clip" in inspect.signature(common.sample).parameters  # the flag's name, not clip_denoised
