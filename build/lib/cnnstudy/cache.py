"""cnnstudy's own cache folder (decoded data, built CPU kernels), and whether a file in it
can be trusted. Plain Python."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def cache_root() -> Path:
    """$CNNSTUDY_CACHE, else $XDG_CACHE_HOME/cnnstudy or ~/.cache/cnnstudy."""
    if os.environ.get("CNNSTUDY_CACHE"):
        return Path(os.environ["CNNSTUDY_CACHE"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().resolve() / "cnnstudy"


def untrusted(path: Path) -> str | None:
    """Why `path` (a file or folder) could have been written by another user, or None: it
    must belong to this user (or root) and allow no writes by group or others. Code loaded
    from the cache runs in this process: a file someone else could write is refused."""
    try:
        st = path.lstat()
    except OSError as err:
        return f"{path}: {err.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid not in (os.geteuid(), 0):
        return f"{path} belongs to user id {st.st_uid}, not to this user ({os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None
