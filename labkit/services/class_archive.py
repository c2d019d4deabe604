"""A class-data-sharing archive for ZooKeeper's JVM, built once, kept in a cache directory.

Most of a small JVM server's start-up CPU goes into loading, parsing and
verifying classes. AppCDS (JDK 13 and later) lets the JVM map the classes a
previous run loaded from an archive instead. The archive is built by
ZooKeeper itself: the first server started without one runs with
``-XX:ArchiveClassesAtExit=<tmp>``; when it exits normally (SIGTERM at
``close()``), the JVM writes the classes it loaded, and the service renames
the file into place (:func:`adopt`). Every later start maps it with
``-XX:SharedArchiveFile``. Measured on 2 cores: about a third less CPU to a
served kazoo session (see the README).

The archive's name carries a hash of the Java runtime, the classpath and the
jars' sizes and dates (with the jars a Debian jar's manifest names), so an
upgrade of either builds a new one; the JVM checks the same things itself and
ignores an archive that does not match. A server killed with SIGKILL writes
nothing, so a half-written archive is never adopted.

``LABKIT_ZK_CDS=0`` switches it off; ``$LABKIT_CACHE_DIR`` (default
``$XDG_CACHE_HOME/labkit`` or ``~/.cache/labkit``) says where archives live.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import time
import uuid
import zipfile
from pathlib import Path

#: JDK 13 added dynamic archives (-XX:ArchiveClassesAtExit).
MIN_FEATURE = 13
STALE_TMP_S = 600


def cache_dir() -> Path:
    """Where labkit keeps things built once per machine (created on demand)."""
    explicit = os.environ.get("LABKIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "labkit"


def java_version(java: str) -> str | None:
    """``JAVA_VERSION`` from the runtime's ``release`` file (no JVM started), or None."""
    home = Path(os.path.realpath(java)).parent.parent
    try:
        text = (home / "release").read_text()
    except OSError:
        return None
    found = re.search(r'^JAVA_VERSION="([^"]+)"', text, re.MULTILINE)
    return found.group(1) if found else None


def feature(version: str) -> int:
    """The feature release of a Java version string: ``"17.0.15"`` -> 17, ``"1.8.0_392"`` -> 8."""
    parts = re.findall(r"\d+", version)
    if not parts:
        return 0
    first = int(parts[0])
    return int(parts[1]) if first == 1 and len(parts) > 1 else first


def classpath_jars(classpath: str) -> list[str]:
    """Every jar the classpath names (``dir/*`` expanded), plus those their manifests' ``Class-Path`` names."""
    jars: list[str] = []
    for entry in classpath.split(os.pathsep):
        jars.extend(sorted(glob.glob(entry)) if entry.endswith("*") else [entry])
    extra: list[str] = []
    for jar in jars:
        with contextlib.suppress(OSError, zipfile.BadZipFile, KeyError):
            with zipfile.ZipFile(jar) as zf:
                manifest = zf.read("META-INF/MANIFEST.MF").decode("utf-8", "replace")
            # manifest lines wrap at 72 bytes; a continuation line starts with one space
            joined = re.sub(r"\r?\n ", "", manifest)
            for line in joined.splitlines():
                if line.startswith("Class-Path:"):
                    base = os.path.dirname(jar)
                    extra.extend(os.path.join(base, p) for p in line.split(":", 1)[1].split())
    return jars + extra


def archive_path(java: str, classpath: str) -> Path | None:
    """Where the archive for this runtime and classpath lives; None when CDS is off or unsupported."""
    if os.environ.get("LABKIT_ZK_CDS", "1").strip().lower() in ("0", "no", "false", "off"):
        return None
    version = java_version(java)
    if version is None or feature(version) < MIN_FEATURE:
        return None
    digest = hashlib.sha256(f"{os.path.realpath(java)}\0{version}\0{classpath}".encode())
    for jar in classpath_jars(classpath):
        with contextlib.suppress(OSError):
            st = os.stat(jar)
            digest.update(f"\0{jar}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return cache_dir() / f"zookeeper-jdk{version}-{digest.hexdigest()[:16]}.jsa"


def jvm_flags(java: str, classpath: str) -> tuple[list[str], Path | None]:
    """JVM flags that use the archive, or that build it at exit; and the file to :func:`adopt` afterwards."""
    final = archive_path(java, classpath)
    if final is None:
        return [], None
    if final.exists():
        return [f"-XX:SharedArchiveFile={final}"], None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return [], None
    _remove_stale(final.parent)
    tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    # the dump lists every class it could not archive: keep those lines out of the server's log
    return [f"-XX:ArchiveClassesAtExit={tmp}", "-Xlog:cds=off", "-Xlog:cds+dynamic=off"], tmp


def adopt(tmp: Path | None, returncode: int | None) -> bool:
    """After the building JVM exited: move its archive into place if it exited normally; else drop it."""
    if tmp is None:
        return False
    final = tmp.with_name(tmp.name.rsplit(".", 2)[0])
    normal = returncode is not None and returncode >= 0 and tmp.exists() and tmp.stat().st_size > 0
    try:
        if normal:
            os.replace(tmp, final)
            return True
        tmp.unlink(missing_ok=True)
    except OSError:
        pass
    return False


def _remove_stale(directory: Path) -> None:
    now = time.time()
    for path in directory.glob("*.jsa.*.tmp"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > STALE_TMP_S:
                path.unlink()
