"""Private permissions for the home folder: its databases hold MRNs and accession numbers.

Everything the project writes under ``$HER2LOW_HOME`` is readable by its owner (and, for
operators' tooling, its group) and never by other users: files 0640 at most, folders 0750 at
most. :func:`private_umask` makes that the default of a process; the creators of databases, the
queue and DICOM files also pass the modes explicitly, so an inherited umask cannot widen them;
:func:`check_private` tightens, loudly, what an older version or a copy left world-readable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

#: Mode of files the project creates (databases, queue, DICOM files, logs): no access for others.
FILE_MODE = 0o640
#: Mode of folders the project creates.
FOLDER_MODE = 0o750
#: Permission bits no file or folder under the home may have (group write, anything for others).
FORBIDDEN = stat.S_IWGRP | stat.S_IRWXO
_UMASK = 0o027
_OURS = {"dicom", "secrets", "logs", "demo", "outputs", "models", "her2low.toml"}
_DB_SUFFIXES = (".db", ".db-wal", ".db-shm", ".db-journal")


def private_umask() -> int:
    """Make new files 0640 and folders 0750 in this process (and its children); returns the
    previous umask."""
    return os.umask(_UMASK)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0750 folders; existing folders are left as
    they are (they may be shared, like /tmp): :func:`check_private` is the one that tightens."""
    path = Path(path)
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # created meanwhile by another process
            folder.mkdir(mode=FOLDER_MODE)
    return path


def create_private_file(path: Path) -> Path:
    """Create an empty ``path`` as 0640 unless it exists (before SQLite opens it: SQLite gives
    its -wal and -shm files the database file's mode)."""
    path = Path(path)
    ensure_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return path
    os.close(fd)
    return path


def _tighten(path: Path) -> bool:
    """Remove the forbidden bits from ``path``; True if there were any."""
    try:
        mode = stat.S_IMODE(path.lstat().st_mode)
    except OSError:
        return False
    if path.is_symlink() or not mode & FORBIDDEN:
        return False
    try:
        os.chmod(path, mode & ~FORBIDDEN)
    except OSError as exc:  # not ours (a shared mount): say so, do not stop the start-up
        log.warning(
            "readable by other users and cannot be tightened",
            extra={"path": str(path), "mode": oct(mode), "err": exc.strerror},
        )
        return False
    return True


def check_private(home: Path, *, extra: tuple[Path, ...] = ()) -> list[Path]:
    """Tighten the home folder, the databases and folders the project keeps in it (and the
    files in ``secrets/`` and ``logs/``), and ``extra`` paths (such as a DICOM store kept elsewhere); log a warning
    naming each one changed and return them.

    Not recursive: a closed folder protects everything below it, and the DICOM store may hold
    millions of files.
    """
    home = Path(home)
    if not home.exists():
        return []
    # Only what the project puts there: a home set to a shared folder keeps its other files.
    ours = [p for p in sorted(home.iterdir()) if p.name in _OURS or p.name.endswith(_DB_SUFFIXES)]
    candidates = [home, *ours, *extra]
    for folder in (home / "secrets", home / "logs"):  # small, and read by other tools
        if folder.is_dir():
            candidates.extend(sorted(folder.iterdir()))
    changed = [p for p in candidates if p.exists() and _tighten(p)]
    if changed:
        log.warning(
            "files under the home were readable by other users; permissions tightened",
            extra={"paths": ", ".join(str(p) for p in changed), "count": len(changed)},
        )
    return changed
