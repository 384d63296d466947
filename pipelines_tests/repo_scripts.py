"""The repository's scripts (`training/`, `benchmarks/`) loaded as modules: they are not part of the package."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, folder: str = "training"):
    """Executes `<repository>/<folder>/<name>.py` afresh and returns it as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
