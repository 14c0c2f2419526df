# syntax=docker/dockerfile:1
#
# The istio-init container image: istio-iptables (this repository) with Debian bookworm's iptables
# (legacy and nft back ends, v4 and v6), nftables, iproute2 and ipset.
#
# Unlike Istio's istio-init (root, writable root filesystem for /run/xtables.lock), this image runs as a
# NON-ROOT user with only NET_ADMIN and NET_RAW and a read-only root filesystem:
#
#   * User: 65532:65532 ("istio-iptables"), numeric so that the kubelet can check runAsNonRoot, and not
#     1337 (the sidecar's UID, whose traffic the rules exempt) nor 0.
#   * Capabilities: Kubernetes gives a non-root container no ambient capabilities, so the capabilities
#     added in the pod spec are only in the bounding set. The programs that need them carry file
#     capabilities (cap_net_admin,cap_net_raw+ep), which the kernel grants at execve as long as
#     no_new_privs is off (allowPrivilegeEscalation: true in the pod spec):
#       - xtables-legacy-multi and xtables-nft-multi (every iptables-*/ip6tables-* name links to them),
#       - nft, and ip for the TPROXY "ip rule"/"ip route" steps. iproute2's ip drops every capability when
#         run by a non-root user unless CAP_NET_ADMIN is in its inheritable set, so whoever runs ip must
#         first raise CAP_NET_ADMIN into the inheritable set (the capable interpreter may: capset(2)), or do
#         those steps over netlink in-process instead,
#       - the interpreter of the program only: a private copy at /opt/istio-iptables/bin/python in the
#         application venv (made with --copies, so it is its own inode). The system's python3.11 and the
#         venv's other interpreter names stay without capabilities, and the venv's bin is not on PATH: no
#         other program of the image gets them, and the in-process work (netlink, the optional libiptc
#         back end) still has them.
#   * Entrypoint: /usr/local/bin/istio-iptables (image/istio-iptables), a launcher that runs the program on
#     the capable interpreter when the container's bounding set holds NET_ADMIN and NET_RAW, and on the
#     venv's python3.11 (no file capabilities) otherwise. The kernel refuses to exec a file whose file
#     capabilities the bounding set cannot grant, so without it a container that drops ALL (Istio's
#     istio-validation in CNI mode, which needs no capability) could not start at all.
#     ipset is installed for parity with the test environment but istio-iptables does not run it, so it
#     gets no capabilities.
#   * Lock file: legacy iptables opens XTABLES_LOCKFILE (default /run/xtables.lock) with O_CREAT, which
#     fails on a read-only root. XTABLES_LOCKFILE points into /run/istio-iptables, where the pod mounts an
#     emptyDir (see deploy/istio-init-pod.yaml); istio-iptables keeps its own run lock beside it. The nft
#     back end takes no lock, but the back-end detection's kernel test with iptables-legacy does.
#   * Known limit of non-root: iptables-legacy-save and ip6tables-legacy-save without -t read
#     /proc/net/ip{,6}_tables_names, which is root's and mode 0440, so they fail; the legacy back end is
#     then found unusable and nft is used (unless istio-iptables saves legacy tables one by one with -t).
#
# Build:   docker build -t istio-iptables:0.1.0 .            (add --build-arg EXTRAS=libiptc for that extra)
# Try it:  docker run --rm --read-only --cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW \
#            --tmpfs /run/istio-iptables istio-iptables:0.1.0 --dry-run -p 15001 -z 15006 -u 1337 ...
#          (outside Kubernetes, applying needs --allow-host-namespace: no KUBERNETES_SERVICE_HOST there)
# The tests build this file unchanged with buildah and run its pods on containerd (docs/development.md).

# A tag of the official image, not a digest: the release pipeline may pin @sha256:... on top.
FROM python:3.11-slim-bookworm

# Optional extras of the package, comma-separated (e.g. "libiptc"); empty installs the plain package.
ARG EXTRAS=""

LABEL org.opencontainers.image.title="istio-iptables" \
      org.opencontainers.image.description="Python reimplementation of Istio's istio-iptables, for the istio-init container; runs as non-root 65532 with file capabilities" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-eux", "-o", "pipefail", "-c"]

ENV XTABLES_LOCKFILE="/run/istio-iptables/xtables.lock" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# System packages, pinned to bookworm's upstream versions; the Debian revision is left open (-*) so that
# stable and security updates apply and the pins do not break when a point release replaces a revision.
# libcap2-bin (setcap) stays in the image: iproute2 depends on it, so purging it would remove ip too.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      iproute2=6.1.0-* \
      ipset=7.17-* \
      iptables=1.8.9-* \
      libcap2-bin=1:2.66-* \
      nftables=1.0.6-* \
 && python3.11 -m venv --copies --without-pip /opt/istio-iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 istio-iptables \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin istio-iptables \
 && install -d -o 65532 -g 65532 -m 0755 /run/istio-iptables

# The build context holds only these (see .dockerignore).
COPY pyproject.toml README.md /src/
COPY istio_iptables/ /src/istio_iptables/
COPY image/istio-iptables /usr/local/bin/istio-iptables

# The base image's pip installs into the venv (which has no pip of its own) and the console script's
# shebang must name the capable interpreter. The capabilities come last: a build step holds no NET_ADMIN,
# and the kernel refuses to exec a file whose file capabilities the caller's bounding set cannot grant
# (EPERM), so no step may run the venv's python once it has them. The entrypoint (image/istio-iptables)
# picks the interpreter the bounding set allows; the final check runs it as a build step, without them.
RUN python3.11 -m pip --python /opt/istio-iptables/bin/python install --no-cache-dir \
      "/src${EXTRAS:+[${EXTRAS}]}" \
 && rm -rf /src \
 && test "$(head -n 1 /opt/istio-iptables/bin/istio-iptables)" = "#!/opt/istio-iptables/bin/python" \
 && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-legacy-multi \
 && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-nft-multi \
 && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/nft \
 && setcap cap_net_admin,cap_net_raw+ep /usr/bin/ip \
 && setcap cap_net_admin,cap_net_raw+ep /opt/istio-iptables/bin/python \
 && getcap /usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi /usr/sbin/nft /usr/bin/ip \
      /opt/istio-iptables/bin/python \
 && python3.11 -c 'import os, sys; [os.getxattr(p, "security.capability") for p in sys.argv[1:]]' \
      /usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi /usr/sbin/nft /usr/bin/ip \
      /opt/istio-iptables/bin/python \
 && istio-iptables --help >/dev/null

USER 65532:65532

ENTRYPOINT ["/usr/local/bin/istio-iptables"]
CMD ["--help"]
