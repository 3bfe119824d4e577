"""Filesystem steps shared by the checkpoint writer, the model store and the merged export (no heavy
imports; service/objectstore.py takes the same steps itself, as `service` may not import `qlora_core`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: Path, final: Path, aside: Path) -> None:
    """Rename the finished directory `tmp` to `final`, replacing an existing `final`.

    An existing `final` is first renamed to `aside` (a name its readers ignore) and removed after
    `tmp` took its place, so `final`, when it exists, is always a complete directory; only the
    instant between the two renames finds no `final`.
    """
    if final.exists():
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
