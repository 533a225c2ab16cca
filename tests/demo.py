"""`make demo`: a short CPU run of every model on offline data, writing pictures under runs/.

Each step is the same command line a user would type; the demo only strings them together and
prints where the outputs went. Budget: under 10 minutes on 2 CPU cores. The tiny models are too small
for a second thread to help much (their small convolutions and matmuls barely scale), so the demo runs
two lanes side by side, one core each: DDPM then DIAMOND on Catch in one, DiT then DIAMOND on Breakout
in the other. Each command's output goes to runs/demo-logs/; its last lines are printed when it ends.
"""
import glob
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

STEPS = [  # (lane, title, command, run-folder prefix)
    (0, "DDPM, tiny class-conditional U-Net on shapes", [PY, "ddpm.py", "train", "--preset", "tiny", "--dataset", "shapes"],
     "ddpm-shapes"),
    (1, "DiT, tiny class-conditional transformer on shapes", [PY, "dit.py", "--preset", "tiny", "--dataset", "shapes"],
     "dit-shapes"),
    (1, "DIAMOND, tiny world model + agent on real Breakout", [PY, "diamond.py", "--game", "Breakout-v5", "--preset", "tiny"],
     "diamond-Breakout"),
    (0, "DIAMOND learns a 4x4 Catch (policy trained only in imagination)", [PY, "diamond.py", "--preset", "catch4"],
     "diamond-Catch4x4"),
]
LANES = 2


def newest_run(prefix, since):
    runs = [r for r in glob.glob(os.path.join(ROOT, "runs", prefix + "*")) if os.path.getmtime(r) >= since]
    return max(runs, key=os.path.getmtime) if runs else None


def run_lane(steps, env, logs, done, failed, lock):
    for title, cmd, prefix in steps:
        log = os.path.join(logs, prefix + ".log")
        with lock:
            print(f"=== start: {title}\n$ {' '.join(['python'] + cmd[1:])}   (output: {os.path.relpath(log, ROOT)})",
                  flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        with open(log) as f:
            tail = [line.rstrip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-4:]
        with lock:
            print(f"=== {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f} s: {title}")
            print("\n".join("    " + line for line in tail), flush=True)
            if rc:
                failed.append(title)
                return
            done.append((title, newest_run(prefix, t0), time.time() - t0))


def write_pictures(done):
    """runs/demo/: the pictures of the README (docs/ holds the committed copies): each model's final grid, its
    curves, and a few frames of the dream (real | dream)."""
    from PIL import Image
    out = os.path.join(ROOT, "runs", "demo")
    os.makedirs(out, exist_ok=True)
    for _, run, _ in done:
        if not run:
            continue
        kind = "-".join(os.path.basename(run).split("-")[:2])  # e.g. ddpm-shapes, diamond-Breakout
        grids = sorted(glob.glob(os.path.join(run, "samples_*.png")))
        if grids:
            Image.open(grids[-1]).save(os.path.join(out, f"{kind}-samples.png"))
        if os.path.exists(os.path.join(run, "curves.png")):
            Image.open(os.path.join(run, "curves.png")).save(os.path.join(out, f"{kind}-curves.png"))
        if os.path.exists(os.path.join(run, "dream.gif")):
            gif, frames = Image.open(os.path.join(run, "dream.gif")), []
            for k in (6, 14, 30, 60):  # 2, 10, 26 and 56 imagined steps after the 4 real context frames
                gif.seek(min(gif.n_frames - 1, k))
                frames.append(gif.convert("RGB"))
            strip = Image.new("RGB", (frames[0].width, sum(f.height for f in frames)), "white")
            for i, f in enumerate(frames):
                strip.paste(f, (0, i * f.height))
            strip.save(os.path.join(out, f"{kind}-dream-frames.png"))
    return out


def main():
    t_start = time.time()
    logs = os.path.join(ROOT, "runs", "demo-logs")
    os.makedirs(logs, exist_ok=True)
    threads_per_lane = max(1, (os.cpu_count() or 2) // LANES)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_lane))
    done, failed, lock, lanes = [], [], threading.Lock(), []
    for lane in range(LANES):
        steps = [(t, c, p) for l, t, c, p in STEPS if l == lane and os.path.exists(os.path.join(ROOT, c[1]))]
        lanes.append(threading.Thread(target=run_lane, args=(steps, env, logs, done, failed, lock)))
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    print(f"\n=== demo finished in {time.time() - t_start:.0f} s; outputs:")
    for title, run, secs in done:
        pictures = sorted(glob.glob(os.path.join(run or "", "*.png")) + glob.glob(os.path.join(run or "", "*.gif")))
        print(f"- {title} ({secs:.0f} s): {os.path.relpath(run, ROOT) if run else '?'}")
        for p in pictures[-3:]:
            print(f"    {os.path.relpath(p, ROOT)}")
    print(f"pictures for the README: {os.path.relpath(write_pictures(done), ROOT)}/")
    if failed:
        sys.exit(f"demo: {', '.join(failed)} failed; see runs/demo-logs/")


if __name__ == "__main__":
    main()
