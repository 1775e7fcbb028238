"""The README and the docs: short front door, every Python example runs as written, every
relative link resolves, and every generated results block equals its store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
ROOT = README.parent
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
EXAMPLES = [(page, index, block) for page in PAGES
            for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]


def test_the_readme_is_a_short_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert text.startswith("# talkingmodels\n") and "bash setup.sh" in text.split("##")[0]


@pytest.mark.parametrize("page,index,block", EXAMPLES,
                         ids=[f"{page.relative_to(ROOT)}-{index}" for page, index, _ in EXAMPLES])
def test_python_examples_run(page, index, block, capsys, tmp_path, monkeypatch):
    """Every example runs; the library examples (plain PyTorch, Hugging Face, through
    distill and DataLoaders) really distil."""
    monkeypatch.chdir(tmp_path)  # an example may save its student in the working directory
    scope: dict = {}
    exec(compile(block, str(page), "exec"), scope)
    if "distill(" in block:
        assert "DataLoader(" in block
        if 'task="causal-lm"' in block:  # a causal LM: its test perplexity (lower is better)
            assert "test perplexity" in capsys.readouterr().out
            assert scope["result"].test < 3.0  # learned the texts' form (uniform: 49,152)
        else:
            assert "test accuracy" in capsys.readouterr().out
            assert scope["result"].test > 0.8  # the distilled student really learned (chance is 0.5)


def test_the_custom_task_example_runs_through_the_command_line(tmp_path, monkeypatch):
    """docs/cli.md's own model, data and method from YAML, run as the page says."""
    import csv
    import sys

    from talkingmodels import cli

    page = (ROOT / "docs" / "cli.md").read_text()
    for name in ("mydistill.py", "mydistill.yaml"):
        block = next(b for b in re.findall(r"```\w+\n(.*?)```", page, flags=re.S)
                     if b.startswith(f"# {name}\n"))
        (tmp_path / name).write_text(block)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mydistill", raising=False)
    assert cli.main(["run", "mydistill.yaml", "--out", "runs/mydistill"]) == 0
    with open(tmp_path / "runs" / "mydistill" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({r["method"] for r in rows}) == ["mydistill:LogitMSE", "scratch", "td"]
    assert len(rows) == 6 and all(r["status"] == "ok" and float(r["value"]) > 0.8 for r in rows)
    assert all(r["higher_is_better"] == "True" for r in rows)
    assert "## custom / default" in (tmp_path / "runs" / "mydistill" / "report.md").read_text()
    assert cli.main(["export", "runs/mydistill", "default__td__0", "--out", "td.safetensors"]) == 0


def test_the_readme_and_the_library_page_have_examples():
    pages = {page.name for page, _, _ in EXAMPLES}
    assert {"README.md", "library.md"} <= pages


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


DOCS = ("docs/results.md", "docs/experiments.md")  # the Markdown files with generated results blocks


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


RESULTS_TOTAL = 10 * 10**6  # bytes: what every clone carries of results/
FILE_LIMIT = 10**6  # bytes: any one tracked file under results/


def tracked_results() -> dict[str, int]:
    """Tracked files under results/ (git's index) and their sizes on disk."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z", "results"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return {name: (ROOT / name).stat().st_size for name in names if name and (ROOT / name).is_file()}


def test_results_stay_small():
    """results/ holds tables, curves and plots, each file under 1 MB (curves: a file a
    setting); student weights are rebuilt by the store's command (docs/cli.md), not
    committed, except small ones."""
    sizes = tracked_results()
    heavy = {name: size for name, size in sizes.items() if size > FILE_LIMIT}
    assert not heavy, f"files over {FILE_LIMIT} bytes tracked under results/: {sorted(heavy)[:5]}"
    assert sum(sizes.values()) <= RESULTS_TOTAL, f"results/ tracks {sum(sizes.values())} bytes"
