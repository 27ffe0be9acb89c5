"""Which filesystem a path lives on (/proc/self/mountinfo), and the inotify limits in force."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
INOTIFY_SYSCTL = Path("/proc/sys/fs/inotify")

# Filesystems where writes by other hosts (or by a userspace daemon) never reach inotify.
REMOTE_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "gfs2",
        "ocfs2",
        "beegfs",
        "davfs",
        "ncpfs",
        "coda",
        "fuse",
        "virtiofs",
        "vboxsf",
    }
)

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: where a filesystem is mounted and its type."""

    mount_point: str
    fs_type: str


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    """Parse mountinfo text (proc(5) format); malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            mounts.append(Mount(_unescape(fields[4]), fields[sep + 1]))
        except (ValueError, IndexError):
            continue
    return tuple(mounts)


def read_mounts(source: Path = MOUNTINFO) -> tuple[Mount, ...]:
    """The current mount table, or nothing when it cannot be read (not Linux)."""
    try:
        return parse_mountinfo(source.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ()


def fs_type_for(path: Path, mounts: tuple[Mount, ...]) -> str | None:
    """The type of the filesystem holding `path`: the mount with the longest matching prefix."""
    target = os.path.realpath(path)
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # Later lines win on ties: a mount stacked over another one hides it.
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best.fs_type if best else None


def is_remote_fs(fs_type: str | None) -> bool:
    """True for network and FUSE filesystems, where only polling sees every change."""
    if fs_type is None:
        return False
    return fs_type in REMOTE_FS_TYPES or fs_type.startswith("fuse.")


def inotify_limit(name: str, sysctl_dir: Path = INOTIFY_SYSCTL) -> int | None:
    """The current value of `fs.inotify.<name>` (e.g. max_user_watches), or None if unreadable."""
    try:
        return int((sysctl_dir / name).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
