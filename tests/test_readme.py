"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)
    assert "test accuracy" in capsys.readouterr().out
    # the distilled student really learned the task (chance is 0.5)
    assert scope["result"].test > 0.8


def test_readme_results_are_generated_from_the_stores():
    """Every results block of the README is exactly what ``talkingmodels report DIR --readme``
    generates from the committed store: no number in it is typed by hand."""
    from talkingmodels.report import README_END, README_START, readme_block

    text = README.read_text()
    names = re.findall(re.escape(README_START).replace(r"\{\}", "(.+?)"), text)
    assert names, "the README has no generated results block"
    for name, again in names:
        assert name == again
        start, end = README_START.format(name, name), README_END.format(name)
        block = text.split(start, 1)[1].split(end, 1)[0].strip("\n")
        assert block == readme_block(README.parent / name), f"the README's {name} block is stale"
