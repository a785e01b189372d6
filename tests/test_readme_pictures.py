"""The README's pictures: README.md shows every file of docs/pictures/, every picture it links exists, and
scripts/readme_pictures.py (`make pictures`) makes exactly the files that are there, each with the command the
README gives for it. Reads files only; nothing is drawn."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PICTURES = ROOT / "docs" / "pictures"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
MAX_TOTAL_BYTES = 1_500_000


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("readme_pictures", ROOT / "scripts" / "readme_pictures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _linked(text: str) -> list[str]:
    """The images README.md links under docs/pictures/, in order."""
    return [link for link in IMAGE_LINK.findall(text) if link.startswith("docs/pictures/")]


def test_readme_links_resolve():
    links = _linked(README.read_text())
    assert links, "README.md shows no picture from docs/pictures/"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README.md links pictures that do not exist: {missing}"
    assert len(set(links)) == len(links), f"README.md shows a picture twice: {links}"


def test_readme_shows_every_picture():
    on_disk = {p.name for p in PICTURES.iterdir()}
    shown = {Path(link).name for link in _linked(README.read_text())}
    assert on_disk - shown == set(), f"docs/pictures/ files the README does not show: {sorted(on_disk - shown)}"


def test_script_list_matches_directory(script):
    listed = [p.name for p in script.PICTURES]
    assert len(set(listed)) == len(listed), f"scripts/readme_pictures.py lists a picture twice: {listed}"
    on_disk = {p.name for p in PICTURES.iterdir()}
    assert set(listed) == on_disk, (f"scripts/readme_pictures.py makes {sorted(set(listed))}, docs/pictures/ holds "
                                    f"{sorted(on_disk)}: run `make pictures`")
    assert all(p.job in script.JOBS for p in script.PICTURES)


def test_readme_gives_each_picture_its_command(script):
    """Each picture's command, as the script runs it, is in the README next to that picture (the prompt as "$P")."""
    text = README.read_text()
    assert f"P={script.shlex.quote(script.LM_PROMPT)}" in text
    for pic in script.PICTURES:
        at = text.index(f"docs/pictures/{pic.name}")
        before = text[text.rfind("![", 0, at) - 600:at]
        assert script.command_line(pic.job) in before, f"README.md: no `{script.command_line(pic.job)}` above {pic.name}"


def test_pictures_are_small_pngs(script):
    total = 0
    for p in sorted(PICTURES.iterdir()):
        with Image.open(p) as im:
            assert im.format == "PNG", p.name
            assert 300 <= im.width <= script.WIDTH and 200 <= im.height <= 1400, f"{p.name} is {im.size}"
        total += p.stat().st_size
    assert total < MAX_TOTAL_BYTES, f"docs/pictures/ holds {total:,} bytes (limit {MAX_TOTAL_BYTES:,})"


def test_the_checks_can_fail():
    assert _linked("![a](docs/pictures/a.png) ![b](elsewhere/b.png) ![c](docs/pictures/c.png)") == [
        "docs/pictures/a.png", "docs/pictures/c.png"]
    assert _linked("no pictures here, only [a link](docs/pictures/a.png)") == []
