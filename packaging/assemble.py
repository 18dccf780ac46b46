"""Make the single file: packaging/launcher.sh followed by a gzip'd tar of the one-folder build.

    python packaging/assemble.py ONEDIR OUTPUT VERSION

ONEDIR is PyInstaller's folder (holding the `dynamo-run` executable and `_internal/`). The
cache key written into the launcher is VERSION plus the first 12 hex digits of the payload's
SHA-256, so every different build unpacks into its own folder.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _reset_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Unpacked as root, tar would restore the builder's uid/gid.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_payload(onedir: Path, payload: Path) -> int:
    """Write the tar.gz of ONEDIR's contents; returns the unpacked size in bytes."""
    size = 0
    with (
        payload.open("wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in sorted(onedir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                size += path.stat().st_size
        for entry in sorted(onedir.iterdir()):
            tar.add(entry, arcname=entry.name, filter=_reset_owner)
    return size


def render_launcher(version: str, key: str, unpacked_mb: int) -> bytes:
    """The sh header; @OFFSET@ is the 1-based byte where the payload starts (for tail -c +N)."""
    template = (HERE / "launcher.sh").read_text()
    text = template.replace("@VERSION@", version).replace("@KEY@", key)
    text = text.replace("@UNPACKED_MB@", str(unpacked_mb))
    offset = 0
    while True:  # the offset is written inside the header it measures: iterate to a fixed point
        header = text.replace("@OFFSET@", str(offset)).encode()
        if len(header) + 1 == offset:
            return header
        offset = len(header) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onedir", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("version")
    args = parser.parse_args()

    if not (args.onedir / "dynamo-run").is_file():
        parser.error(f"{args.onedir} holds no dynamo-run executable")
    payload = args.output.with_name(args.output.name + ".payload.tar.gz")
    payload.parent.mkdir(parents=True, exist_ok=True)
    unpacked = write_payload(args.onedir, payload)
    digest = hashlib.sha256()
    with payload.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    key = f"{args.version}-{digest.hexdigest()[:12]}"
    header = render_launcher(args.version, key, round(unpacked / 1e6))

    partial = args.output.with_name(args.output.name + ".partial")
    with partial.open("wb") as out, payload.open("rb") as f:
        out.write(header)
        shutil.copyfileobj(f, out, 1 << 20)
    payload.unlink()
    partial.chmod(0o755)
    os.replace(partial, args.output)
    print(
        f"{args.output}: {key}, {args.output.stat().st_size / 1e6:.0f} MB ({unpacked / 1e6:.0f} MB unpacked)"
    )


if __name__ == "__main__":
    main()
