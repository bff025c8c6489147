"""Every ```python block of the tour (docs/tour/*.md) runs, in order, one namespace per chapter.
The blocks carry their own asserts, so a chapter whose claims stop being true fails here."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAPTERS = sorted(glob.glob(os.path.join(ROOT, "docs", "tour", "*.md")))


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", open(path, encoding="utf-8").read(), re.S)


def test_tour_exists_and_is_linked_from_readme():
    assert len(CHAPTERS) >= 3
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "docs/tour/" in readme


@pytest.mark.parametrize("chapter", [os.path.basename(c) for c in CHAPTERS])
def test_chapter_snippets_run(chapter, monkeypatch):
    monkeypatch.chdir(ROOT)  # snippets read results files relative to the repository root
    blocks = python_blocks(os.path.join(ROOT, "docs", "tour", chapter))
    namespace = {"__name__": f"tour_{chapter}"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{chapter}[block {i}]", "exec"), namespace)
        except Exception as err:  # name the chapter and the block
            raise AssertionError(f"{chapter}, python block {i} failed: {err!r}") from err


def test_every_picture_the_tour_shows_has_a_maker():
    maker = open(os.path.join(ROOT, "docs", "figures", "make_figures.py"), encoding="utf-8").read()
    for chapter in CHAPTERS:
        for png in re.findall(r"figures/(\w+)\.png", open(chapter, encoding="utf-8").read()):
            assert f'"{png}"' in maker, f"{os.path.basename(chapter)} shows {png}.png, which make_figures.py does not draw"
