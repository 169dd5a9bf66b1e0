"""``python -m devtools.base_images``: the base images of the Dockerfile and docker-compose.yml, made locally.

This exists only because the machines this project is developed and tested on reach no
image registry (package registries only), so ``python:3.11-slim``, ``redis:7`` and
``nginx:1.27`` cannot be pulled. Where a registry is reachable, none of this is needed:
``docker compose up --build`` pulls the official images.

What it makes, with podman, under the exact names the project's files use (so podman
finds them locally and never tries to pull):

1. ``localhost/debian:bookworm``: a minimal Debian root filesystem from
   ``debootstrap --variant=minbase bookworm DIR MIRROR`` (MIRROR: ``--mirror``, else the
   first ``URIs:``/``deb`` line of the machine's apt sources), imported with
   ``tar -C DIR -c . | podman import -``.
2. From it, with the Containerfiles under ``devtools/images/``:
   ``docker.io/library/python:3.11-slim`` (Debian's Python 3.11, venv, pip),
   ``docker.io/library/redis:7`` (Debian's redis-server 7.0) and
   ``docker.io/library/nginx:1.27`` (Debian's nginx 1.22). They stand in for the official
   images and only as far as this project uses them; the versions inside are Debian's.

Cached: each image carries a label with a digest of what it was made from (the mirror
and suite, or its Containerfile directory and the Debian image's id), and an image whose
label matches is kept, so a second run takes a second. ``--force`` makes them all again.
A lock file serialises concurrent runs on one machine. Needs root (rootful podman) and
``podman`` and ``debootstrap`` installed (Debian: ``apt-get install podman debootstrap``).

Standard library only, like the rest of devtools.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

IMAGES_DIR = Path(__file__).resolve().parent / "images"
SUITE = "bookworm"
DEBIAN_IMAGE = "localhost/debian:bookworm"
LABEL = "io.github.broadcaster.base-images.source"
LOCK_FILE = Path("/var/tmp/broadcaster-base-images.lock")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


@dataclass(frozen=True)
class DerivedImage:
    """An image built FROM the Debian base with the Containerfile in ``devtools/images/<directory>``."""

    name: str
    directory: str

    @property
    def context(self) -> Path:
        return IMAGES_DIR / self.directory


DERIVED = (
    DerivedImage("docker.io/library/python:3.11-slim", "python"),
    DerivedImage("docker.io/library/redis:7", "redis"),
    DerivedImage("docker.io/library/nginx:1.27", "nginx"),
)
ALL_IMAGES = (DEBIAN_IMAGE, *(image.name for image in DERIVED))


class BaseImageError(RuntimeError):
    """A tool is missing or a step failed; the message says which and how to fix it."""


def log(message: str) -> None:
    print(f"base-images: {message}", file=sys.stderr, flush=True)


def tool(name: str) -> str:
    """The path of a required program; BaseImageError (with the apt-get line) if it is not installed."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise BaseImageError(f"{name} is not installed (Debian: apt-get install -y podman buildah debootstrap)")
    return found


def apt_mirror(sources: Sequence[Path] = APT_SOURCES) -> str:
    """The first Debian mirror of the machine's apt sources (deb822 ``URIs:`` or a ``deb URL`` line)."""
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        match = re.search(r"^URIs:\s*(\S+)", text, re.M) or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)
        if match:
            return match.group(1)
    return DEFAULT_MIRROR


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:32]


def context_digest(context: Path, base_id: str) -> str:
    """What a derived image is made from: every file of its directory (names, modes, contents) and the base's id."""
    parts = [base_id.encode()]
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        parts += [str(path.relative_to(context)).encode(), oct(path.stat().st_mode & 0o777).encode(), path.read_bytes()]
    return _digest(*parts)


class Podman:
    def __init__(self, binary: str) -> None:
        self.binary = binary

    def run(self, *args: str, timeout: float = 600, stdin: int | None = None) -> str:
        result = subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=timeout, stdin=stdin)
        if result.returncode != 0:
            raise BaseImageError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result.stdout

    def image_label(self, name: str) -> tuple[str, str] | None:
        """(id, our label) of a local image, or None if there is none by that name."""
        result = subprocess.run(
            [self.binary, "image", "inspect", "--format", f'{{{{.Id}}}} {{{{index .Labels "{LABEL}"}}}}', name],
            capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            return None
        image_id, _, label = result.stdout.strip().partition(" ")
        return image_id, label


@contextmanager
def machine_lock(path: Path = LOCK_FILE, timeout: float = 900) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: one maker at a time per machine (a second waits, then finds the cache)."""
    deadline = time.monotonic() + timeout
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BaseImageError(f"another run held {path} for over {timeout:g}s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_debian(podman: Podman, mirror: str, label: str) -> str:
    """debootstrap a minbase root filesystem and import it as DEBIAN_IMAGE; its image id."""
    debootstrap = tool("debootstrap")
    with tempfile.TemporaryDirectory(prefix="bc-rootfs-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        log(f"debootstrap --variant=minbase {SUITE} from {mirror} (about 30 s)")
        result = subprocess.run([debootstrap, "--variant=minbase", SUITE, str(root), mirror],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-3000:]
            raise BaseImageError(f"debootstrap failed ({result.returncode}):\n{output}")
        for leftover in (root / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        try:
            assert tar.stdout is not None
            image_id = podman.run("import", "--change", f"LABEL {LABEL}={label}", "--change", 'CMD ["bash"]',
                                  "-", DEBIAN_IMAGE, stdin=tar.stdout.fileno()).strip().splitlines()[-1]
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait(timeout=60)
        if tar.returncode != 0:
            raise BaseImageError(f"tar of the root filesystem failed ({tar.returncode})")
    return image_id.removeprefix("sha256:")


def ensure(podman_binary: str | None = None, *, mirror: str | None = None, force: bool = False) -> list[str]:
    """Make whichever base images are missing or out of date; the names of those it made."""
    podman = Podman(podman_binary or tool("podman"))
    mirror = mirror or apt_mirror()
    made: list[str] = []
    with machine_lock():
        debian_label = _digest(mirror.encode(), SUITE.encode(), b"minbase")
        found = podman.image_label(DEBIAN_IMAGE)
        if force or found is None or found[1] != debian_label:
            base_id = make_debian(podman, mirror, debian_label)
            made.append(DEBIAN_IMAGE)
        else:
            base_id = found[0]
        for image in DERIVED:
            label = context_digest(image.context, base_id)
            found = podman.image_label(image.name)
            if not force and found is not None and found[1] == label:
                continue
            log(f"building {image.name} from {image.context}")
            podman.run("build", "--pull=never", "--label", f"{LABEL}={label}", "-t", image.name, str(image.context),
                       timeout=900)
            made.append(image.name)
    return made


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.base_images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", help="Debian mirror for debootstrap (default: the machine's apt sources)")
    parser.add_argument("--podman", help="podman binary (default: podman on PATH)")
    parser.add_argument("--force", action="store_true", help="make every image again, even if it is up to date")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        made = ensure(args.podman, mirror=args.mirror, force=args.force)
    except (BaseImageError, subprocess.TimeoutExpired) as exc:
        print(f"base-images: {exc}", file=sys.stderr)
        return 1
    log(f"made {', '.join(made)}" if made else "all up to date")
    log(f"done in {time.monotonic() - started:.0f}s: {', '.join(ALL_IMAGES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
