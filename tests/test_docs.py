"""The documentation stays true: every setting is documented, every Python block compiles,
and the README's commands exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from classify_app.settings import Settings

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_setting_is_documented_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    for field in dataclasses.fields(Settings):
        variable = f"CLASSIFY_{field.name.upper()}"
        assert variable in readme, f"{variable} is missing from the README's settings table"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_python_blocks_compile(document: Path) -> None:
    for block in re.findall(r"```python\n(.*?)```", document.read_text(), flags=re.S):
        compile(block, str(document), "exec")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_json_examples_parse(document: Path) -> None:
    import json

    for block in re.findall(r"```json\n(.*?)```", document.read_text(), flags=re.S):
        json.loads(block)


def test_the_documented_files_exist() -> None:
    for document in DOCUMENTS:
        for path in re.findall(
            r"`((?:agents|models|tables|classify_app|bench|examples|deploy|scripts|docs)/[\w./-]+)`",
            document.read_text(),
        ):
            assert (ROOT / path).exists(), f"{document.name} names {path}, which does not exist"
