"""Golden dry-run cases: our own outputs for flag combinations beyond Istio's goldens.

Each case is ``(name, argv)``; ``tests/golden/<name>.txt`` holds the CLI's stdout for ``argv``. Every argv has
``--dry-run`` and ``--ipv6`` or ``--no-ipv6``, and a ``-u``, so neither the host's addresses nor its
``istio-proxy`` user matter; DNS cases name their servers (``--dns-servers``), capture all, or read
``/dev/null`` as resolv.conf. Regenerate the snapshots with ``scripts/regen-goldens``.
"""

from __future__ import annotations

# The injector's command line (reference 2.3), without -m.
INJECTION = ["-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]
REDIRECT = [*INJECTION, "-m", "REDIRECT"]
TPROXY = [*INJECTION, "-m", "TPROXY"]
DNS = ["--redirect-dns", "--dns-servers", "10.96.0.10"]
DUAL_DNS = ["--redirect-dns", "--dns-servers", "10.96.0.10,fd00:10:96::a"]

CASES: list[tuple[str, list[str]]] = [
    # ---- the injector's defaults, per mode and family ----------------------------------------------
    ("default-injection", ["--dry-run", *REDIRECT, "--no-ipv6"]),
    ("default-injection-ipv6", ["--dry-run", *REDIRECT, "--ipv6"]),
    ("default-injection-tproxy", ["--dry-run", *TPROXY, "--no-ipv6"]),
    ("default-injection-tproxy-ipv6", ["--dry-run", *TPROXY, "--ipv6"]),
    ("empty", ["--dry-run", "-u", "1337", "--no-ipv6"]),
    ("empty-ipv6", ["--dry-run", "-u", "1337", "--ipv6"]),
    # ---- DNS ---------------------------------------------------------------------------------------
    ("dns-server", ["--dry-run", *REDIRECT, *DNS, "--no-ipv6"]),
    ("dns-servers-dual-stack", ["--dry-run", *REDIRECT, *DUAL_DNS, "--ipv6"]),
    ("dns-v6-server-only", ["--dry-run", *REDIRECT, "--redirect-dns", "--dns-servers", "fd00:10:96::a", "--ipv6"]),
    ("dns-v4-server-only-ipv6", ["--dry-run", *REDIRECT, *DNS, "--ipv6"]),
    ("dns-capture-all", ["--dry-run", *REDIRECT, "--redirect-dns", "--capture-all-dns", "--no-ipv6"]),
    (
        "dns-capture-all-ipv6-uids-gids",
        ["--dry-run", *REDIRECT, "--redirect-dns", "--capture-all-dns", "-u", "3,4", "-g", "1,2", "--ipv6"],
    ),
    ("dns-no-servers-is-off", ["--dry-run", *REDIRECT, "--redirect-dns", "--resolv-conf", "/dev/null", "--no-ipv6"]),
    ("dns-tproxy", ["--dry-run", *TPROXY, *DUAL_DNS, "--ipv6"]),
    # ---- owner groups ------------------------------------------------------------------------------
    ("owner-groups-include", ["--dry-run", *REDIRECT, "--outbound-owner-groups", "java,202", "--no-ipv6"]),
    ("owner-groups-include-one", ["--dry-run", *REDIRECT, "--outbound-owner-groups", "202", "--ipv6"]),
    ("owner-groups-exclude", ["--dry-run", *REDIRECT, "--outbound-owner-groups-exclude", "888,ftp", "--no-ipv6"]),
    ("owner-groups-empty", ["--dry-run", *REDIRECT, "--outbound-owner-groups", "", "--no-ipv6"]),
    ("owner-groups-dns", ["--dry-run", *REDIRECT, *DNS, "--outbound-owner-groups-exclude", "888", "--no-ipv6"]),
    # ---- TPROXY ------------------------------------------------------------------------------------
    ("tproxy-exclude-interfaces", ["--dry-run", *TPROXY, "-c", "eth9,not-istio-nic", "--ipv6"]),
    ("tproxy-empty-inbound", ["--dry-run", "-m", "TPROXY", "-u", "1337", "--no-ipv6"]),
    ("tproxy-empty-inbound-ipv6", ["--dry-run", "-m", "TPROXY", "-u", "1337", "-i", "*", "--ipv6"]),
    (
        "tproxy-ports-custom-mark",
        ["--dry-run", "-m", "TPROXY", "-b", "8080,9090", "-d", "15020", "-t", "7", "-r", "200", "-u", "1337", "--ipv6"],
    ),
    ("tproxy-uids-gids", ["--dry-run", *TPROXY, "-u", "3,4", "-g", "1,2", "--no-ipv6"]),
    # ---- kube-virt, CIDRs, ports -------------------------------------------------------------------
    ("kube-virt-cidrs", ["--dry-run", "-u", "1337", "-k", "kv0,kv1", "-i", "10.0.0.0/8,172.16.0.0/12", "--no-ipv6"]),
    (
        "kube-virt-dual-stack",
        ["--dry-run", "-u", "1337", "-k", "kv0", "-b", "*", "-i", "10.0.0.0/8,fd00::/8", "--ipv6"],
    ),
    ("kube-virt-wildcard", ["--dry-run", "-u", "1337", "-k", "kv0,kv1", "-b", "80", "-i", "*", "--no-ipv6"]),
    (
        "outbound-ports-include-exclude",
        ["--dry-run", *REDIRECT, "-q", "3306,5432", "-o", "9000,9001", "--no-ipv6"],
    ),
    ("exclude-cidrs-no-include", ["--dry-run", "-u", "1337", "-x", "10.1.0.0/16,fd00:1::/64", "--ipv6"]),
    (
        "exclude-and-include-cidrs-dual-stack",
        [
            "--dry-run",
            "-u",
            "1337",
            "-x",
            "10.1.0.0/16,fd00:1::/64",
            "-i",
            "10.0.0.0/8,fd00::/8,192.168.0.0/16",
            "--ipv6",
        ],
    ),
    ("cidr-host-bits-kept", ["--dry-run", "-u", "1337", "-i", "10.0.0.1/8", "-x", "10.9.9.9/16", "--no-ipv6"]),
    ("inbound-ports-list-ignores-d", ["--dry-run", "-u", "1337", "-b", "80,443", "-d", "9999", "--no-ipv6"]),
    (
        "custom-ports",
        ["--dry-run", "-p", "16001", "-z", "16006", "-e", "16008", "-u", "1337", "-b", "*", "-i", "*", "--no-ipv6"],
    ),
    ("uids-gids-lists", ["--dry-run", *REDIRECT, "-u", "3,4", "-g", "1,2", "--ipv6"]),
    # ---- drop invalid, loopback ----------------------------------------------------------------------
    ("drop-invalid", ["--dry-run", *REDIRECT, "--drop-invalid", "--no-ipv6"]),
    ("drop-invalid-tproxy-ipv6", ["--dry-run", *TPROXY, "--drop-invalid", "--ipv6"]),
    ("loopback-cidr-8", ["--dry-run", *REDIRECT, "--host-ipv4-loopback-cidr", "127.0.0.1/8", "--ipv6"]),
    ("loopback-cidr-tproxy", ["--dry-run", *TPROXY, "--host-ipv4-loopback-cidr", "127.0.0.1/16", "--no-ipv6"]),
    (
        "loopback-include-cidr-dns",
        [
            "--dry-run",
            "-u",
            "3,4",
            "-g",
            "1,2",
            "-i",
            "127.1.2.3/32",
            "--redirect-dns",
            "--dns-servers",
            "127.0.0.53",
            "--no-ipv6",
        ],
    ),
    # ---- everything at once --------------------------------------------------------------------------
    (
        "kitchen-sink",
        [
            "--dry-run",
            "-m",
            "TPROXY",
            "-c",
            "eth9",
            "-k",
            "kv0",
            "--drop-invalid",
            "-b",
            "*",
            "-d",
            "15090",
            "-o",
            "9999",
            "-u",
            "3",
            "-g",
            "4",
            *DUAL_DNS,
            "--outbound-owner-groups-exclude",
            "888",
            "-x",
            "10.1.0.0/16,fd00:1::/64",
            "-q",
            "7777",
            "-i",
            "10.0.0.0/8,fd00::/8",
            "--ipv6",
        ],
    ),
    # ---- native nftables: Istio's nft transaction, both families in one inet table per iptables table ----
    ("nft-default-injection", ["--dry-run", "--native-nftables", *REDIRECT, "--no-ipv6"]),
    ("nft-default-injection-tproxy-ipv6", ["--dry-run", "--native-nftables", *TPROXY, "-g", "7", "--ipv6"]),
    (
        "nft-dns-servers-dual-stack",
        [
            "--dry-run",
            "--native-nftables",
            *REDIRECT,
            "--redirect-dns",
            "--dns-servers",
            "10.96.0.10,10.96.0.11,fd00:10:96::a",
            "-u",
            "3,4",
            "--ipv6",
        ],
    ),
    (
        "nft-dns-capture-all-outbound-ports",
        [
            "--dry-run",
            "--native-nftables",
            *REDIRECT,
            "--redirect-dns",
            "--capture-all-dns",
            "-o",
            "9000,9001",
            "-q",
            "3306",
            "--drop-invalid",
            "--ipv6",
        ],
    ),
    (
        "nft-cidrs-kube-virt-dual-stack",
        [
            "--dry-run",
            "--native-nftables",
            "-u",
            "1337",
            "-k",
            "kv0,kv1",
            "-b",
            "80,443",
            "-x",
            "10.1.0.0/16,fd00:1::/64",
            "-i",
            "10.0.0.0/8,192.168.0.0/16,fd00::/8",
            "--ipv6",
        ],
    ),
    (
        "nft-owner-groups-include",
        ["--dry-run", "--native-nftables", *REDIRECT, "--outbound-owner-groups", "java,202", "--no-ipv6"],
    ),
    (
        "nft-kitchen-sink",
        [
            "--dry-run",
            "--native-nftables",
            "-m",
            "TPROXY",
            "-c",
            "eth9",
            "-k",
            "kv0",
            "--drop-invalid",
            "-b",
            "*",
            "-d",
            "15090",
            "-o",
            "9999",
            "-u",
            "3",
            "-g",
            "4",
            *DUAL_DNS,
            "--outbound-owner-groups-exclude",
            "888",
            "-x",
            "10.1.0.0/16,fd00:1::/64",
            "-q",
            "7777",
            "-i",
            "10.0.0.0/8,fd00::/8",
            "--ipv6",
        ],
    ),
    # ---- the other output formats --------------------------------------------------------------------
    ("format-restore-explicit", ["--dry-run", "--dry-run-format", "restore", *REDIRECT, "--no-ipv6"]),
    ("format-commands-default-injection", ["--dry-run", "--dry-run-format", "commands", *REDIRECT, "--no-ipv6"]),
    ("format-commands-tproxy-ipv6", ["--dry-run", "--dry-run-format", "commands", *TPROXY, *DUAL_DNS, "--ipv6"]),
    ("format-json-default-injection", ["--dry-run", "--dry-run-format", "json", *REDIRECT, "--no-ipv6"]),
    ("format-json-tproxy-dns-ipv6", ["--dry-run", "--dry-run-format", "json", *TPROXY, *DUAL_DNS, "--ipv6"]),
    (
        "format-json-owner-groups-kube-virt",
        [
            "--dry-run",
            "--dry-run-format",
            "json",
            "-u",
            "1337",
            "-k",
            "kv0",
            "-i",
            "10.0.0.0/8",
            "--outbound-owner-groups",
            "java,202",
            "--no-ipv6",
        ],
    ),
]
