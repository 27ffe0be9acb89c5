"""Moving a finished file into a folder without ever overwriting what is already there."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def _candidates(target: Path) -> list[Path]:
    names = [target]
    names += [target.with_name(f"{target.stem}-{n}{target.suffix}") for n in range(1, 1000)]
    return names


def move_into(src: Path, folder: Path, relative: Path | None = None) -> Path:
    """Move `src` to `folder/relative` (default: its name), adding -1, -2 … on a clash."""
    target = folder / (relative if relative is not None else Path(src.name))
    target.parent.mkdir(parents=True, exist_ok=True)
    for candidate in _candidates(target):
        try:
            os.link(src, candidate)  # atomic and refuses to replace an existing name
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
            try:
                with open(src, "rb") as source, open(candidate, "xb") as sink:
                    shutil.copyfileobj(source, sink, 1024 * 1024)
                    sink.flush()
                    os.fsync(sink.fileno())
            except FileExistsError:
                continue
            shutil.copystat(src, candidate)
        os.unlink(src)
        return candidate
    raise FileExistsError(errno.EEXIST, "no free name left", str(target))
