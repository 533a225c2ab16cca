"""`make demo`: a short CPU run of every model on offline data, writing pictures under runs/.

Each step is the same command line a user would type; the demo only strings them together and
prints where the outputs went. Budget: under 10 minutes on 2 CPU cores.
"""
import glob
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

STEPS = [
    ("DDPM, tiny U-Net on shapes", [PY, "ddpm.py", "train", "--preset", "tiny", "--dataset", "shapes"], "ddpm-shapes"),
    ("DiT, tiny class-conditional transformer on shapes", [PY, "dit.py", "--preset", "tiny", "--dataset", "shapes"], "dit-shapes"),
    ("DIAMOND, tiny world model + agent on real Breakout", [PY, "diamond.py", "--game", "Breakout-v5", "--preset", "tiny"], "diamond-Breakout"),
]


def newest_run(prefix):
    runs = sorted(glob.glob(os.path.join(ROOT, "runs", prefix + "*")), key=os.path.getmtime)
    return runs[-1] if runs else None


def main():
    done = []
    for title, cmd, prefix in STEPS:
        if not os.path.exists(os.path.join(ROOT, cmd[1])):
            continue
        print(f"\n=== {title}\n$ {' '.join(['python'] + cmd[1:])}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        done.append((title, newest_run(prefix), time.time() - t0))
    print("\n=== demo finished; outputs:")
    for title, run, secs in done:
        pictures = sorted(glob.glob(os.path.join(run or "", "*.png")) + glob.glob(os.path.join(run or "", "*.gif")))
        print(f"- {title} ({secs:.0f} s): {os.path.relpath(run, ROOT) if run else '?'}")
        for p in pictures[-3:]:
            print(f"    {os.path.relpath(p, ROOT)}")


if __name__ == "__main__":
    main()
