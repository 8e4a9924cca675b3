"""The documentation stays true: every setting is documented, every Python block compiles,
and the README's commands exist."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from classify_app import __version__
from classify_app.settings import Settings
from classify_app.vocabulary import ImageReason, Status, reason_table

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


def test_the_reason_table_is_the_vocabulary() -> None:
    schemas = (ROOT / "docs" / "schemas.md").read_text()
    block = re.search(r"<!-- reasons:start -->\n(.*?)\n<!-- reasons:end -->", schemas, re.S)
    assert block is not None, "docs/schemas.md has no generated reason table"
    assert block[1] == reason_table(), "run: python -m classify_app.vocabulary"


# Calls whose first argument is a reason code: it must come from the vocabulary, never be a
# string typed again where it is raised.
REASON_CALLS = {"ImageRejected", "InvalidEvent"}


def test_reason_codes_are_never_typed_where_they_are_raised() -> None:
    literal = []
    for path in sorted(ROOT.glob("[acmt]*/**/*.py")):
        if path.parts[len(ROOT.parts)] not in {"classify_app", "agents", "models", "tables"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            arguments = node.args[:1] if name in REASON_CALLS else []
            if name in {"error", "send"} and len(node.args) >= 3:
                arguments = node.args[
                    1:3
                ]  # error(view, status, code, ...), send(event, reason, ...)
            literal += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for argument in arguments
                if isinstance(argument, ast.Constant | ast.JoinedStr)
                and isinstance(getattr(argument, "value", ""), str)
            ]
    assert literal == []


def test_the_openapi_document_speaks_the_vocabulary() -> None:
    from classify_app.web.openapi import openapi_document

    document = openapi_document(Settings(max_images_per_ad=7))
    schemas = document["components"]["schemas"]
    assert schemas["AdEvent"]["properties"]["images"]["maxItems"] == 7
    assert schemas["AdResult"]["properties"]["status"]["enum"] == [str(s) for s in Status]
    reasons = schemas["ImageError"]["properties"]["reason"]["anyOf"]
    assert set(reasons[0]["enum"]) == {str(reason) for reason in ImageReason}
    assert re.fullmatch(reasons[1]["pattern"], "http_404")
    assert document["info"]["version"] == __version__
