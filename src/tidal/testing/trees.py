"""Compare two directory trees file by file: type, mode, owner, content, links, xattrs, devices."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

IGNORED_TOP = {"lost+found"}


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    """Path -> everything the image must reproduce; hard links as groups of paths."""
    out: dict[str, tuple[object, ...]] = {}
    by_inode: dict[int, list[str]] = {}
    entries = [(".", root)]
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in IGNORED_TOP]
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            entries.append((str(full.relative_to(root)), full))
    for rel, full in entries:
        st = os.lstat(full)
        kind = stat.S_IFMT(st.st_mode)
        extra: object = None
        if stat.S_ISREG(kind):
            extra = hashlib.sha256(full.read_bytes()).hexdigest()
            if st.st_nlink > 1:
                by_inode.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(kind):
            extra = os.readlink(full)
        elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
        xattrs = (
            {}
            if stat.S_ISLNK(kind)
            else {
                n: os.getxattr(full, n, follow_symlinks=False)
                for n in os.listxattr(full, follow_symlinks=False)
                if not n.startswith("security.selinux")
            }
        )
        mtime = None if stat.S_ISDIR(kind) else int(st.st_mtime)
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra, xattrs, mtime)
    for group in by_inode.values():
        for rel in group:
            out[rel] = (*out[rel], tuple(sorted(group)))
    return out


def diff_trees(expected: Path, actual: Path) -> list[str]:
    """Human-readable differences (empty when the trees match)."""
    a, b = describe(expected), describe(actual)
    problems = [f"missing {p}" for p in sorted(a.keys() - b.keys())]
    problems += [f"unexpected {p}" for p in sorted(b.keys() - a.keys())]
    problems += [
        f"{p}: expected {a[p]}, got {b[p]}" for p in sorted(a.keys() & b.keys()) if a[p] != b[p]
    ]
    return problems


def make_busybox_rootfs(dest: Path) -> Path:
    """A minimal rootfs at ``dest``: static busybox, its applet links, /etc/passwd and group.

    Built once (a complete tree is reused), into a sibling first and renamed into place, so a
    concurrent or interrupted build never leaves a half tree behind. Raises
    :class:`FileNotFoundError` when busybox-static is not installed. Tests and benchmarks build
    the same tree through this one function.
    """
    import shutil

    from tidal import proc

    if (dest / "bin" / "sh").exists() and (dest / "etc" / "passwd").exists():
        return dest
    busybox = shutil.which("busybox")
    if busybox is None:
        raise FileNotFoundError("needs busybox-static (apt-get install busybox-static)")
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bin").mkdir(parents=True)
    shutil.copy2(busybox, tmp / "bin" / "busybox")
    proc.run(["chroot", tmp, "/bin/busybox", "--install", "-s", "/bin"], what="installing busybox")
    for d in ("etc", "proc", "sys", "dev", "tmp", "root", "var/www"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    (tmp / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp / "etc" / "group").write_text("root:x:0:\n")
    if dest.exists():  # an incomplete tree of an older builder
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return dest
