"""The lab's images, made without a registry or a Docker daemon, cached outside the repository.

- the pause image: a static C program (pause.c) in a one-layer OCI archive;
- the base image under the Dockerfiles' ``FROM`` name (python:3.11-slim-bookworm): a Debian bookworm root
  filesystem made by ``mmdebstrap`` from the Debian mirror this machine's apt uses (read from apt's own
  sources at run time), with python3.11, its venv and pip, and this machine's CA trust store (the network
  here presents its own certificate to the RUN steps that fetch packages);
- the project's images, built from ``Dockerfile`` and ``Dockerfile.cni`` unchanged by ``buildah bud``.

Each is an archive in the cache (``$ISTIO_IPTABLES_LAB_CACHE``, default /var/cache/istio-iptables-lab),
named by a hash of what it is made from, so a rerun imports it at once and a change rebuilds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("ISTIO_IPTABLES_LAB_CACHE", "/var/cache/istio-iptables-lab"))
PAUSE_IMAGE = "lab.local/pause:1"
BUILD_TIMEOUT = 1200
KEEP = 4
"""Archives kept per kind (the most recently used): other worktrees and branches build other keys."""
FORMAT = 2
"""Bumped when the archives this module writes change shape (part of every cache key)."""

# What the Dockerfiles' steps need of python:3.11-slim-bookworm: python3.11 with venv (ensurepip) and pip
# (pip >= 22.3 for --python), libpython for PyInstaller, and CA certificates for apt and pip over HTTPS.
BASE_PACKAGES = ("ca-certificates", "python3.11", "python3.11-venv", "python3-pip", "libpython3.11")
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# The machine's trust store (system bundle and local additions, so that update-ca-certificates in a RUN
# step keeps them) and pip told to use it, as pip on this machine is.
BASE_HOOK = (
    'cp -a /etc/ssl/certs/. "$1/etc/ssl/certs/"; '
    "if [ -d /usr/local/share/ca-certificates ]; then "
    'cp -a /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/"; fi; '
    'printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" >"$1/etc/pip.conf"; '
    'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin'
)


class ImageError(RuntimeError):
    pass


def missing_prerequisites() -> str | None:
    missing = [tool for tool in ("buildah", "mmdebstrap", "gcc", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"building the lab's images needs {', '.join(missing)} (apt-get install buildah mmdebstrap gcc)"
    return None


@dataclass(frozen=True)
class Image:
    """An image archive ready for ``ctr images import`` and the name a pod spec gives it."""

    name: str
    archive: Path

    @property
    def reference(self) -> str:
        """The name as the CRI normalizes it (``istio-iptables:0.1.0`` is docker.io/library/...)."""
        return normalized(self.name)


def normalized(name: str) -> str:
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{name}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{name}"
    return name


# --- OCI archives --------------------------------------------------------------------------------------------


def write_oci_archive(target: Path, name: str, layer: Path, config: dict[str, object], made_by: str) -> None:
    """A one-layer OCI image archive (uncompressed layer) named ``name`` for containerd's importer and for
    buildah (which wants one history entry per layer)."""
    layer_digest = _file_digest(layer)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": made_by}],
    }
    config_blob = json.dumps(image_config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _descriptor("application/vnd.oci.image.config.v1+json", config_blob),
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{layer_digest}",
                "size": layer.stat().st_size,
            }
        ],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **_descriptor("application/vnd.oci.image.manifest.v1+json", manifest_blob),
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
            }
        ],
    }
    partial = target.with_suffix(".partial")
    with tarfile.open(partial, "w") as archive:
        _add_bytes(archive, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(archive, "index.json", json.dumps(index).encode())
        _add_bytes(archive, f"blobs/sha256/{hashlib.sha256(config_blob).hexdigest()}", config_blob)
        _add_bytes(archive, f"blobs/sha256/{hashlib.sha256(manifest_blob).hexdigest()}", manifest_blob)
        archive.add(layer, f"blobs/sha256/{layer_digest}")
    partial.rename(target)


def _descriptor(media_type: str, blob: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": f"sha256:{hashlib.sha256(blob).hexdigest()}", "size": len(blob)}


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the pause image ----------------------------------------------------------------------------------------


def pause_image() -> Image:
    source = HERE / "pause.c"
    archive = CACHE / f"pause-{_digest(source.read_bytes() + bytes([FORMAT]))}.tar"
    # A built archive appears at once (renamed into place): a hit needs no lock, a build waits for others.
    with _cache_lock(skip=_cached(archive)):
        if not _cached(archive):
            with tempfile.TemporaryDirectory() as work:
                binary = Path(work, "pause")
                _run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], timeout=120)
                layer = Path(work, "layer.tar")
                with tarfile.open(layer, "w") as tar:
                    tar.add(binary, "pause")
                write_oci_archive(
                    archive,
                    PAUSE_IMAGE,
                    layer,
                    {"Entrypoint": ["/pause"], "User": "65535:65535"},
                    "gcc -static pause.c",
                )
    return Image(PAUSE_IMAGE, archive)


# --- the base image under the Dockerfiles' FROM name ---------------------------------------------------------


def apt_sources(suite: str) -> str:
    """This machine's apt sources for Debian ``suite`` (and its -updates, -security), one-line format, read
    from apt's own configuration files (never a mirror address of ours)."""
    lines: list[str] = []
    directory = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(directory.glob("*.list")), *sorted(directory.glob("*.sources"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = _deb822(stanza)
                if "deb" not in fields.get("Types", "").split() or fields.get("Enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("URIs", "").split():
                    lines += [
                        f"deb {uri} {s} {fields.get('Components', 'main')}" for s in fields.get("Suites", "").split()
                    ]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    lines.append(" ".join(words))
    chosen = [line for line in lines if line.split()[2].split("-")[0].split("/")[0] == suite]
    if not chosen:
        raise ImageError(f"apt on this machine has no source for Debian {suite} (checked {', '.join(map(str, files))})")
    return "\n".join(chosen) + "\n"


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace() and key:
            fields[key] += " " + line.strip()
        else:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def base_image(name: str, suite: str = "bookworm") -> Image:
    sources = apt_sources(suite)
    key = _digest(json.dumps([name, suite, BASE_PACKAGES, BASE_ENV, BASE_HOOK, sources, FORMAT]).encode())
    archive = CACHE / f"base-{key}.tar"
    with _cache_lock(skip=_cached(archive)):
        if not _cached(archive):
            with tempfile.TemporaryDirectory(dir=CACHE) as work:
                layer = Path(work, "rootfs.tar")
                sources_file = Path(work, "sources.list")
                sources_file.write_text(sources)
                _run(
                    ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                     f"--customize-hook={BASE_HOOK}", suite, str(layer), str(sources_file)],
                    timeout=BUILD_TIMEOUT,
                )  # fmt: skip
                env = [f"{key}={value}" for key, value in BASE_ENV.items()]
                write_oci_archive(archive, normalized(name), layer, {"Env": env, "Cmd": ["python3.11"]}, "mmdebstrap")
            _prune(archive)
    return Image(name, archive)


# --- the project's images, from their Dockerfiles -------------------------------------------------------------


def dockerfile_image(dockerfile: str, name: str) -> Image:
    """``buildah bud`` of ``dockerfile`` (a name in the repository) with its own .dockerignore, tagged ``name``,
    exported as an archive ``ctr`` imports. The base is made locally under the FROM name; nothing is pulled."""
    path = ROOT / dockerfile
    text = path.read_text()
    base_name = next(line.split()[1] for line in text.splitlines() if line.strip().upper().startswith("FROM "))
    base = base_image(base_name)
    ignore = dockerignore(path)
    key = _digest(json.dumps([dockerfile, name, text, base.archive.name, _context_digest(ignore)]).encode())
    archive = CACHE / f"{path.name.lower().replace('.', '-')}-{key}.tar"
    if _cached(archive):
        return Image(name, archive)
    with _cache_lock():
        if _cached(archive):
            return Image(name, archive)
        storage = CACHE / "buildah"
        storage.mkdir(exist_ok=True)
        with _shadowed_var_lib() as (work, wrap):
            common = ["buildah", "--root", str(storage / "root"), "--runroot", str(work / "runroot"),
                      "--storage-driver", "overlay"]  # fmt: skip
            _run([*wrap, *common, "pull", "--quiet", f"oci-archive:{base.archive}"], timeout=BUILD_TIMEOUT)
            # RUN steps share this machine's network (to reach apt's mirror and PyPI) but not its
            # capabilities: buildah gives them Docker's default set, without NET_ADMIN. The docker format
            # keeps SHELL (the OCI format ignores it, and the steps rely on bash's pipefail).
            _run(
                [*wrap, *common, "bud", "--pull=never", "--layers", "--network", "host", "--isolation", "oci",
                 "--format", "docker", "--ignorefile", str(ignore), "-f", str(path), "-t", normalized(name), str(ROOT)],
                timeout=BUILD_TIMEOUT,
            )  # fmt: skip
            partial = archive.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            _run([*wrap, *common, "push", "--quiet", normalized(name), f"docker-archive:{partial}:{name}"], timeout=600)
            partial.rename(archive)
        _prune(archive)
    return Image(name, archive)


def dockerignore(dockerfile: Path) -> Path:
    """BuildKit's rule: ``<Dockerfile>.dockerignore`` beside it, else the context's .dockerignore."""
    specific = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return specific if specific.exists() else ROOT / ".dockerignore"


def _context_digest(ignore: Path) -> str:
    """A digest of the files the build context lets in: the ``!`` lines of the ignore file (which excludes
    everything first), minus caches."""
    digest = hashlib.sha256(ignore.read_bytes())
    roots = [line[1:].strip() for line in ignore.read_text().splitlines() if line.startswith("!")]
    for root in sorted(roots):
        base = ROOT / root
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts or file.suffix in {".pyc", ".pyo", ".pyd"}:
                continue
            digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _shadowed_var_lib() -> Iterator[tuple[Path, list[str]]]:
    """A private mount namespace for buildah: /var/lib is an overlay with its upper dir in a temp dir and
    /run a tmpfs, so buildah's fixed paths (its blob cache, lock files) stay off the machine."""
    with tempfile.TemporaryDirectory(prefix="iilab-build-") as name:
        work = Path(name)
        for folder in ("upper", "work", "runroot"):
            (work / folder).mkdir()
        script = work / "inner.sh"
        script.write_text(
            "set -eu\nwork=$1\nshift\nmount -t tmpfs -o mode=0755 tmpfs /run\n"
            'mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$work/upper,workdir=$work/work" /var/lib\n'
            'exec "$@"\n'
        )
        # buildah makes its CNI config dir (default /etc/cni/net.d, with a lock file) even for --network host:
        # the machine's is never to be touched, so it is one of the build's own.
        conf = work / "containers.conf"
        conf.write_text(f'[network]\nnetwork_config_dir = "{work / "cni"}"\n')
        yield (
            work,
            [
                *("unshare", "--mount", "--propagation", "private", "--", "sh", str(script), str(work)),
                *("env", f"CONTAINERS_CONF={conf}"),
            ],
        )


@contextlib.contextmanager
def _cache_lock(skip: bool = False) -> Iterator[None]:
    """One builder at a time per cache (test processes of other worktrees share it, and buildah's storage)."""
    if skip:
        yield
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cached(archive: Path) -> bool:
    """Whether ``archive`` is built; a hit counts as a use (its mtime), which pruning goes by."""
    if not archive.exists():
        return False
    os.utime(archive)
    return True


def _prune(archive: Path) -> None:
    """Drop all but the KEEP most recently used archives of ``archive``'s kind (its name up to the key)."""
    kind = archive.name.rsplit("-", 1)[0]
    siblings = sorted(CACHE.glob(f"{kind}-*.tar"), key=lambda path: path.stat().st_mtime, reverse=True)
    for stale in [path for path in siblings if path.name.rsplit("-", 1)[0] == kind][KEEP:]:
        stale.unlink(missing_ok=True)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise ImageError(f"{' '.join(argv)} exited {result.returncode}:\n" + "\n".join(output[-40:]))
    return result
