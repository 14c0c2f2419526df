"""The python-iptables backend (``--backend libiptc``): restore payloads applied in-process through libiptc.

libiptc reads a whole legacy (x_tables) table into one handle, takes any number of changes, and hands the
kernel the new table in one step at commit, which the kernel accepts or refuses whole. So each table of a
payload gets one handle and one commit, at its ``COMMIT`` line: exactly the atomicity of iptables-restore,
without running it. Rules are built generically from their iptables arguments through the same libxtables
extensions iptables uses, so any rule iptables-save prints (foreign ones too) can be written back and
deleted by its spec. Each payload is applied in a fork of this process (no exec; see ``_in_worker``), because
libxtables holds extensions of one family per process.

Only legacy tables are written; a namespace whose rules live in nf_tables is refused rather than split over
two rule sets. Reading state runs ``iptables-legacy-save``: the state parser reads exactly its text.
python-iptables is an optional extra, imported only here and only when this backend is chosen.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import shlex
import signal
import socket
import sys
import sysconfig
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

from istio_iptables.backends.restore import PROBE_CHAIN, Feature, Iptables, _run, _save, command, features_of
from istio_iptables.capture.config import IptablesVariant
from istio_iptables.capture.model import Family, Table
from istio_iptables.errors import ApplyError, MissingExtraError
from istio_iptables.host import locks, netns
from istio_iptables.host.hostfacts import which
from istio_iptables.log import Log
from istio_iptables.records import mutable_record, record

TYPE_CHECKING = False  # typing is not imported at run time (records.py says why)
if TYPE_CHECKING:
    from typing import Any

log = Log(__name__)

LEGACY, NFT = IptablesVariant.LEGACY, IptablesVariant.NFT
_LOCK_TIMEOUT = 60.0
_WORKER_TIMEOUT = 60.0
_WORKER_REFUSED = 3
_DEFAULT_LOCK = "/run/xtables.lock"
_VERDICTS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})
_COMMANDS = {
    **{"-A": "-A", "--append": "-A", "-I": "-I", "--insert": "-I", "-D": "-D", "--delete": "-D"},
    **{"-N": "-N", "--new-chain": "-N", "-X": "-X", "--delete-chain": "-X"},
    **{"-F": "-F", "--flush": "-F", "-P": "-P", "--policy": "-P"},
}
# Options of the rule itself (not of an extension), as attributes of a python-iptables Rule.
_RULE_OPTIONS = {
    **{"-p": "protocol", "--protocol": "protocol", "-s": "src", "--source": "src"},
    **{"-d": "dst", "--destination": "dst", "-i": "in_interface", "--in-interface": "in_interface"},
    **{"-o": "out_interface", "--out-interface": "out_interface"},
}
# The match iptables loads by itself for a protocol's options (``-p tcp --dport 80``).
_PROTOCOL_MATCHES = {6: "tcp", 17: "udp", 33: "dccp", 132: "sctp", 1: "icmp", 58: "icmp6"}
_XTTYPE_NONE = 0  # libxtables: an option that takes no value
_IFNAMSIZ = 16
_INV_VIA_IN, _INV_VIA_OUT = 0x01, 0x02  # ipt_ip and ip6t_ip6 invflags alike
_IP6T_F_PROTO = 0x01


class _RefusedError(Exception):
    """A payload line libiptc or an extension refused (or that this backend cannot read)."""


@mutable_record
class _LineRefusedError(Exception):
    table: str
    number: int
    line: str
    message: str
    rules: tuple[str, ...]
    """The rule lines to look for missing kernel features in: the line, or the table's rules at COMMIT."""


@record
class Libiptc(Iptables):
    """One family's legacy tables, written through libiptc; ``saved`` is the iptables-legacy-save text."""

    def __post_init__(self) -> None:
        if self.variant is not LEGACY:
            raise ValueError("the libiptc backend writes legacy tables only")

    def restore(self, payload: str) -> None:
        """Apply an iptables-restore payload (``--noflush`` semantics), one commit per table. Tables before a
        refused one stay committed, as with iptables-restore; the refused one is unchanged."""
        with _xtables_lock(self.environment):
            _in_worker(self.family, lambda: _restore(self.family, payload))

    def save(self) -> str:
        return _save(self.family, LEGACY, self.environment)

    def probe(self, features: list[Feature]) -> list[tuple[Feature, bool]]:
        """Whether the kernel takes each feature, tried in-process as a restore would use it."""

        def work() -> str:
            enter_scratch = netns.scratch_entry()  # as Iptables.probe: leave no table behind
            if enter_scratch:
                enter_scratch()
            return "".join("+" if present else "-" for present in _probe(self.family, features))

        with _xtables_lock(self.environment):
            answer = _in_worker(self.family, work)
        return [(feature, flag == "+") for feature, flag in zip(features, answer, strict=True)]


def detect(family: Family, environment: dict[str, str]) -> Libiptc:
    """The legacy tables of one family through libiptc, with their current state; an ApplyError saying what
    to do instead when python-iptables, the kernel's x_tables or this namespace's rules do not allow it."""
    iptc = _iptc()
    nft_save = command(family, NFT, "save")
    if which(nft_save):
        listed = _run([nft_save], None, environment)
        if listed.returncode == 0 and any(line.startswith("-A ") for line in listed.stdout.splitlines()):
            raise ApplyError(
                f"{family.label}: rules of this namespace are in nf_tables ({nft_save} lists them); the libiptc "
                "backend writes legacy tables only: use --backend restore"
            )
    module = "ip6_tables" if family is Family.V6 else "ip_tables"
    try:
        _close(_open(iptc, family, "nat"))
    except Exception as error:
        raise ApplyError(
            f"{family.label}: the kernel's legacy x_tables ({module}) cannot be used here: python-iptables "
            f"cannot open the nat table: {_text(error)}; use --backend restore (iptables-nft)"
        ) from None
    reason = "chosen with --backend libiptc: legacy tables, written in-process through python-iptables"
    log.info("%s: using libiptc (python-iptables) on the legacy tables", family.label)
    return Libiptc(family, LEGACY, _save(family, LEGACY, environment), environment, reason)


# ---- applying a payload -------------------------------------------------------------------------------


def _restore(family: Family, payload: str) -> str:
    try:
        _apply(family, payload)
    except _LineRefusedError as refused:
        raise ApplyError(_explain(family, refused)) from None
    return ""


def _explain(family: Family, refused: _LineRefusedError) -> str:
    where = f"table {refused.table}, " if refused.table else ""
    message = (
        f"libiptc ({family.label}, python-iptables) refused {where}line {refused.number}: "
        f"{refused.line or '(end of input)'}: {refused.message}"
    )
    table = next((table for table in Table if table.value == refused.table), None)
    if table is not None and refused.rules:
        features = features_of(table, list(refused.rules))
        missing = [feature.label for feature, ok in zip(features, _probe(family, features), strict=True) if not ok]
        if missing:
            message += "; the kernel lacks " + ", ".join(missing)
    return message


def _probe(family: Family, features: list[Feature]) -> list[bool]:
    """Each feature in a scratch chain created and deleted again (a refused rule commits nothing)."""
    present = []
    for feature in features:
        payload = (
            f"*{feature.table.value}\n:{PROBE_CHAIN} - [0:0]\n-A {PROBE_CHAIN} {feature.rule}\nCOMMIT\n"
            f"*{feature.table.value}\n:{PROBE_CHAIN} - [0:0]\n-X {PROBE_CHAIN}\nCOMMIT\n"
        )
        try:
            _apply(family, payload)
            present.append(True)
        except _LineRefusedError:
            present.append(False)
    return present


def _apply(family: Family, payload: str) -> None:
    """Each ``*table`` opens a handle, its lines change it, its ``COMMIT`` commits it. The first refused line
    raises _LineRefusedError; its table's handle is dropped uncommitted and nothing after it is applied."""
    iptc = _iptc()
    table: Any = None
    name = ""
    rules: list[str] = []
    number = 0
    for number, raw_line in enumerate(payload.splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("*"):
                if table is not None:
                    raise _RefusedError(f"table {name} has no COMMIT before the next table")
                name = line[1:].strip()
                rules = []
                table = _open(iptc, family, name)
            elif table is None:
                raise _RefusedError("a line outside a table (no '*table' line before it)")
            elif line == "COMMIT":
                table.commit()
                _close(table)
                table = None
            else:
                if line.startswith(("-A", "-I", "-D", "--append", "--insert", "--delete")):
                    rules.append(line)
                _execute(iptc, family, table, line)
        except Exception as error:
            if table is not None:
                _close(table)
            failed = [line] if line.startswith(("-A", "-I", "-D")) else rules if line == "COMMIT" else []
            raise _LineRefusedError(name, number, line, _text(error), tuple(failed)) from None
    if table is not None:
        _close(table)
        raise _LineRefusedError(name, number + 1, "", "COMMIT expected", ())


def _open(iptc: Any, family: Family, name: str) -> Any:
    """A fresh handle on the table as the kernel has it now (python-iptables caches one Table per name)."""
    table = (iptc.Table6 if family is Family.V6 else iptc.Table)(name, autocommit=False)
    table.refresh()
    return table


def _close(table: Any) -> None:
    """Drop the handle; with autocommit off this never commits."""
    table.autocommit = False
    table.close()


def _execute(iptc: Any, family: Family, table: Any, line: str) -> None:
    if line.startswith(":"):
        chain, policy = [*line[1:].split(), "-"][:2]
        # A user chain is created, or emptied when it exists (--noflush); a built-in one keeps its rules.
        if not table.builtin_chain(chain):
            if table.is_chain(chain):
                table.flush_entries(chain)
            else:
                table.create_chain(chain)
        if policy != "-":
            table.set_policy(chain, policy, (0, 0))
        return
    tokens = shlex.split(line)
    command_name = _COMMANDS.get(tokens[0])
    if command_name is None:
        raise _RefusedError(f"unsupported command {tokens[0]}")
    if len(tokens) < 2 and command_name != "-F":
        raise _RefusedError(f"{tokens[0]} needs a chain")
    arguments = tokens[2:]
    if command_name == "-N":
        table.create_chain(tokens[1])
    elif command_name == "-X":
        table.delete_chain(tokens[1])
    elif command_name == "-F":
        for chain in tokens[1:2] or [chain.name for chain in table.chains]:
            table.flush_entries(chain)
    elif command_name == "-P":
        if len(arguments) != 1:
            raise _RefusedError("-P needs a chain and a policy")
        table.set_policy(tokens[1], arguments[0], (0, 0))
    elif command_name == "-A":
        table.append_entry(tokens[1], _entry(_RuleBuilder(iptc, family, table).build(arguments)))
    elif command_name == "-I":
        position = int(arguments.pop(0)) if arguments and arguments[0].isdigit() else 1
        if position < 1:
            raise _RefusedError(f"invalid rule number {position}")
        rule = _RuleBuilder(iptc, family, table).build(arguments)
        table.insert_entry(tokens[1], _entry(rule), position - 1)
    else:
        if len(arguments) == 1 and arguments[0].isdigit():
            raise _RefusedError("deleting a rule by number is not supported; give the rule's spec")
        # libiptc deletes the first rule equal to this one under its mask, the way iptables -D does.
        rule = _RuleBuilder(iptc, family, table).build(arguments)
        table.delete_entry(tokens[1], _entry(rule), rule.mask)


def _entry(rule: Any) -> Any:
    """The rule's kernel entry, after each extension's final check (mandatory options, defaults).

    Not python-iptables' Chain.append_rule: its final check first prints every extension's options and
    parses them back, which loses what the printout does not show (NOTRACK becomes a plain CT)."""
    for match in rule.matches:
        match._final_check()
    rule.target._final_check()
    entry = rule.rule
    if not entry:
        raise _RefusedError("incomplete rule")
    return entry


class _RuleBuilder:
    """A python-iptables Rule from iptables arguments: the rule's own options, then ``-m NAME`` matches and
    a ``-j``/``-g`` target, each taking the ``[!] --option [value...]`` that follow it. An option no named
    match takes goes to the protocol's match, loaded as iptables does (``-p tcp --dport 80``)."""

    def __init__(self, iptc: Any, family: Family, table: Any) -> None:
        self.iptc = iptc
        self.family = family
        self.table = table
        self.rule: Any = iptc.Rule6() if family is Family.V6 else iptc.Rule()
        self.matches: list[Any] = []
        self.current: Any = None
        self.target: Any = None
        self.protocol = 0

    def build(self, arguments: list[str]) -> Any:
        index, negated = 0, False
        while index < len(arguments):
            token = arguments[index]
            if token == "!":
                if negated:
                    raise _RefusedError("'!' twice")
                negated, index = True, index + 1
                continue
            if token in _RULE_OPTIONS:
                index = self._rule_option(_RULE_OPTIONS[token], arguments, index, negated)
            elif token in ("-f", "--fragment"):
                self._fragment(negated)
                index += 1
            elif token in ("-m", "--match", "-j", "--jump", "-g", "--goto", "-c", "--set-counters"):
                if negated:
                    raise _RefusedError(f"'!' cannot negate {token}")
                if index + 1 >= len(arguments):
                    raise _RefusedError(f"{token} needs a value")
                value = arguments[index + 1]
                if token in ("-m", "--match"):
                    self.current = self.rule.create_match(value)
                    _alias_init(self.current, self.current._xt.find_match(value))
                    self.matches.append(self.current)
                elif token in ("-c", "--set-counters"):
                    if index + 2 >= len(arguments):
                        raise _RefusedError(f"{token} needs packets and bytes")
                    self.rule.counters = (int(arguments[index + 1]), int(arguments[index + 2]))
                    index += 1
                else:
                    self._set_target(value, goto=token in ("-g", "--goto"))
                index += 2
            elif token.startswith("--"):
                index = self._module_option(arguments, index, negated)
            else:
                raise _RefusedError(f"unexpected argument {token!r}")
            negated = False
        if negated:
            raise _RefusedError("'!' at the end of the rule")
        if self.target is None:
            self._set_target("", goto=False)  # no -j: a rule that only counts, as iptables writes it
        return self.rule

    def _rule_option(self, attribute: str, arguments: list[str], index: int, negated: bool) -> int:
        if index + 1 >= len(arguments):
            raise _RefusedError(f"{arguments[index]} needs a value")
        value = arguments[index + 1]
        if value == "!" and not negated and index + 2 < len(arguments):  # the old "-s ! ADDRESS" order
            negated, index, value = True, index + 1, arguments[index + 2]
        if attribute.endswith("interface"):
            self._interface(attribute.split("_", maxsplit=1)[0], value, negated)
            return index + 2
        if attribute in ("src", "dst"):
            value = _network(value)
        elif attribute == "protocol":
            number = _protocol_number(value)
            value = str(number)
            self.protocol = 0 if negated else number
        setattr(self.rule, attribute, ("!" if negated else "") + value)
        if attribute == "protocol" and self.family is Family.V6:
            # ip6tables marks every -p, negated too; python-iptables drops the mark when negated, and the
            # kernel then ignores the protocol altogether.
            self.rule.get_ip().flags |= _IP6T_F_PROTO
        return index + 2

    def _interface(self, direction: str, name: str, negated: bool) -> None:
        """As iptables writes it (xtables_parse_interface): the name as given, ``+`` included, and a mask of
        0xff over the bytes compared. python-iptables writes other bytes (for IPv6 a mask of 0x01, which
        makes the kernel compare one bit of each character), so the kernel would match other interfaces
        and -D would not find iptables' rules."""
        if len(name) >= _IFNAMSIZ:
            raise _RefusedError(f"interface name {name} is too long")
        compared = len(name) - 1 if name.endswith("+") else len(name) + 1
        ip = self.rule.get_ip()
        setattr(ip, f"{direction}iface", name.encode().ljust(_IFNAMSIZ, b"\0"))
        setattr(ip, f"{direction}iface_mask", (b"\xff" * compared).ljust(_IFNAMSIZ, b"\0"))
        flag = _INV_VIA_IN if direction == "in" else _INV_VIA_OUT
        ip.invflags = (ip.invflags | flag) if negated else (ip.invflags & ~flag)

    def _fragment(self, negated: bool) -> None:
        if self.family is Family.V6:
            raise _RefusedError("-f (fragments) exists for IPv4 only")
        self.rule.fragment = True
        if negated:
            self.rule.entry.ip.invflags |= self.iptc.ip4tc.ipt_ip.IPT_INV_FRAG

    def _set_target(self, name: str, goto: bool) -> None:
        if self.target is not None:
            raise _RefusedError("more than one target")
        if name in _VERDICTS or name == "":
            target = self.iptc.Target(self.rule, name, goto=goto)
        elif self.table.is_chain(name):
            # A jump: the standard target, naming the chain (libiptc resolves it at commit).
            target = self.iptc.Target(self.rule, "ACCEPT", goto=goto)
            target.standard_target = name
        else:
            target = _extension_target(self.iptc)(self.rule, name, goto=goto)
            _alias_init(target, target._xt.find_target(name))
        self.rule.target = target
        self.target = self.current = target

    def _module_option(self, arguments: list[str], index: int, negated: bool) -> int:
        """``--option [value...]`` for the match or target it belongs to; returns the index after it."""
        module, option, arity = self._owner(arguments[index][2:])
        values: list[str] = []
        index += 1
        if arity == 1:
            if index < len(arguments) and arguments[index] == "!" and not negated:  # "--dport ! 80"
                negated, index = True, index + 1
            if index >= len(arguments):
                raise _RefusedError(f"--{option} needs a value")
            values.append(arguments[index])
            index += 1
        if arity in (1, 2):
            # Further words belong to the option too (``--match-set NAME src``); the next option ends it.
            while index < len(arguments) and not arguments[index].startswith("-") and arguments[index] != "!":
                values.append(arguments[index])
                index += 1
        module.parse(option, ["!", *values] if negated else values)
        return index

    def _owner(self, option: str) -> tuple[Any, str, int]:
        """The module that takes ``--option``: the current one first, then the other matches, then the
        protocol's implicit match (loaded here, where iptables loads it)."""
        candidates = [self.current] if self.current is not None else []
        candidates += [match for match in self.matches if match is not self.current]
        for module in candidates:
            known = _arity(module, option)
            if known is not None:
                return module, *known
        name = _PROTOCOL_MATCHES.get(self.protocol, "")
        if name and self.target is None and all(match.name != name for match in self.matches):
            match = self.rule.create_match(name)
            known = _arity(match, option)
            if known is not None:
                self.matches.append(match)
                self.current = match
                return match, *known
            self.rule.remove_match(match)
        raise _RefusedError(f"unknown option --{option}")


@cache
def _extension_target(iptc: Any) -> Any:
    class ExtensionTarget(iptc.Target):  # type: ignore[misc]
        """python-iptables decides whether a target name is a chain by opening every table of the family,
        which creates the legacy tables this namespace does not use; the caller has decided already."""

        def _is_standard_target(self) -> bool:
            return False

    return ExtensionTarget


def _alias_init(module: Any, alias: Any) -> None:
    """python-iptables builds an alias (NOTRACK, state) from its real extension (CT, conntrack) and so
    runs the real one's init; iptables runs the alias's, which sets what makes it that alias."""
    if alias and alias[0].real_name and alias[0].init:
        alias[0].init(module._ptr)


def _arity(module: Any, option: str) -> tuple[str, int] | None:
    """The option's full name in this match or target and how many values it takes (0 none, 1 required,
    2 optional); None when it has no such option. As with iptables (getopt), an unambiguous prefix names
    an option: Istio writes ``--to-port`` for ``--to-ports``. python-iptables parses with the new option
    table when the extension has one."""
    xtables_module = module._module
    new_options = getattr(module, "_orig_options", None) or getattr(xtables_module, "x6_options", None)
    if new_options:
        options = {entry.name.decode(): 0 if entry.type == _XTTYPE_NONE else 1 for entry in _entries(new_options)}
    else:
        old_options = getattr(xtables_module, "extra_opts", None)
        options = {entry.name.decode(): int(entry.has_arg) for entry in _entries(old_options)} if old_options else {}
    if option in options:
        return option, options[option]
    prefixed = [name for name in options if name.startswith(option)]
    return (prefixed[0], options[prefixed[0]]) if len(prefixed) == 1 else None


def _entries(array: Any) -> Iterator[Any]:
    """The entries of a C option array, up to its terminating entry without a name."""
    for index in range(1024):
        entry = array[index]
        if not entry.name:
            return
        yield entry


def _network(text: str) -> str:
    """An address as the kernel keeps it: host bits cleared (iptables does so; python-iptables does not
    for IPv6, and such a rule would never match nor be found again by -D)."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return text  # a host name or a malformed address: python-iptables names the problem


def _protocol_number(text: str) -> int:
    if text.isdigit():
        return int(text)
    if text.lower() in ("all", "ip"):
        return 0
    try:
        return socket.getprotobyname(text.lower())
    except OSError:
        aliases = {"icmpv6": 58, "ipv6-icmp": 58, "tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "dccp": 33}
        if text.lower() in aliases:
            return aliases[text.lower()]
        raise _RefusedError(f"unknown protocol {text}") from None


# ---- the worker -------------------------------------------------------------------------------------


def _in_worker(family: Family, work: Callable[[], str]) -> str:
    """Run ``work`` in a forked copy of this process and return what it returned (an ApplyError it raised
    is raised here).

    libxtables keeps one registry of extensions per process, filled for the family in use when an
    extension is first loaded; using an extension of both families in one process fails or even exits
    the process (``target "TPROXY" already registered``), which would skip the rollback. So no extension
    is ever loaded here: each payload is applied in a fork, through libiptc in this same code, with the
    registry of one family only. A fork, not a new interpreter: python-iptables is already imported."""
    _iptc()  # import in the parent, once, so the forks start warm; importing loads no extension
    read_end, write_end = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (runs in the fork; the kernel tests exercise it)
        code = 0
        try:
            os.close(read_end)
            try:
                answer = work()
            except ApplyError as error:
                answer, code = str(error), _WORKER_REFUSED
            except BaseException as error:
                answer, code = f"python-iptables failed: {type(error).__name__}: {_text(error)}", _WORKER_REFUSED
            with os.fdopen(write_end, "wb") as writer:
                writer.write(answer.encode())
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    answer_bytes = b""
    deadline = time.monotonic() + _WORKER_TIMEOUT
    try:
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([read_end], [], [], max(remaining, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ApplyError(
                    f"libiptc ({family.label}): python-iptables did not finish within {_WORKER_TIMEOUT:.0f} s"
                )
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            answer_bytes += chunk
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    answer = answer_bytes.decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return answer
    if code == _WORKER_REFUSED and answer:
        raise ApplyError(answer)
    ended = f"exited with status {code}" if code > 0 else f"was killed by signal {-code}"
    raise ApplyError(
        f"libiptc ({family.label}): the python-iptables worker {ended} before it reported (its message, if "
        "any, is above); each table it had not committed is unchanged"
    )


# ---- python-iptables and the lock ---------------------------------------------------------------------


@cache
def _iptc() -> Any:
    """python-iptables, imported on first use (once: it loads libxtables and libiptc, an optional extra)."""
    if "XTABLES_LIBDIR" not in os.environ:
        directory = _xtables_libdir()
        if directory:
            # Else python-iptables runs ldconfig to find the extensions, on every start.
            os.environ["XTABLES_LIBDIR"] = directory
    try:
        with _libraries_from_one_listing():
            iptc = _import_iptc()
    except ImportError as error:
        if error.name == "iptc":
            raise MissingExtraError("--backend libiptc", "libiptc") from None
        raise ApplyError(f"python-iptables cannot be loaded: {error}; or use --backend restore") from None
    except Exception as error:
        raise ApplyError(
            "python-iptables cannot load the iptables libraries (libxtables, libip4tc, libip6tc): "
            f"{_text(error)}; install them (Debian: libxtables12 libip4tc2 libip6tc2) or use --backend restore"
        ) from None
    return iptc


def _import_iptc() -> Any:
    try:
        import iptc  # noqa: PLC0415 (heavy, optional)
    except OSError:
        # python-iptables imports distutils.sysconfig for one function, and that import stats the
        # interpreter's build directory, which a non-root user may not be allowed to (an interpreter
        # under /root): PermissionError. Give it that function and import again.
        if "distutils.sysconfig" in sys.modules:
            raise
        stub = types.ModuleType("distutils.sysconfig")
        stub.__dict__["get_python_lib"] = lambda *_arguments, **_options: sysconfig.get_path("purelib")
        sys.modules["distutils.sysconfig"] = stub
        import iptc  # noqa: PLC0415
    return iptc


@contextmanager
def _libraries_from_one_listing() -> Iterator[None]:
    """While python-iptables loads: ``ctypes.util.find_library`` answered from one ``ldconfig -p``. It asks
    for libc, libxtables, libip4tc, libip6tc and its own helper; ctypes runs ldconfig for each name, then
    gcc and ld for each one ldconfig does not list: 25 processes and most of this backend's start-up."""
    import ctypes.util  # noqa: PLC0415

    listing = _run(["ldconfig", "-p"], None, {}) if which("ldconfig") else None
    if listing is None or listing.returncode != 0:
        yield
        return
    sonames = _sonames(listing.stdout)
    original = ctypes.util.find_library
    ctypes.util.find_library = sonames.get  # type: ignore[assignment]
    try:
        yield
    finally:
        ctypes.util.find_library = original


def _sonames(listing: str) -> dict[str, str]:
    """``ldconfig -p`` as ctypes reads it: ``ip4tc`` -> ``libip4tc.so.2``, the first entry whose ABI starts
    with this machine's (ldconfig lists others too, e.g. 32-bit libraries)."""
    abi = _ABI.get(os.uname().machine, "libc6") if sys.maxsize > 2**32 else "libc6"
    found: dict[str, str] = {}
    for line in listing.splitlines():
        match = re.match(r"\s+(lib(\S+?)\.so\S*) \(([^)]*)\) => ", line)
        if match and match[3].startswith(abi):
            found.setdefault(match[2], match[1])
    return found


# ctypes.util's map from machine to the ABI ldconfig prints, for 64-bit interpreters.
_ABI = {"x86_64": "libc6,x86-64", "ppc64": "libc6,64bit", "sparc64": "libc6,64bit", "s390x": "libc6,64bit"}


def _xtables_libdir() -> str | None:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    candidates = [f"/usr/lib/{multiarch}/xtables"] if multiarch else []
    candidates += ["/usr/lib64/xtables", "/usr/lib/xtables", "/lib/xtables", "/usr/local/lib/xtables"]
    return next((directory for directory in candidates if os.path.isdir(directory)), None)


@contextmanager
def _xtables_lock(environment: dict[str, str]) -> Iterator[None]:
    """The lock every legacy iptables writer takes (iptables --wait): libiptc itself takes none, and a
    commit over another writer's change would be refused or undo it."""
    path = environment.get("XTABLES_LOCKFILE") or os.environ.get("XTABLES_LOCKFILE") or _DEFAULT_LOCK
    with locks.held(path, _LOCK_TIMEOUT, "the xtables lock"):
        yield


def _text(error: BaseException) -> str:
    """An error's message without the bytes reprs python-iptables puts in (``b'Directory not empty'``)."""
    return re.sub(r"\bb'([^']*)'", r"\1", str(error)).strip() or type(error).__name__
