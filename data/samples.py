"""A small real-text corpus for tests and benchmarks: a few standard-library packages' `.py` files.

The default corpus (`data.sources`, source "stdlib") is the whole standard library; tests and
benchmarks need something smaller that still is real text and is present wherever Python is.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

SAMPLE_PACKAGES = ("json", "email", "urllib", "http", "logging", "concurrent")


def copy_stdlib_sample(directory: Path, packages: tuple[str, ...] = SAMPLE_PACKAGES) -> Path:
    """Copy the `.py` files of `packages` (standard-library package names) into `directory`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in packages:
        for src in sorted((stdlib / name).rglob("*.py")):
            dst = Path(directory) / name / src.relative_to(stdlib / name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return Path(directory)
