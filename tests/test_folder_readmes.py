"""tools/, scripts/, bench/ and experiments/ each have a README that names every file in the
folder, and examples/ holds only what a user copies (the research pipeline is experiments/)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["tools", "scripts", "bench", "experiments"])
def test_every_file_is_named_in_its_folders_readme(folder):
    readme = (REPO / folder / "README.md").read_text()
    files = sorted(p.name for p in (REPO / folder).iterdir()
                   if p.is_file() and p.name != "README.md" and not p.name.startswith("."))
    assert files
    missing = [f for f in files if f"`{f}`" not in readme and f"/{f}`" not in readme]
    assert missing == [], f"{folder}: files its README does not name: {missing}"


def test_examples_hold_what_a_user_copies():
    names = sorted(p.name for p in (REPO / "examples").iterdir()
                   if not p.name.startswith(".") and p.name != "__pycache__")
    assert names == ["configs", "train_icpo.py", "trl_icpo.py"]
