"""Benchmarks behind scripts/bench: every figure is a median of whole-process runs, every comparison a ratio
against a baseline measured in the same run. Everything runs in network namespaces made for it.

Sections: start-up cost; the imports of an apply (the biggest, and their count and summed time against the
interpreter's own); apply latency of the init container's default flags (ours per backend, the bare
iptables-restore "floor", and "Istio's way" replayed as plain commands); scale with 10 to 10,000 entries
(time and processes for apply, unchanged re-run, status and reconcile, and Istio's per-rule checks
replayed); new connections per second through the capture with 0 and 10,000 exclusions; peak memory; the
admission webhook's reviews per second and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import itertools
import json
import os
import platform
import re
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.prefix, "bin", "istio-iptables"))
PYTHON = sys.executable
INIT_FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
INIT_FLAGS += ["-d", "15090,15021,15020", "--no-ipv6", "--log_output_level=default:none"]
# The init container runs inside its pod; Kubernetes sets this variable there (the host-namespace guard).
POD_ENV = {**os.environ, "KUBERNETES_SERVICE_HOST": "198.18.255.1"}
_names = itertools.count()


@dataclass
class Row:
    label: str
    seconds: float
    processes: int | None = None
    baseline: float | None = None
    note: str = ""
    amount: str = ""
    """The figure in its table's own unit, for a table that measures something else than time."""

    def cells(self) -> list[str]:
        ratio = f"{self.seconds / self.baseline:.2f}x" if self.baseline else ""
        processes = "" if self.processes is None else str(self.processes)
        milliseconds = self.seconds * 1000
        return [
            self.label,
            self.amount or (f"{milliseconds:.3f}" if milliseconds < 1 else f"{milliseconds:.1f}"),
            ratio,
            processes,
            self.note,
        ]


# ---- namespaces -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A fresh pod namespace: lo up and 198.18.0.2/24 on a veth to a peer namespace (so outbound traffic
    leaves by an interface that is not lo, as in a pod); both are deleted afterwards."""
    name = f"iibench-{os.getpid()}-{next(_names)}"
    peer = f"{name}-peer"
    try:
        for created in (name, peer):
            subprocess.run(["ip", "netns", "add", created], check=True)
            subprocess.run(["ip", "-n", created, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer], check=True
        )
        subprocess.run(["ip", "-n", name, "addr", "add", "198.18.0.2/24", "dev", "eth0"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "eth0", "up"], check=True)
        subprocess.run(["ip", "-n", peer, "link", "set", "eth0", "up"], check=True)
        yield name
    finally:
        for created in (name, peer):
            subprocess.run(["ip", "netns", "del", created], check=False, capture_output=True)


def inside(name: str, command: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", name, *command]


def timed(command: Sequence[str], stdin: str | None = None, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env or POD_ENV, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[:8])}... failed: {result.stderr.strip()[-2000:]}")
    return elapsed


def median_fresh(runs: int, make: Callable[[str], list[str]], stdin: str | None = None) -> float:
    """Median time of ``make(namespace)`` run once in each of ``runs`` fresh namespaces."""
    times = []
    for _ in range(runs):
        with namespace() as name:
            times.append(timed(make(name), stdin))
    return statistics.median(times)


def count_processes(command: Sequence[str], stdin: str | None = None) -> int:
    """Processes the command spawned (execve calls after its own), counted with strace."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as trace:
        subprocess.run(
            ["strace", "-f", "-qq", "-e", "trace=execve", "-e", "signal=none", "-o", trace.name, *command],
            input=stdin,
            capture_output=True,
            text=True,
            env=POD_ENV,
            check=False,
        )
        calls = [line for line in Path(trace.name).read_text().splitlines() if "execve(" in line and "= 0" in line]
    return max(0, len(calls) - 1)


# ---- the commands compared ------------------------------------------------------------------------------


def payload(flags: Sequence[str]) -> str:
    result = subprocess.run([CLI, "--dry-run", *flags], capture_output=True, text=True, env=POD_ENV, check=True)
    return "".join(line + "\n" for line in result.stdout.splitlines() if not line.startswith("# "))


def istio_replay(flags: Sequence[str], rerun: bool = False, checks: int | None = None) -> str:
    """The command sequence Istio's istio-iptables runs for these flags on an IPv4 pod (reference section 5),
    as a shell script: detection of both variants for both families (save, save --version, the nat kernel
    test and its undo), the state check (saves; on a re-run one `-C` per planned rule), the restore, the final
    save."""
    lines = ["set -e"]
    for family in ("iptables", "ip6tables"):
        for variant in ("legacy", "nft"):
            binary = f"{family}-{variant}"
            wait = " --wait=30" if variant == "legacy" else ""
            lines += [f"{binary}-save >/dev/null", f"{binary}-save --version >/dev/null"]
            lines += [
                f"{binary} -t nat -A INPUT -p 255 -j RETURN{wait}",
                f"{binary} -t nat -D INPUT -p 255 -j RETURN{wait}",
            ]
    lines += ["iptables-nft-save >/dev/null", "ip6tables-nft-save >/dev/null"]
    if rerun:
        lines += istio_checks(flags)[:checks]
    else:
        lines.append("iptables-nft-restore --noflush <<'PAYLOAD'\n" + payload(flags) + "PAYLOAD")
    lines.append("iptables-nft-save >/dev/null")
    return "\n".join(lines) + "\n"


def script(text: str) -> str:
    """A shell script in a file (one argument holds at most 128 KiB), removed when the bench ends."""
    descriptor, path = tempfile.mkstemp(prefix="iibench-", suffix=".sh")
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    atexit.register(os.unlink, path)
    return path


def istio_checks(flags: Sequence[str]) -> list[str]:
    """Istio's re-run check: one ``iptables -C`` per planned rule."""
    checks, table = [], ""
    for line in payload(flags).splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(("-A ", "-I ")):
            spec = re.sub(r"^-[AI] (\S+)( \d+)?", r"\1", line)
            checks.append(f"iptables-nft -t {table} -C {spec} || true")
    return checks


def exclusions(count: int) -> tuple[str, str]:
    """``count`` CIDRs and ``count`` ports, as flag values. The CIDRs are the shortest /16s to write (1.0/16,
    1.1/16, ...): 10,000 of them just fit in one argument (Linux takes at most 128 KiB per argument or
    variable, for Istio as for us). None holds the lab's addresses."""
    cidrs = sorted((f"{a}.{b}.0.0/16" for a in range(1, 100) for b in range(256)), key=len)[:count]
    ports = ",".join(str(port) for port in range(20000, 20000 + count))
    return ",".join(cidrs), ports


# ---- sections ------------------------------------------------------------------------------------------


def startup(runs: int) -> list[Row]:
    def median(command: list[str]) -> float:
        return statistics.median(timed(command) for _ in range(runs))

    interpreter = median([PYTHON, "-c", "pass"])
    typer = median([PYTHON, "-c", "import typer"])
    ours = median([PYTHON, "-c", "import istio_iptables.cli.console, istio_iptables.apply"])
    help_ = median([CLI, "--help"])
    return [
        Row("python -c pass (the interpreter)", interpreter, baseline=interpreter),
        Row("python -c 'import typer' (not loaded by a plain run)", typer, baseline=interpreter),
        Row(
            "python -c 'import <the modules of an apply>' (collector on, as for a library user)",
            ours,
            baseline=interpreter,
        ),
        Row("istio-iptables --help (interpreter + typer + this package)", help_, baseline=interpreter),
    ]


def import_costs(runs: int, shown: int = 12) -> list[Row]:
    """Where an apply's start-up goes: ``python -X importtime`` of the init container's run, each module's own
    time (median over fresh namespaces), the biggest ones. importtime's own bookkeeping inflates the figures."""
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        with namespace() as name:
            command = inside(name, [PYTHON, "-X", "importtime", "-m", "istio_iptables", *INIT_FLAGS])
            result = subprocess.run(command, capture_output=True, text=True, env=POD_ENV, check=True)
        for line in result.stderr.splitlines():
            if match := re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line):
                samples.setdefault(match[2], []).append(int(match[1]) / 1e6)
    own = {module: statistics.median(times) for module, times in samples.items()}
    biggest = sorted(own.items(), key=lambda item: item[1], reverse=True)[:shown]
    return [
        Row(f"all {len(own)} modules (the interpreter's own start-up modules included)", sum(own.values())),
        *(Row(module, seconds) for module, seconds in biggest),
    ]


def import_counts(runs: int) -> list[Row]:
    """A plain apply's imports (the init container's flags, applied in a fresh namespace) against the
    interpreter's own (``python -c pass``), both under ``python -X importtime`` in this run: how many modules
    each imports (and how many of this package), and the import time summed over them (median over runs;
    ratio: against the interpreter's). The apply runs as ``-c 'import istio_iptables.__main__'``, so that the
    runpy machinery of ``-m`` is not counted, and so that PYTHONPATH can point it at another checkout."""
    baseline: list[tuple[list[str], float]] = []
    applies: list[tuple[list[str], float]] = []
    for _ in range(runs):
        baseline.append(_imports([PYTHON, "-X", "importtime", "-c", "pass"]))
        with namespace() as name:
            apply = [PYTHON, "-X", "importtime", "-c", "import istio_iptables.__main__", *INIT_FLAGS]
            applies.append(_imports(inside(name, apply)))
    interpreter = statistics.median(seconds for _, seconds in baseline)
    modules = len(baseline[0][0])
    package = [module for module in applies[0][0] if module.partition(".")[0] == "istio_iptables"]
    return [
        Row(
            "python -c pass (the interpreter's start-up)", interpreter, baseline=interpreter, note=f"{modules} modules"
        ),
        Row(
            "a plain apply (the init container's flags, a fresh namespace)",
            statistics.median(seconds for _, seconds in applies),
            baseline=interpreter,
            note=f"{len(applies[0][0])} modules, {len(package)} of istio_iptables",
        ),
    ]


def _imports(command: list[str]) -> tuple[list[str], float]:
    """The modules ``python -X importtime`` reports, in order, and the sum of their own times (seconds)."""
    result = subprocess.run(command, capture_output=True, text=True, env=POD_ENV, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[:8])}... failed: {result.stderr.strip()[-2000:]}")
    found = [
        (match[2], int(match[1]) / 1e6)
        for line in result.stderr.splitlines()
        if (match := re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line))
    ]
    return [module for module, _ in found], sum(seconds for _, seconds in found)


def apply_latency(runs: int) -> list[Row]:
    flags = INIT_FLAGS
    text = payload(flags)
    launcher = median_fresh(runs, lambda ns: inside(ns, ["true"]))
    floor = median_fresh(runs, lambda ns: inside(ns, ["iptables-nft-restore", "--noflush"]), text)
    floor_legacy = median_fresh(runs, lambda ns: inside(ns, ["iptables-legacy-restore", "--noflush", "--wait"]), text)
    replay = script(istio_replay(flags))
    istio = median_fresh(runs, lambda ns: inside(ns, ["sh", replay]))
    nft_text = subprocess.run(
        [CLI, "--dry-run", "--native-nftables", *flags], capture_output=True, text=True, env=POD_ENV, check=True
    ).stdout
    floor_nft = median_fresh(runs, lambda ns: inside(ns, ["nft", "-f", "-"]), nft_text)
    rows = [
        Row("ip netns exec NS true (launcher, in every row)", launcher),
        Row("floor: iptables-nft-restore --noflush, same payload", floor, 1, floor),
        Row("floor: iptables-legacy-restore --noflush --wait", floor_legacy, 1, floor),
        Row("floor: nft -f, the native transaction", floor_nft, 1, floor),
        Row("Istio's way, replayed (detection, saves, restore)", istio, istio_replay(flags).count("\n") - 2, floor),
    ]
    variants = [
        ("ours: restore backend, nft (detected)", []),
        ("ours: restore backend, legacy", ["--force-iptables-binary", "legacy"]),
        ("ours: native nftables", ["--native-nftables"]),
    ]
    if _has_libiptc():
        variants.append(("ours: libiptc backend (legacy)", ["--backend", "libiptc"]))
    for label, extra in variants:
        seconds = median_fresh(runs, lambda ns, extra=extra: inside(ns, [CLI, *flags, *extra]))
        with namespace() as ns:
            spawned = count_processes(inside(ns, [CLI, *flags, *extra])) - 1  # minus `ip netns exec`'s exec
        rows.append(Row(label, seconds, spawned, floor, f"{seconds / istio:.2f}x of Istio's way"))
    dry = median_fresh(runs, lambda ns: inside(ns, [CLI, "--dry-run", *flags]))
    rows.append(Row("ours: --dry-run", dry, 0, floor))
    return rows


def scale(sizes: Sequence[int], replay_sample: int) -> list[Row]:
    rows = []
    for size in sizes:
        cidrs, ports = exclusions(size)
        cases = [
            ("-x CIDRs", ["-x", cidrs], []),
            ("-x CIDRs, native nftables", ["-x", cidrs], ["--native-nftables"]),
            ("-o ports", ["-o", ports], []),
            ("-d ports", ["-d", ports], []),
        ]
        for kind, extra, backend in cases:
            flags = [*_override(INIT_FLAGS, extra), *backend]
            first = extra[1].split(",")[0]
            changed = [*_override(INIT_FLAGS, [extra[0], extra[1].replace(first, _other(extra[0]), 1)]), *backend]
            with namespace() as ns:
                apply_time = timed(inside(ns, [CLI, *flags]))
                rerun_time = timed(inside(ns, [CLI, *flags]))
                status_time = timed(inside(ns, [CLI, *flags, "status"]))
                reconcile_time = timed(inside(ns, [CLI, *changed]))
                reconcile_processes = count_processes(inside(ns, [CLI, *flags])) - 1
                rerun_processes = count_processes(inside(ns, [CLI, *flags])) - 1
            with namespace() as ns:
                apply_processes = count_processes(inside(ns, [CLI, *flags])) - 1
            label = f"{kind} x{size}"
            rows += [
                Row(f"{label}: apply", apply_time, apply_processes),
                Row(f"{label}: unchanged re-run", rerun_time, rerun_processes),
                Row(f"{label}: status (ratio: to the unchanged re-run)", status_time, None, rerun_time),
                Row(f"{label}: reconcile (one entry changed)", reconcile_time, reconcile_processes),
            ]
            if not backend:
                rows.append(_istio_rerun(flags, rerun_time, replay_sample))
    return rows


def _istio_rerun(flags: Sequence[str], ours: float, sample: int) -> Row:
    """Istio's re-run (its detection, saves and one ``-C`` per rule) replayed in a namespace holding the
    rules. Each ``-C`` reads the whole table, so thousands of them take very long: past ``sample`` checks,
    ``sample`` of them are timed and the rest extrapolated from their average."""
    total = len(istio_checks(flags))
    with namespace() as ns:
        subprocess.run(inside(ns, [CLI, *flags]), env=POD_ENV, check=True, capture_output=True)
        fixed = timed(inside(ns, ["sh", script(istio_replay(flags, rerun=True, checks=0))]))
        measured = min(total, sample)
        sampled = timed(inside(ns, ["sh", script(istio_replay(flags, rerun=True, checks=measured))]))
    seconds = fixed + (sampled - fixed) * total / max(measured, 1)
    how = f"{measured} of {total} checks timed, the rest extrapolated; " if measured < total else ""
    processes = len(istio_replay(flags, rerun=True, checks=0).splitlines()) - 1 + total
    return Row(
        f"{flags_label(flags)}: Istio's re-run check replayed",
        seconds,
        processes,
        None,
        f"{how}{seconds / ours:.0f}x ours",
    )


def flags_label(flags: Sequence[str]) -> str:
    for flag in ("-x", "-o", "-d"):
        if flag in flags and flags[flags.index(flag) + 1] not in ("", "15090,15021,15020"):
            return f"{flag} x{len(flags[flags.index(flag) + 1].split(','))}"
    return "init flags"


def _override(flags: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The flags with one flag's value replaced (or added)."""
    result = list(flags)
    if not extra:
        return result
    if extra[0] in result:
        result[result.index(extra[0]) + 1] = extra[1]
    else:
        result += list(extra)
    return result


def _other(flag: str) -> str:
    """An entry no list of exclusions() holds, to change one entry."""
    return "100.127.0.0/16" if flag == "-x" else "30999"


def connection_rate(seconds: float, size: int) -> list[Row]:
    """New TCP connections per second from the app (uid 1000) through capture to the proxy's listener, with
    no exclusion and with ``size`` excluded CIDRs and ports that the destination does not match, as rule
    lists and as --match-sets lookups, per backend."""
    cidrs, ports = exclusions(size)
    rows = []
    for backend, backend_flags in (
        ("iptables-nft", ["--force-iptables-binary", "nft"]),
        ("iptables-legacy", ["--force-iptables-binary", "legacy"]),
        ("native nftables", ["--native-nftables"]),
    ):
        base = None
        for label, extra in (
            ("0 exclusions", []),
            (f"{size} CIDRs + {size} ports excluded, rule lists", ["-x", cidrs, "-o", ports]),
            (f"{size} CIDRs + {size} ports excluded, --match-sets", ["-x", cidrs, "-o", ports, "--match-sets"]),
        ):
            rate = _rate([*_override(INIT_FLAGS, extra[:2]), *extra[2:], *backend_flags], seconds)
            base = base or rate
            rows.append(Row(f"{backend}: {label}", 1 / rate, None, 1 / base, f"{rate:,.0f} conn/s"))
    return rows


def _rate(flags: Sequence[str], seconds: float) -> float:
    with namespace() as ns:
        subprocess.run(inside(ns, [CLI, *flags]), env=POD_ENV, check=True, capture_output=True)
        server = subprocess.Popen(inside(ns, [PYTHON, "-c", _ACCEPTOR]), stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            server.stdout.readline()
            client = subprocess.run(
                inside(
                    ns,
                    [
                        "setpriv",
                        "--reuid",
                        "1000",
                        "--regid",
                        "1000",
                        "--clear-groups",
                        PYTHON,
                        "-c",
                        _CONNECTOR,
                        str(seconds),
                    ],
                ),
                capture_output=True,
                text=True,
                check=True,
                timeout=seconds + 30,
            )
            return float(client.stdout)
        finally:
            server.kill()
            server.wait()


# The proxy's outbound listener, reduced to accepting and closing: the kernel's work is what is measured.
_ACCEPTOR = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 15001)); s.listen(4096); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""
# The app: connections to a peer address outside every exclusion, for a fixed time, one after another.
_CONNECTOR = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[1]); n = 0
while time.monotonic() < end:
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00")
    c.connect(("198.18.0.99", 8080)); c.close(); n += 1
print(n / float(sys.argv[1]))
"""


def memory(size: int) -> list[Row]:
    cidrs, ports = exclusions(size)
    with namespace() as ns:
        result = subprocess.run(
            ["/usr/bin/time", "-f", "%M", *inside(ns, [CLI, *_override(INIT_FLAGS, ["-x", cidrs]), "-o", ports])],
            capture_output=True,
            text=True,
            env=POD_ENV,
            check=True,
        )
    peak_kb = int(result.stderr.strip().splitlines()[-1])
    return [Row(f"peak RSS of an apply with {size} CIDRs + {size} ports", 0, amount=f"{peak_kb:,}")]


MEMORY_TITLE = "Memory"
WEBHOOK_TITLE = "Admission webhook: reviews over HTTPS on 127.0.0.1 (ratio: against the in-process answer)"


def webhook_reviews(runs: int, reviews: int, clients: int = 20) -> list[Row]:
    """The admission webhook on 127.0.0.1 (its own process, a throwaway certificate): one review answered in
    process (the injection and the JSON Patch, no HTTP) as the baseline; one client's reviews one after
    another; ``clients`` clients on their own keep-alive connections. And the init container's run, which
    must load none of it."""
    from istio_iptables.kube.inject import Outcome, injected_pod  # noqa: PLC0415 (the webhook extra, this section only)
    from istio_iptables.kube.manifests import load_injector  # noqa: PLC0415
    from istio_iptables.kube.webhook import answer  # noqa: PLC0415

    pod = {
        "metadata": {"generateName": "app-7d9f-", "labels": {"app": "app"}},
        "spec": {"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]},
    }
    request = {"uid": "", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE"}
    request |= {"namespace": "apps", "object": pod}

    def body(index: int) -> bytes:
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
        return json.dumps({**review, "request": {**request, "uid": f"review-{index}"}}).encode()

    # The pod gets the shipped relay's proxy and the capture, in process as from the server.
    injector = load_injector(sets=(), values_file="", mesh_file="", image="", hardened=False, injector_config="relay")

    def inject(pod: Any, workload: str, namespace: str) -> Outcome:
        return injected_pod(pod, injector, workload=workload, namespace=namespace)

    in_process, cpu = [], []
    for index in range(runs * 20):
        started, started_cpu = time.perf_counter(), time.process_time()
        answer(json.loads(body(index)), inject)
        in_process.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    baseline = statistics.median(in_process)
    # The CPU time does not grow with what else the machine runs, as the wall-clock time does.
    cpu_note = f"CPU {statistics.median(cpu) * 1000:.2f} ms"

    with tempfile.TemporaryDirectory(prefix="iibench-") as directory, _webhook(directory) as (port, _):
        context = ssl.create_default_context(cafile=os.path.join(directory, "tls.crt"))
        sequential, _ = asyncio.run(_review_load(port, context, body, runs * 20, 1))
        latencies, seconds = asyncio.run(_review_load(port, context, body, reviews, clients))
    p50, p99 = (statistics.quantiles(latencies, n=100)[q - 1] for q in (50, 99))
    rate = f"{len(latencies) / seconds:,.0f} reviews/s, {len(latencies)} reviews, no error"
    importtime = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "istio_iptables", "--dry-run", *INIT_FLAGS],
        capture_output=True,
        text=True,
        env=POD_ENV,
        check=True,
    ).stderr
    loaded = re.findall(r"\| +(aiohttp|jsonpatch|yaml|istio_iptables\.kube)\b", importtime)
    return [
        Row("in process: answer() to one pod's review (injection + JSON Patch)", baseline, None, baseline, cpu_note),
        Row("HTTPS, 1 client, one review after another: median", statistics.median(sequential), None, baseline),
        Row(f"HTTPS, {clients} concurrent clients: median", p50, None, baseline, rate),
        Row(f"HTTPS, {clients} concurrent clients: p99", p99, None, baseline),
        Row("the init container's run: webhook, injection and YAML modules loaded", 0, amount=f"{len(loaded)} modules"),
    ]


@contextlib.contextmanager
def _webhook(directory: str) -> Iterator[tuple[int, int]]:
    """``istio-iptables webhook`` on 127.0.0.1, a port the kernel picks, with a self-signed certificate."""
    cert, key = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
            *("-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", key, "-out", cert),
        ],
        capture_output=True,
        check=True,
    )
    server = subprocess.Popen(
        [
            *(CLI, "webhook", "--address", "127.0.0.1", "--port", "0"),
            *("--tls-cert-file", cert, "--tls-key-file", key, "--injector-config", "relay"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        match = re.search(r"https://127\.0\.0\.1:(\d+)", line)
        if not match:
            raise SystemExit(f"bench: the webhook did not start: {line}{server.stderr.read()[-2000:]}")
        # The log is read on (and dropped) so that the server never blocks on a full pipe.
        threading.Thread(target=lambda: server.stderr.read() if server.stderr else None, daemon=True).start()
        yield int(match[1]), server.pid
    finally:
        server.terminate()
        server.wait(10)


async def _review_load(
    port: int, context: Any, body: Callable[[int], bytes], reviews: int, clients: int
) -> tuple[list[float], float]:
    """``reviews`` reviews from ``clients`` clients, each on its own connection: every review's latency, and
    the wall time of all."""
    import aiohttp  # noqa: PLC0415

    url = f"https://127.0.0.1:{port}/inject"
    latencies: list[float] = []

    async def client(indexes: range) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=1)) as session:
            for index in indexes:
                started = time.perf_counter()
                async with session.post(url, data=body(index), headers={"Content-Type": "application/json"}) as reply:
                    answered = await reply.json()
                if reply.status != 200 or answered["response"]["uid"] != f"review-{index}":
                    raise SystemExit(f"bench: review {index}: HTTP {reply.status}: {answered}")
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    share = -(-reviews // clients)
    await asyncio.gather(*(client(range(n * share, min(reviews, (n + 1) * share))) for n in range(clients)))
    return latencies, time.perf_counter() - started


SOAK_TITLE = "Admission webhook soak: mixed requests, the server's RSS sampled (ratio: against RSS after warm-up)"


def webhook_soak(requests: int, clients: int = 8) -> list[Row]:
    """``requests`` requests from ``clients`` clients, mixed as an API server, a clumsy client and an attacker
    would send them: reviews of pods (one in five on a new connection, as after an API server's restart), bad
    JSON, gzip bombs, bodies labelled gzip that are not, a 256 KiB value, 100,000-deep nesting, and
    connections left idle or half-sent. The
    server's RSS after a warm-up of 1,000 is the baseline; the end and the peak are compared with it."""
    import gzip  # noqa: PLC0415

    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "soak",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "apps",
            "object": {"metadata": {"generateName": "app-"}, "spec": {"containers": [{"name": "app"}]}},
        },
    }
    deep = "[" * 100_000 + "]" * 100_000
    valid = json.dumps(review).encode()
    # One in 16 of each attack: (body, headers, the statuses it may get, on a new connection).
    mix: list[tuple[bytes, dict[str, str], tuple[int, ...], bool]] = [
        *[(valid, {}, (200,), new_connection) for new_connection in (False,) * 8 + (True,) * 2],
        (b"{", {}, (400,), False),
        (valid[:-1], {}, (400,), True),
        (gzip.compress(b" " * (64 * 1024 * 1024)), {"Content-Encoding": "gzip"}, (413,), True),
        (b"not gzip", {"Content-Encoding": "gzip"}, (400,), False),
        (json.dumps({**review, "apiVersion": "v" * (256 * 1024)}).encode(), {}, (400,), False),
        (json.dumps({**review, "request": deep}).encode(), {}, (400,), True),
    ]
    with tempfile.TemporaryDirectory(prefix="iibench-") as directory, _webhook(directory) as (port, pid):
        context = ssl.create_default_context(cafile=os.path.join(directory, "tls.crt"))

        def rss() -> int:
            with open(f"/proc/{pid}/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        samples: list[int] = []

        async def soak(indexes: range) -> None:
            await _mixed_load(port, context, mix, indexes, clients)
            samples.append(rss())

        started = time.perf_counter()
        asyncio.run(soak(range(1000)))
        warm = samples[-1]
        for first in range(1000, requests, 1000):
            asyncio.run(soak(range(first, min(requests, first + 1000))))
        seconds = time.perf_counter() - started
    mib = 1024 * 1024
    note = f"{requests:,} requests in {seconds:.0f} s, {len(samples)} samples"
    return [
        Row("RSS after 1,000 requests (warm-up)", warm, baseline=warm, amount=f"{warm / mib:.1f}"),
        Row(
            f"RSS after {requests:,} requests", samples[-1], baseline=warm, amount=f"{samples[-1] / mib:.1f}", note=note
        ),
        Row("RSS, the highest sample", max(samples), baseline=warm, amount=f"{max(samples) / mib:.1f}"),
    ]


async def _mixed_load(
    port: int,
    context: Any,
    mix: Sequence[tuple[bytes, dict[str, str], tuple[int, ...], bool]],
    indexes: range,
    clients: int,
) -> None:
    """Request ``index`` is ``mix[index % len(mix)]``: its body, headers, the statuses it may get and whether it
    goes on a new connection; every client also leaves one connection idle and one with half a request."""
    import aiohttp  # noqa: PLC0415

    url = f"https://127.0.0.1:{port}/inject"

    async def client(share: range) -> None:
        _, idle = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        _, partial = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        partial.write(b"POST /inject HTTP/1.1\r\nHost: soak\r\n")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=1)) as session:
            for index in share:
                body, headers, statuses, new_connection = mix[index % len(mix)]
                headers = {"Content-Type": "application/json", **headers}
                if new_connection:
                    headers["Connection"] = "close"
                try:
                    async with session.post(url, data=body, headers=headers) as reply:
                        await reply.read()
                        status = reply.status
                except aiohttp.ClientError:
                    status = 0  # closed while the body was being sent: a refusal of an oversized one
                if status not in statuses and not (status == 0 and 413 in statuses):
                    raise SystemExit(f"bench: soak request {index}: HTTP {status}, expected {statuses}")
        for writer in (idle, partial):
            writer.close()

    share = -(-len(indexes) // clients)
    await asyncio.gather(
        *(client(indexes[n * share : (n + 1) * share]) for n in range(clients) if indexes[n * share : (n + 1) * share])
    )


def cni_setup(runs: int) -> list[Row]:
    """What the plugin adds to a pod's network set-up: the runtime's whole ADD (loopback, then bridge with
    host-local, then ours) in a node namespace, against the same list without ours; a fresh pod each run,
    the variants interleaved so that load on the machine hits them alike."""
    sys.path.insert(0, str(ROOT))
    from tests.kernel import cnilab  # noqa: PLC0415 (the tests' runtime: one way to run a CNI list)

    injected = cnilab.INJECTED
    build = ROOT / "dist" / cnilab.PLUGIN_NAME / cnilab.PLUGIN_NAME
    if not build.exists():
        subprocess.run([str(ROOT / "scripts" / "build-cni-plugin")], check=True, env={**os.environ, "PYTHON": PYTHON})
    cases = [
        ("bridge + host-local + loopback, without the plugin", None, None, False),
        ("with the plugin, self-contained build, injected pod (rules applied)", build, injected, True),
        ("with the plugin, self-contained build, pod left alone", build, {}, True),
        ("with the plugin, console script (venv), injected pod", cnilab.CONSOLE_PLUGIN, injected, True),
    ]
    times: dict[str, list[float]] = {label: [] for label, *_ in cases}
    cpu: dict[str, list[float]] = {label: [] for label, *_ in cases}
    with cnilab.CniLab() as lab:
        runtimes = []
        for label, plugin, annotations, chained in cases:
            runtime = cnilab.make_runtime(lab, Path(plugin or build), {"iptables": "nft"}, f"node{len(runtimes)}")
            runtime.chained = chained
            runtimes.append((label, runtime, annotations))
        for _ in range(runs):
            for label, runtime, annotations in runtimes:
                pod = runtime.new_pod(annotations)
                before, started = _children_cpu(), time.perf_counter()
                runtime.add(pod)
                times[label].append(time.perf_counter() - started)
                cpu[label].append(_children_cpu() - before)
                runtime.delete(pod)
                runtime.remove_netns(pod)
    baseline, baseline_cpu = statistics.median(times[cases[0][0]]), statistics.median(cpu[cases[0][0]])
    rows = []
    for label, *_ in cases:
        seconds, used = statistics.median(times[label]), statistics.median(cpu[label])
        note = f"CPU {used * 1000:.0f} ms"
        if label != cases[0][0]:
            note += f"; adds {(seconds - baseline) * 1000:.0f} ms, {(used - baseline_cpu) * 1000:.0f} ms of CPU"
        rows.append(Row(label, seconds, baseline=baseline, note=note))
    return rows


CNI_RUNTIME_TITLE = "CNI mode through containerd: RunPodSandbox with the plugin against the same chain without it"


def cni_runtime(runs: int) -> list[Row]:
    """A pod's start as a kubelet asks for it: RunPodSandbox on containerd's CRI (the kubelet lab's node, its
    chain loopback, bridge, host-local), on a node whose conflist ends with the plugin and on one without it;
    the plugin as the thin client running the self-contained bundle (no agent), and as the thin client
    handing requests to the node agent (``cni agent`` in the node's namespaces, as the DaemonSet runs it); a
    pod left alone and a captured pod; a fresh sandbox each run, the variants interleaved. Then the plugin's
    own process on a pod left alone (CPU), against the same bundle built to do nothing: what its bootstrap
    costs before a line of ours."""
    sys.path.insert(0, str(ROOT))
    from istio_iptables.cni import cri, install  # noqa: PLC0415
    from tests.kernel import cnilab  # noqa: PLC0415
    from tests.lab import images as lab_images  # noqa: PLC0415
    from tests.lab import node as lab_node  # noqa: PLC0415

    build = ROOT / "dist" / cnilab.PLUGIN_NAME
    subprocess.run([str(ROOT / "scripts" / "build-cni-plugin")], check=True, env={**os.environ, "PYTHON": PYTHON})
    idle = Path(tempfile.mkdtemp(prefix="istio-iptables-bench-"))
    atexit.register(shutil.rmtree, idle, True)
    # The same contents, nothing run: the import is seen by the build and never executed.
    subprocess.run(
        [str(ROOT / "scripts" / "build-cni-plugin")],
        check=True,
        env={**os.environ, "PYTHON": PYTHON, "DIST": str(idle), "WORK": str(idle / "work"),
             "ENTRY": 'if __name__ == "never": import istio_iptables.cli.console'},
    )  # fmt: skip
    pause = lab_images.pause_image().archive
    cases = [
        ("bridge + host-local + loopback, without the plugin", "plain", None),
        ("with the plugin (bundle, no agent), pod left alone", "bundle", {}),
        ("with the plugin (bundle, no agent), captured pod (rules applied)", "bundle", cnilab.INJECTED),
        ("with the plugin (client + node agent), pod left alone", "agent", {}),
        ("with the plugin (client + node agent), captured pod (rules applied)", "agent", cnilab.INJECTED),
    ]
    times: dict[str, list[float]] = {label: [] for label, *_ in cases}
    with lab_node.Node() as plain, lab_node.Node() as bundled, lab_node.Node() as served:
        nodes = {"plain": plain, "bundle": bundled, "agent": served}
        for node in nodes.values():
            node.import_image(pause)
        socket_path = served.paths.top / "agent" / "agent.sock"
        for node, agent_socket in ((bundled, ""), (served, str(socket_path))):
            # As `cni install` puts it there; the node's root is this machine's (the glibc check).
            install.install(node.paths.cni_conf, node.paths.cni_bin, build / cnilab.PLUGIN_NAME, {"iptables": "nft"},
                            agent_socket=agent_socket)  # fmt: skip
        agent = subprocess.Popen(
            [*served.joined(), CLI, "cni", "agent", "--socket", str(socket_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not socket_path.exists():
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench: the CNI node agent did not start")
                time.sleep(0.05)
            time.sleep(2)  # containerd reloads its conf dir a moment after a change
            for run in range(runs + 1):
                for label, kind, annotations in cases:
                    node = nodes[kind]
                    config = cri.SandboxConfig(
                        name=f"bench-{run}", namespace="default", uid=f"bench-{run}-{len(times[label])}",
                        annotations=annotations or {}, cgroup_parent=f"{node.cgroup_parent}/bench{run}",
                        dns_servers=("198.18.96.10",),
                    )  # fmt: skip
                    started = time.perf_counter()
                    sandbox = node.runtime.run_sandbox(config)
                    if run:  # the first run of each is containerd's warm-up
                        times[label].append(time.perf_counter() - started)
                    node.runtime.stop_sandbox(sandbox)
                    node.runtime.remove_sandbox(sandbox)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
    load = os.getloadavg()[0]
    baseline = statistics.median(times[cases[0][0]])
    rows = []
    for label, *_ in cases:
        seconds = statistics.median(times[label])
        note = (
            f"load average {load:.1f} after the runs"
            if label == cases[0][0]
            else f"adds {(seconds - baseline) * 1000:.0f} ms"
        )
        rows.append(Row(label, seconds, baseline=None if label == cases[0][0] else baseline, note=note))
    request = {
        "cniVersion": "1.0.0", "name": "k8s", "type": cnilab.PLUGIN_NAME,
        "runtimeConfig": {cnilab.ANNOTATIONS_CAPABILITY: {}}, "prevResult": {"cniVersion": "1.0.0", "dns": {}},
    }  # fmt: skip
    environment = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bench", "CNI_NETNS": "/nonexistent", "CNI_IFNAME": "eth0",
                   "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench", "PATH": os.environ["PATH"]}  # fmt: skip
    bundle = f"{cnilab.PLUGIN_NAME}.d/{cnilab.PLUGIN_NAME}"
    processes = [
        ("the plugin's process alone (bundle), pod left alone", build / bundle),
        ("the same bundle doing nothing (its bootstrap: the floor)", idle / cnilab.PLUGIN_NAME / bundle),
    ]
    cpu: dict[str, list[float]] = {label: [] for label, _ in processes}
    for _ in range(runs * 2):
        for label, executable in processes:
            before = _children_cpu()
            subprocess.run([str(executable)], input=json.dumps(request).encode(), env=environment,
                           stdout=subprocess.DEVNULL, check=True)  # fmt: skip
            cpu[label].append(_children_cpu() - before)
    floor = statistics.median(cpu[processes[1][0]])
    for label, _ in processes:
        used = statistics.median(cpu[label])
        rows.append(Row(label, used, baseline=floor if used != floor else None, note="CPU (user + system)"))
    return rows


def _children_cpu() -> float:
    """CPU seconds (user and system) of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _has_libiptc() -> bool:
    return subprocess.run([PYTHON, "-c", "import iptc"], capture_output=True, check=False).returncode == 0


# ---- report ---------------------------------------------------------------------------------------------


def table(title: str, rows: list[Row], unit: str = "median ms") -> str:
    lines = [f"### {title}", "", f"| what | {unit} | ratio | processes | note |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    iptables = subprocess.run(["iptables", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, {iptables}"


MEASURED = "<!-- Everything below this line is written by scripts/bench. -->\n"
UNITS = {MEMORY_TITLE: "KiB", SOAK_TITLE: "MiB"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench")
    parser.add_argument("--runs", type=int, default=15, help="runs per median (default 15)")
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--replay-sample", type=int, default=300, help="-C checks timed in Istio's re-run replay")
    parser.add_argument("--rate-seconds", type=float, default=3.0)
    parser.add_argument("--reviews", type=int, default=2000, help="reviews sent to the webhook by 20 clients")
    parser.add_argument("--soak", type=int, default=20000, help="mixed requests of the webhook's soak")
    parser.add_argument("--output", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--only", help="run only the sections whose title contains this text; print, write nothing")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("strace"):
        raise SystemExit("scripts/bench needs root and strace (scripts/bench installs it)")
    sizes = [int(size) for size in args.sizes.split(",")]
    sections: list[tuple[str, Callable[[], list[Row]]]] = [
        ("Start-up", lambda: startup(args.runs)),
        ("Imports of an apply: python -X importtime, each module's own time", lambda: import_costs(args.runs)),
        (
            "Imports of a plain apply against the interpreter's: modules, import time summed",
            lambda: import_counts(args.runs),
        ),
        ("Apply latency: init container's default flags, fresh namespace per run", lambda: apply_latency(args.runs)),
        ("Scale: entries in -x, -o, -d", lambda: scale(sizes, args.replay_sample)),
        (
            "New connections per second through the capture (ratio: cost per connection)",
            lambda: connection_rate(args.rate_seconds, max(sizes)),
        ),
        (WEBHOOK_TITLE, lambda: webhook_reviews(args.runs, args.reviews)),
        (SOAK_TITLE, lambda: webhook_soak(args.soak)),
        ("CNI mode: a pod's network set-up by the runtime (ADD of the whole list)", lambda: cni_setup(args.runs)),
        (CNI_RUNTIME_TITLE, lambda: cni_runtime(args.runs)),
        (MEMORY_TITLE, lambda: memory(max(sizes))),
    ]
    chosen = [(title, run) for title, run in sections if not args.only or args.only in title]
    report = f"Machine: {machine()}\n\nCommand: `sudo scripts/bench` ({args.runs} runs per median)\n\n"
    report += "\n".join(table(title, run(), unit=UNITS.get(title, "median ms")) for title, run in chosen)
    print(report)
    if args.only:
        return
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The document's own text (what the numbers say) stands above the marker and is kept.
    text = output.read_text() if output.exists() else ""
    kept = text.partition(MEASURED)[0] if MEASURED in text else ""
    output.write_text(f"{kept}{MEASURED}\n{report}")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
