"""`make demo`: a short CPU run of every model on offline data, writing pictures under runs/.

Each step is the same command line a user would type; the demo only strings them together and
prints where the outputs went. Budget: under 10 minutes on 2 CPU cores. The tiny models are too small
for a second thread to help much (their small convolutions and matmuls barely scale), so the demo runs
two lanes side by side, one core each: DDPM in one, DiT then DIAMOND in the other. Each command's
output goes to runs/demo-logs/; its last lines are printed when it ends.
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
    if failed:
        sys.exit(f"demo: {', '.join(failed)} failed; see runs/demo-logs/")


if __name__ == "__main__":
    main()
