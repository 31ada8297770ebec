#!/usr/bin/env python3
"""Fetch the operators' CRDs that tests/k8s validates the custom resources against (`make k8s-schemas`).

Every file listed in k8s/crds.json is downloaded from its operator's repository at the release
tag, https://raw.githubusercontent.com/<repo>/<tag>/<path>, into a temporary folder beside the
destination, and its sha256 checked (one marked "optional" there is skipped, with a line, when
it cannot be downloaded; a wrong one is refused all the same). Only when all of them match does that folder replace the
destination (default .k8s-schemas/ at the repository root: git-ignored, where the tests look), by
renames, so the tests never see a half-written set. A failed download or a wrong hash is one line
on stderr naming the file, exit 1, and the destination as it was.

DS_K8S_SCHEMAS_URL=<base> fetches <base>/<file> instead (a mirror, a file:// folder, or the local
server the tests start). Standard library only: it runs with any python3, before .venv exists.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLE = HERE / "crds.json"
DEST = HERE.parent / ".k8s-schemas"
UPSTREAM = "https://raw.githubusercontent.com/{repo}/{tag}/{path}"
BASE_ENV = "DS_K8S_SCHEMAS_URL"
TIMEOUT_S = 60  # per file; the largest is ~1.4 MB


class Refused(Exception):
    """A file that cannot be used: the message is the one line the user sees."""


def crds() -> list[dict]:
    return json.loads(TABLE.read_text())["crds"]


def source(crd: dict, base: str) -> str:
    return f"{base.rstrip('/')}/{crd['file']}" if base else UPSTREAM.format(**crd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(crd: dict, base: str, folder: Path) -> bool:
    """Whether the file landed. An optional CRD that cannot be downloaded is skipped (False);
    a wrong file is refused whether optional or not."""
    url, target = source(crd, base), folder / crd["file"]
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
    # URLError and HTTPError are OSErrors; a cut connection is an HTTPException; a malformed base, ValueError.
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = f"download failed from {url}: {getattr(exc, 'reason', exc)}"
        if "optional" in crd:
            target.unlink(missing_ok=True)
            print(f"k8s-schemas: skipped the optional {crd['file']}: {reason}")
            return False
        raise Refused(f"{crd['file']}: {reason}") from None
    got = sha256(target)
    if got != crd["sha256"]:
        raise Refused(f"{crd['file']}: sha256 mismatch from {url}: got {got}, expected {crd['sha256']}")
    return True


def verified(dest: Path, table: list[dict]) -> bool:
    """Whether `dest` already holds every file with its hash (an optional one: if at all), so
    that there is nothing to fetch."""
    def holds(crd: dict) -> bool:
        path = dest / crd["file"]
        return sha256(path) == crd["sha256"] if path.is_file() else "optional" in crd
    return dest.is_dir() and all(holds(c) for c in table)


def install(staged: Path, dest: Path) -> None:
    """Put the verified folder at `dest`. Each rename is atomic: a reader finds the old set, no
    folder for an instant, or the new set, never a mix."""
    old = None
    if dest.exists():
        old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
    try:
        os.rename(staged, dest)
    except OSError:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fetch(dest: Path, base: str) -> int:
    table = crds()
    if verified(dest, table):
        print(f"k8s-schemas: {len(table)} CRDs already in {dest}, sha256 verified")
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Beside the destination, so that the final rename stays on one file system (atomic).
    staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for crd in table:
            if download(crd, base, staged):
                print(f"k8s-schemas: {crd['file']} ({crd['repo']} {crd['tag']}) sha256 ok")
        staged.chmod(0o755)  # mkdtemp's 0700 would make the folder private to this user
        install(staged, dest)
    except Refused as exc:
        print(f"k8s-schemas: refused {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"k8s-schemas: {len(list(dest.iterdir()))} CRDs in {dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEST, help=f"target folder (default: {DEST})")
    args = parser.parse_args(argv)
    return fetch(args.dest.resolve(), os.environ.get(BASE_ENV, ""))


if __name__ == "__main__":
    sys.exit(main())
