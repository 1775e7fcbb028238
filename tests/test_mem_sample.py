"""benchmarks/mem_sample.py --tree: memory summed over a command and its descendants."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mem_sample.py"
# a child that holds MB megabytes (every page touched) for a second
HOLD = "import mmap, time; m = mmap.mmap(-1, {mb} << 20); m.write(b'x' * ({mb} << 20)); time.sleep(1.5)"


def test_tree_sums_the_descendants():
    children = " & ".join(f"{sys.executable} -c \"{HOLD.format(mb=mb)}\"" for mb in (300, 200))
    done = subprocess.run([sys.executable, str(SCRIPT), "--tree", "--every", "0.05", "--", "bash", "-c",
                           f"{children}; wait"], capture_output=True, text=True, check=True)
    peak = float(re.search(r"Pss ([\d.]+) GiB", done.stdout).group(1))
    assert peak >= 0.48, done.stdout  # both children's 500 MB at once: 0.49 GiB, plus their interpreters
