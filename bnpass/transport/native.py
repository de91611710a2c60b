"""The C half of the shared-memory transport (``shm.c``): built at first use, loaded with ctypes.

Built with the system C compiler (``$CC``, else ``cc``: the compiler Inductor's CPU backend already
needs) into ``$BNPASS_CACHE_DIR`` (default ``~/.cache/bnpass``), under a name keyed by the source's
hash, so that a new source is rebuilt and ranks that build at the same time each write their own
temporary file and rename it into place. No torch headers: the build takes well under a second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["library", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("shm.c")


def _cache_dir() -> Path:
    return Path(os.environ.get("BNPASS_CACHE_DIR") or Path.home() / ".cache" / "bnpass")


def _build() -> Path:
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    target = _cache_dir() / f"bnpass_shm_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    cmd = [compiler, "-O2", "-std=gnu11", "-shared", "-fPIC", str(_SOURCE), "-o", tmp, "-lrt"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    vp, i, l, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p
    for name, res, args in (
        ("bnshm_size", l, [i, l]),
        ("bnshm_create", vp, [cp, i, l]),
        ("bnshm_open", vp, [cp, i, l]),
        ("bnshm_unlink", i, [cp]),
        ("bnshm_unmap", i, [vp, i, l]),
        ("bnshm_set_pid", None, [vp, i, i]),
        ("bnshm_pid", i, [vp, i]),
        ("bnshm_gone", i, [i]),
        ("bnshm_all_reduce", i, [vp, i, ctypes.POINTER(ctypes.c_uint32), i, vp, vp, l, l, l,
                                 ctypes.POINTER(i)]),
        ("bnshm_issue", i, [vp, i, ctypes.c_uint32, i, vp, l]),
        ("bnshm_complete", i, [vp, i, ctypes.c_uint32, i, vp, l, l, l, ctypes.POINTER(i),
                               ctypes.POINTER(ctypes.c_uint32)]),
        ("bnshm_now_ns", l, []),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    if not sys.platform.startswith("linux"):
        return None, f"the shared-memory transport needs Linux (futex, /proc), not {sys.platform}"
    try:
        return _declare(ctypes.CDLL(str(_build()), use_errno=True)), ""
    except OSError as e:
        return None, f"building the shared-memory transport failed: {e}"


def library() -> ctypes.CDLL | None:
    """The loaded library, or None where it cannot be built (see ``unavailable_reason``)."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why ``library()`` is None ("" when it is not)."""
    return _load()[1]
