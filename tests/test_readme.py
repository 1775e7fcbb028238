"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(capsys, tmp_path, monkeypatch):
    """Both library examples (plain PyTorch, Hugging Face) through distill and DataLoaders."""
    monkeypatch.chdir(tmp_path)  # the first one saves its student in the working directory
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README has no python examples"
    accuracies = []
    for block in blocks:
        assert "distill(" in block and "DataLoader(" in block
        scope: dict = {}
        exec(compile(block, str(README), "exec"), scope)
        accuracies.append(scope["result"].test)
    assert capsys.readouterr().out.count("test accuracy") == len(blocks)
    # the distilled students really learned their tasks (chance is 0.5)
    assert min(accuracies) > 0.8, accuracies
    assert (tmp_path / "distilled-student" / "model.safetensors").is_file()


ROOT = README.parent
DOCS = ("README.md", "docs/experiments.md")  # the Markdown files with generated results blocks


@pytest.mark.parametrize("doc", DOCS)
def test_results_blocks_are_generated_from_the_stores(doc):
    """Every results block is exactly what ``talkingmodels report DIR --readme DOC``
    generates from the committed store: no number in it is typed by hand."""
    from talkingmodels.report import README_START, readme_block, readme_markers

    text = (ROOT / doc).read_text()
    pattern = re.escape(README_START)
    for field in ("{store}", "{doc}"):
        pattern = pattern.replace(re.escape(field), "(.+?)")
    found = re.findall(pattern, text)
    assert found, f"{doc} has no generated results block"
    for store, again, named in found:
        assert store == again and named == doc, f"{doc}: a marker of {store} names another command"
        start, end = readme_markers(doc, store)
        block = text.split(start, 1)[1].split(end, 1)[0].strip("\n")
        assert block == readme_block(ROOT / store), f"{doc}'s {store} block is stale"


def test_update_readme_regenerates_only_its_block(tmp_path, monkeypatch):
    from talkingmodels.errors import UserError
    from talkingmodels.report import readme_block, readme_markers, update_readme

    monkeypatch.chdir(ROOT)
    start, end = readme_markers("out.md", "results/movielens")
    doc = tmp_path / "out.md"
    doc.write_text(f"before\n{start}\nstale\n{end}\nafter\n")
    with pytest.raises(UserError, match="has no block"):
        update_readme(doc, "results/movielens")  # the markers name out.md, not this path
    doc.write_text(f"before\n{readme_markers(doc.as_posix(), 'results/movielens')[0]}\nstale\n{end}\nafter\n")
    update_readme(doc, "results/movielens")
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith(f"{end}\nafter\n") and "stale" not in text
    assert readme_block("results/movielens") in text
