"""Run the README's first library example (plain PyTorch, DataLoaders, distill) in the current
interpreter: CI calls it from a fresh environment holding only the core requirements."""

import os
import re
import sys
import tempfile
from pathlib import Path

readme = Path(__file__).resolve().parents[1] / "README.md"
block = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)[0]
os.chdir(tempfile.mkdtemp())
exec(compile(block, str(readme), "exec"), {})
heavy = sorted(m for m in ("pandas", "matplotlib", "scipy", "transformers", "tensorboard")
               if m in sys.modules)
assert not heavy, f"the core example imported {heavy}"
