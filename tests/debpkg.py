"""The checkout's Debian package for tests: dist/nfsreset_<version>_all.deb,
built with packaging/build-deb.sh when dist/ has none newer than every source
file (~8 s here), and its file list and unpacked tree."""
from __future__ import annotations

import pathlib
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
# What goes into the package (packaging/build-deb.sh copies the tracked files).
SOURCES = ("nfsreset", "bpf", "cli", "packaging", "docs", "README.md", "pyproject.toml")


def version() -> str:
    return next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                if line.startswith("version = "))


def _newest_source_mtime() -> float:
    newest = 0.0
    for top in SOURCES:
        p = ROOT / top
        for f in ([p] if p.is_file() else p.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                newest = max(newest, f.stat().st_mtime)
    return newest


def built_deb() -> pathlib.Path:
    path = DIST / f"nfsreset_{version()}_all.deb"
    if not path.exists() or path.stat().st_mtime < _newest_source_mtime():
        t0 = time.monotonic()
        res = subprocess.run(["bash", str(ROOT / "packaging" / "build-deb.sh")], capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        print(f"\n[package] built {path.name} in {time.monotonic() - t0:.1f} s")
    assert path.exists(), f"build-deb.sh made no {path}"
    return path


def contents(deb: pathlib.Path) -> dict[str, str]:
    """Path inside the package ("/usr/bin/nfsreset", no trailing slash) -> its
    `dpkg-deb -c` mode string (d for directories, - for files, l for links)."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        # perms owner/group size date time path [-> target]
        name = fields[5].removeprefix(".").rstrip("/") or "/"
        found[name] = fields[0]
    return found


def unpack(deb: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """`dpkg-deb -x` (the files as dpkg would place them; no maintainer scripts)."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True, timeout=60)
    return dest
