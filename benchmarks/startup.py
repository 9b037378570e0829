"""Start-up time of the command line, as a ratio to ``python -c "import torch"`` measured in the same run.

Every row is the median wall time of fresh processes (nothing shared between them but the OS file cache):

- ``python -c "import torch"``: the baseline, what any command that imports torch first pays;
- ``ovdense --help``, ``ovdense list-methods``, ``ovdense --version``, an argument error: should not load torch;
- ``ovdense segment`` of one image with the tiny random test model (``ovdense-test-vit``), text cache off:
  the time to a first segmented image, which does need torch and open_clip.

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(cmd: list[str], repeats: int, env: dict, expect: int = 0) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
        if proc.returncode != expect:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="processes per row (median)")
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ovdense = [sys.executable, "-m", "ovdense"]
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        image = Path(tmp) / "photo.png"
        Image.new("RGB", (500, 375), (120, 160, 200)).save(image)
        segment = [*ovdense, "segment", str(image), "--classes", "sky; person; tree", "--model", "ovdense-test-vit"]
        segment += ["--text-cache", "off", "--out", str(Path(tmp) / "out"), "--overwrite"]
        rows = [
            ('python -c "import torch"', [sys.executable, "-c", "import torch"], 0),
            ("ovdense --help", [*ovdense, "--help"], 0),
            ("ovdense --version", [*ovdense, "--version"], 0),
            ("ovdense list-methods", [*ovdense, "list-methods"], 0),
            ("ovdense segment (argument error)", [*ovdense, "segment", "x.jpg", "--method", "nope", "--out", "o"], 2),
            ("ovdense segment (a value out of range)", [*ovdense, "segment", "x.jpg", "--prob-thd", "2"], 2),
            ("ovdense segment, 1 image, tiny model", segment, 0),
        ]
        wall(rows[0][1], 1, env)  # warm the file cache for torch's shared libraries
        results = [(name, wall(cmd, args.repeats, env, expect)) for name, cmd, expect in rows]
    base = results[0][1]
    print(f"median of {args.repeats} fresh processes, Python {sys.version.split()[0]}\n")
    print("| command | wall time (s) | vs `import torch` |")
    print("|---|---|---|")
    for name, seconds in results:
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
