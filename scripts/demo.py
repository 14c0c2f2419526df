"""The demo behind scripts/demo: a pod namespace, its app and proxy, a peer, the init container's flags."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kernel.netlab import ISTIO_IPTABLES, PEER4, POD4, Lab

FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
FLAGS += ["-d", "15090,15021,15020"]
COUNTED = re.compile(r"^\[(\d+):(\d+)\] (-A .*)$")


def counters(lab: Lab) -> dict[str, int]:
    """Packet counters of every rule of the pod's nat table."""
    saved = lab.sh(lab.pod, ["iptables-nft-save", "-c", "-t", "nat"])
    found: dict[str, int] = {}
    for line in saved.splitlines():
        match = COUNTED.match(line)
        if match:
            found[match.group(3)] = found.get(match.group(3), 0) + int(match.group(1))
    return found


def show(title: str, response: str, before: dict[str, int], after: dict[str, int]) -> None:
    print(f"\n== {title}")
    print(f"   answer: {response.strip()}")
    print("   rules that matched it (IPv4 nat table, packets):")
    for rule, packets in after.items():
        if packets > before.get(rule, 0):
            print(f"     {packets - before.get(rule, 0):>3}  {rule}")


def main() -> None:
    with Lab() as lab:
        print(f"pod namespace {lab.pod} ({POD4}), peer namespace {lab.peer} ({PEER4})")
        peer = lab.echo(lab.peer, "peer", [8080])
        app = lab.echo(lab.pod, "app", [9080], uid=1000)
        proxy = lab.proxy()
        lab.wait_ready(peer, app, proxy)
        print("app: echo server on :9080 as uid 1000; proxy: listeners :15001 and :15006 as uid 1337")

        command = [str(ISTIO_IPTABLES), "--network-namespace", lab.pod, *FLAGS]
        print("\n$ " + " ".join(arg if arg and arg != "*" else repr(arg) for arg in command))
        subprocess.run(command, check=True, timeout=60)

        before = counters(lab)
        outbound = lab.client(PEER4, 8080, data="outbound from the app")
        after = counters(lab)
        show(f"outbound: the app (uid 1000) calls the peer {PEER4}:8080", outbound, before, after)

        inbound = lab.client(POD4, 9080, data="inbound from the peer", ns=lab.peer, uid=0)
        show(f"inbound: the peer calls the app at {POD4}:9080", inbound, after, counters(lab))
        print("\n(PROXY15001| and PROXY15006| mark what the proxy relayed; the app saw the call from 127.0.0.6)")
    print("\nremoved the namespaces and processes of the demo")


if __name__ == "__main__":
    main()
