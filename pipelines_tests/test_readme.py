"""The README's Python snippets run as written (from the repository root)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def snippet(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


@pytest.mark.parametrize("section", ["PixelHDM", "Analytic denoisers"])
def test_readme_snippet_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = snippet(section).replace('"analytic.png"', repr(str(tmp_path / "analytic.png")))
    namespace = {}
    exec(compile(code, f"README {section}", "exec"), namespace)
    if section == "PixelHDM":
        assert namespace["image"].size == (32, 32)  # the trained resolution, not 512
    else:
        assert len(namespace["out"].images) == 8 and namespace["out"].images[0].size == (32, 32)
