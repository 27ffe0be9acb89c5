"""Where a finished file goes (kept, moved or deleted), never overwriting what is there."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import structlog

from tripo_watchd.settings import PipelineSettings

log = structlog.get_logger(__name__)


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


class Placement:
    """`[pipeline]`'s after_upload and rejected_dir, applied to one finished file."""

    def __init__(self, settings: PipelineSettings, roots: tuple[Path, ...] = ()) -> None:
        self._settings = settings
        self._roots = roots

    @property
    def moves_files(self) -> bool:
        """Whether any outcome takes a file out of the watched folder."""
        return self._settings.after_upload != "keep" or self._settings.rejected_dir is not None

    def uploaded(self, path: Path) -> None:
        """Keep, move into done_dir or delete an uploaded file, as configured."""
        choice = self._settings.after_upload
        try:
            if choice == "delete":
                path.unlink(missing_ok=True)
                log.info("file.deleted", path=str(path))
            elif choice == "move" and self._settings.done_dir is not None:
                moved = move_into(path, self._settings.done_dir, self._relative(path))
                log.info("file.moved", path=str(path), to=str(moved))
        except OSError as exc:
            log.error("file.after_upload_failed", path=str(path), action=choice, reason=str(exc))

    def rejected(self, path: Path) -> None:
        """Move a rejected file into rejected_dir, if one is configured."""
        folder = self._settings.rejected_dir
        if folder is None or not path.exists():
            return
        try:
            moved = move_into(path, folder, self._relative(path))
            log.info("file.moved", path=str(path), to=str(moved))
        except OSError as exc:
            log.error("file.move_rejected_failed", path=str(path), reason=str(exc))

    def _relative(self, path: Path) -> Path | None:
        for root in self._roots:
            if path.is_relative_to(root):
                return path.relative_to(root)
        return None
