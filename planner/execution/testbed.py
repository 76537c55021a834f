"""An emulated multi-node cluster on one Linux host: one network namespace per node, joined by a shaped bridge.

The emulated network
--------------------
Node ``i`` (0-based) is the network namespace ``mpt-n{i}``. It has its own loopback and one uplink ``eth0``
with the address ``198.18.0.{i+1}/24``; 198.18.0.0/15 is the benchmarking range (RFC 2544), so the testbed
never collides with a real network. The uplink is one end of a veth pair; the other end, ``mpt-n{i}h``, is a
port of the bridge ``mptbr0`` in the root namespace, which plays the top-of-rack switch::

    mpt-n0: lo, eth0 198.18.0.1 ──veth── mpt-n0h ─┐
    mpt-n1: lo, eth0 198.18.0.2 ──veth── mpt-n1h ─┤ mptbr0 (root namespace)
    ...                                           │

Every name starts with ``mpt`` so that :func:`down` can find and remove everything, even after a crash that
lost the state file.

Semantics
---------
* All ranks of a node run in the node's namespace (``ip netns exec mpt-n{i} ...``). Intra-node traffic goes
  over the namespace's loopback: fast (memory speed) and unshaped, standing in for NVLink.
* Inter-node traffic crosses the bridge. Each uplink is shaped in both directions, like one NIC per node:
  the egress of ``eth0`` inside the namespace (node to switch) and the egress of ``mpt-n{i}h`` (switch to
  node). Both shapers run at ``inter_node_mbit``, so a node-to-node flow has that bottleneck rate, a node
  sends and receives at most that rate in total, and many-to-one traffic queues at the receiver's port as
  it would at a switch.
* ``inter_node_delay_ms`` is the one-way node-to-node latency. A packet crosses two shapers, so each adds
  half of it (RTT = 2 x delay, plus the host's own few tens of microseconds).
* The rate is a layer-2 rate (Ethernet headers count, as on a NIC). The links use jumbo frames (MTU 9000,
  common in training clusters), so TCP goodput is about 99% of the configured rate; with MTU 1500 it
  would be 95.6% (1448 payload bytes per 1514-byte frame).

Shaper
------
Each shaped interface gets ``htb`` (rate = ceil = the configured rate, burst = 1 ms of traffic, at least
32 KiB) with a leaf that holds the queue: ``netem delay <half>`` when a delay is asked for (the layout
Mininet's TCLink uses), else a ``pfifo``. Queue limits are 10,000 packets, far above the bandwidth-delay
product at 0.1-1 ms, so TCP sees no tail drops from the shaper itself. veth segmentation offload (GSO)
stays on: htb charges a GSO packet for all its bytes, so the average rate is exact, whereas turning GSO
off (``gso_max_segs 1``; there may be no ethtool) made the host CPU the bottleneck above about 1 Gbit/s.
Measured on a 2-core host with one TCP stream: 97-99% of the configured rate from 100 Mbit/s to
1 Gbit/s, 92-96% at 2-4 Gbit/s; beyond that the host CPU, not the shaper, sets the rate.

Caveats: a token bucket lets the first burst (about 1 ms of traffic plus one 64 KiB GSO packet) of an idle
link through at host speed, so messages much larger than that are needed to measure the rate. The delay
needs the kernel's netem qdisc (``sch_netem``); without it only ``inter_node_delay_ms = 0`` works. A host
firewall that drops bridged traffic (``net.bridge.bridge-nf-call-iptables = 1`` with a FORWARD policy of
DROP) cuts the nodes off from each other.

State
-----
:func:`up` records the testbed in ``/run/moeplan/testbed.json`` (the directory can be changed with the
environment variable ``MOEPLAN_TESTBED_STATE_DIR``), written atomically. :func:`status` reads it back and
checks that the namespaces still exist.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from planner.errors import SpecError

__all__ = [
    "BRIDGE",
    "INTERFACE",
    "MTU",
    "STATE_DIR_ENV",
    "Testbed",
    "down",
    "interface_counters",
    "state_path",
    "status",
    "up",
]

PREFIX = "mpt"
BRIDGE = f"{PREFIX}br0"
INTERFACE = "eth0"
MTU = 9000
MIN_NODES, MAX_NODES = 2, 200  # node i has host number i + 1 in a /24, so at most 254; 200 is plenty
MIN_RANKS_PER_NODE, MAX_RANKS_PER_NODE = 1, 64
STATE_DIR_ENV = "MOEPLAN_TESTBED_STATE_DIR"
DEFAULT_STATE_DIR = Path("/run/moeplan")
STATE_FILE = "testbed.json"
STATE_VERSION = 1

_SUBNET_PREFIX = "198.18.0."
_PREFIX_LEN = 24
# Far above the bandwidth-delay product of any sensible setting (1 Gbit/s x 2 ms is 28 jumbo frames), so
# only real congestion (many senders, one receiver) fills a queue.
_QUEUE_LIMIT_PACKETS = 10_000
_MIN_BURST_BYTES = 32 * 1024
_BURST_SECONDS = 1e-3
# htb's quantum only splits bandwidth between sibling classes; there is one class, but setting it keeps
# htb from warning that rate / r2q is out of range at high rates.
_HTB_QUANTUM = 65_536
_COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Testbed:
    """An emulated cluster: ``nodes`` namespaces of ``ranks_per_node`` ranks, joined by shaped uplinks.

    Examples
    --------
    >>> tb = Testbed(nodes=2, ranks_per_node=4, inter_node_mbit=200, inter_node_delay_ms=0.5,
    ...              created="2026-01-01T00:00:00+00:00")
    >>> tb.namespace(1), tb.address(1), tb.inter_node_gbps
    ('mpt-n1', '198.18.0.2', 0.025)
    """

    nodes: int
    ranks_per_node: int
    inter_node_mbit: float
    """Rate of each node's uplink, per direction, in Mbit/s (layer 2)."""
    inter_node_delay_ms: float
    """One-way node-to-node latency in milliseconds, on top of the host's own."""
    created: str
    """ISO 8601 creation time (UTC)."""

    # The name starts with "Test": this keeps pytest from collecting the class in modules that import it.
    __test__ = False

    def __post_init__(self) -> None:
        _validate(self.nodes, self.ranks_per_node, self.inter_node_mbit, self.inter_node_delay_ms)

    @property
    def interface(self) -> str:
        """The uplink's name inside every node's namespace."""
        return INTERFACE

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def inter_node_gbps(self) -> float:
        """The configured uplink rate in GB/s (bytes, decimal), the unit of moeplan's cost model."""
        return self.inter_node_mbit * 1e6 / 8 / 1e9

    @property
    def namespaces(self) -> list[str]:
        return [self.namespace(node) for node in range(self.nodes)]

    @property
    def addresses(self) -> list[str]:
        return [self.address(node) for node in range(self.nodes)]

    def namespace(self, node: int) -> str:
        self._check_node(node)
        return f"{PREFIX}-n{node}"

    def address(self, node: int) -> str:
        """The node's IPv4 address, without the prefix length."""
        self._check_node(node)
        return f"{_SUBNET_PREFIX}{node + 1}"

    def command_prefix(self, node: int) -> list[str]:
        """Prepend to a command to run it inside the node (root only)."""
        return ["ip", "netns", "exec", self.namespace(node)]

    def to_json(self) -> str:
        state = {
            "version": STATE_VERSION,
            "nodes": self.nodes,
            "ranks_per_node": self.ranks_per_node,
            "inter_node_mbit": self.inter_node_mbit,
            "inter_node_delay_ms": self.inter_node_delay_ms,
            "created": self.created,
            "namespaces": self.namespaces,
            "addresses": self.addresses,
            "prefix_len": _PREFIX_LEN,
            "interface": INTERFACE,
            "bridge": BRIDGE,
            "mtu": MTU,
        }
        return json.dumps(state, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Testbed:
        """Parse :meth:`to_json` output; the derived fields must match this version's naming."""
        try:
            state = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"testbed state is not valid JSON ({err}); run `moeplan testbed down`") from err
        if not isinstance(state, dict):
            raise SpecError(f"testbed state must be a JSON object, got {type(state).__name__}")
        fields = ("nodes", "ranks_per_node", "inter_node_mbit", "inter_node_delay_ms", "created")
        missing = [name for name in fields if name not in state]
        if missing:
            raise SpecError(
                f"testbed state lacks the field(s) {', '.join(missing)}; run `moeplan testbed down`"
            )
        created = state["created"]
        if not isinstance(created, str):
            raise SpecError(f"testbed state field created = {created!r} must be an ISO 8601 string")
        testbed = cls(
            nodes=state["nodes"],
            ranks_per_node=state["ranks_per_node"],
            inter_node_mbit=state["inter_node_mbit"],
            inter_node_delay_ms=state["inter_node_delay_ms"],
            created=created,
        )
        expected: dict[str, Any] = {
            "namespaces": testbed.namespaces,
            "addresses": testbed.addresses,
            "interface": INTERFACE,
        }
        for name, value in expected.items():
            if name in state and state[name] != value:
                raise SpecError(
                    f"testbed state field {name} = {state[name]!r} does not match this moeplan's naming "
                    f"({value!r}); the testbed was made by another version: run `moeplan testbed down`"
                )
        return testbed

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self.nodes:
            raise SpecError(f"node = {node} is out of range: the testbed has nodes 0 to {self.nodes - 1}")


def _validate(nodes: object, ranks_per_node: object, mbit: object, delay_ms: object) -> None:
    def integer(name: str, value: object, low: int, high: int) -> None:
        # bool is an int subclass; `nodes=True` is a mistake, not one node.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise SpecError(f"{name} = {value!r} is invalid: it must be an integer from {low} to {high}")

    def number(name: str, value: object, rule: str, ok: bool) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not ok
        ):
            raise SpecError(f"{name} = {value!r} is invalid: it must be a finite number {rule}")

    integer("nodes", nodes, MIN_NODES, MAX_NODES)
    integer("ranks_per_node", ranks_per_node, MIN_RANKS_PER_NODE, MAX_RANKS_PER_NODE)
    number("inter_node_mbit", mbit, "> 0 (Mbit/s)", isinstance(mbit, int | float) and mbit > 0)
    number("inter_node_delay_ms", delay_ms, ">= 0 (ms)", isinstance(delay_ms, int | float) and delay_ms >= 0)


def state_path() -> Path:
    """Where the state file lives: ``$MOEPLAN_TESTBED_STATE_DIR/testbed.json`` or ``/run/moeplan/testbed.json``."""
    directory = os.environ.get(STATE_DIR_ENV)
    return (Path(directory) if directory else DEFAULT_STATE_DIR) / STATE_FILE


def up(nodes: int, ranks_per_node: int, inter_node_mbit: float, inter_node_delay_ms: float = 0.0) -> Testbed:
    """Create the namespaces, bridge, veth pairs and shapers, record the state and return the testbed.

    Raises :class:`SpecError` for a bad argument, without root, without iproute2, when a testbed is already
    up, and when a step fails (after removing everything created so far).
    """
    testbed = Testbed(
        nodes=nodes,
        ranks_per_node=ranks_per_node,
        inter_node_mbit=inter_node_mbit,
        inter_node_delay_ms=inter_node_delay_ms,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _require_root()
    _require_tools("ip", "tc")
    leftovers = _leftovers()
    if leftovers:
        raise SpecError(
            f"a testbed is already up (or was left behind by a crash): found {', '.join(leftovers)}; "
            "run `moeplan testbed down` first"
        )
    try:
        _create(testbed)
        _write_state(testbed)
    except (SpecError, OSError) as err:
        # The leftovers check above found no `mpt` object, so every one that exists now is ours.
        try:
            down()
        except (SpecError, OSError) as cleanup_err:
            raise SpecError(
                f"moeplan testbed up failed: {err}; removing what it had created also failed: {cleanup_err}; "
                "run `moeplan testbed down`"
            ) from err
        raise SpecError(f"moeplan testbed up failed and removed what it had created: {err}") from err
    return testbed


def down() -> list[str]:
    """Remove every ``mpt-*`` namespace, the bridge, leftover ``mpt-*`` links and the state file.

    Works from what exists on the host, not from the state file, so it also cleans up after a crash.
    Idempotent; returns a description of each thing it removed.
    """
    path = state_path()
    if shutil.which("ip") is None:
        if path.exists():
            path.unlink()
            return [f"state file {path}"]
        return []
    namespaces = _testbed_namespaces()
    links = _testbed_links()
    if namespaces or links:
        _require_root()
    removed: list[str] = []
    # Links first: deleting a host end deletes its peer inside the namespace at once, whereas the kernel
    # tears a deleted namespace down asynchronously (and only once no process is left inside), which would
    # leave host ends behind for a moment, in the way of the next `up`.
    for link in links:
        try:
            _run(["ip", "link", "delete", link])
        except SpecError:
            if link in _testbed_links():
                raise
            continue  # gone meanwhile, e.g. the other end of a veth pair deleted just before
        removed.append(f"bridge {link}" if link == BRIDGE else f"link {link}")
    for namespace in namespaces:
        _run(["ip", "netns", "delete", namespace])
        removed.append(f"namespace {namespace}")
    if path.exists():
        path.unlink()
        removed.append(f"state file {path}")
    return removed


def status() -> Testbed | None:
    """The running testbed, or None when there is none.

    Raises :class:`SpecError` when the state file and the host disagree (a crash, or a manual deletion).
    """
    path = state_path()
    _require_tools("ip")
    namespaces = _testbed_namespaces()
    if not path.exists():
        leftovers = _leftovers()
        if leftovers:
            raise SpecError(
                f"testbed state is stale: there is no state file {path}, but {', '.join(leftovers)} exist "
                "(left behind by a crash?); run `moeplan testbed down`"
            )
        return None
    testbed = Testbed.from_json(path.read_text())
    missing = [ns for ns in testbed.namespaces if ns not in namespaces]
    if BRIDGE not in _testbed_links():
        missing.append(f"bridge {BRIDGE}")
    if missing:
        raise SpecError(
            f"testbed state is stale: {path} describes {testbed.nodes} nodes, but {', '.join(missing)} "
            "no longer exist; run `moeplan testbed down`"
        )
    return testbed


def interface_counters(testbed: Testbed, node: int) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of the node's uplink: every inter-node byte, headers included (root only)."""
    out = _run(["ip", "-n", testbed.namespace(node), "-s", "-j", "link", "show", INTERFACE])
    try:
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])
    except (json.JSONDecodeError, LookupError, TypeError, ValueError) as err:
        raise SpecError(
            f"cannot read the counters of {INTERFACE} in {testbed.namespace(node)}: {out!r}"
        ) from err


def _run(args: Sequence[str]) -> str:
    """Run a command (no shell) and return its stdout; a failure raises SpecError quoting command and stderr."""
    command = " ".join(args)
    try:
        proc = subprocess.run(
            list(args), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SpecError(f"`{command}` could not run: {err}") from err
    if proc.returncode != 0:
        stderr = proc.stderr.strip() or "(no stderr)"
        raise SpecError(f"`{command}` failed with exit code {proc.returncode}: {stderr}")
    return proc.stdout


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SpecError(
            "moeplan testbed needs root: it creates network namespaces, a bridge, veth pairs and traffic "
            f"shapers (running as uid {os.geteuid()}); run it as root"
        )


def _require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise SpecError(
            f"moeplan testbed needs the `ip` and `tc` commands of iproute2, and {', '.join(missing)} is not on "
            "PATH; install iproute2"
        )


def _testbed_namespaces() -> list[str]:
    # `ip netns list` prints "NAME" or "NAME (id: N)" per line and needs no root.
    names = (line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip())
    return sorted(name for name in names if name.startswith(f"{PREFIX}-"))


def _testbed_links() -> list[str]:
    """`mpt` links in the root namespace, bridge last (its ports go first)."""
    links = [link["ifname"] for link in json.loads(_run(["ip", "-j", "link", "show"]) or "[]")]
    ours = sorted(name for name in links if name.startswith(f"{PREFIX}-") or name == BRIDGE)
    return sorted(ours, key=lambda name: name == BRIDGE)


def _leftovers() -> list[str]:
    found = [f"namespace {ns}" for ns in _testbed_namespaces()]
    found += [f"link {link}" for link in _testbed_links()]
    if state_path().exists():
        found.append(f"state file {state_path()}")
    return found


def _create(testbed: Testbed) -> None:
    # With IPv6 on, every interface would send router solicitations and neighbour discovery, which show up
    # in the interface counters the runtime uses to count inter-node bytes. `addrgenmode none` keeps the
    # links silent; it fails where IPv6 is compiled out, and there is nothing to silence then.
    ipv6 = Path("/proc/sys/net/ipv6").exists()
    _run(["ip", "link", "add", BRIDGE, "mtu", str(MTU), "type", "bridge"])
    if ipv6:
        _run(["ip", "link", "set", BRIDGE, "addrgenmode", "none"])
    _run(["ip", "link", "set", BRIDGE, "up"])
    for node in range(testbed.nodes):
        namespace, host_end = testbed.namespace(node), f"{PREFIX}-n{node}h"
        ns_ip = ["ip", "-n", namespace]
        _run(["ip", "netns", "add", namespace])
        # Create the peer directly inside the namespace: an `eth0` in the root namespace would clash with
        # the host's own.
        veth = ["type", "veth", "peer", "name", INTERFACE, "mtu", str(MTU), "netns", namespace]
        _run(["ip", "link", "add", host_end, "mtu", str(MTU), *veth])
        if ipv6:
            _run(["ip", "link", "set", host_end, "addrgenmode", "none"])
            _run([*ns_ip, "link", "set", INTERFACE, "addrgenmode", "none"])
        _run(["ip", "link", "set", host_end, "master", BRIDGE])
        _run(["ip", "link", "set", host_end, "up"])
        _run([*ns_ip, "link", "set", "lo", "up"])
        _run([*ns_ip, "address", "add", f"{testbed.address(node)}/{_PREFIX_LEN}", "dev", INTERFACE])
        _run([*ns_ip, "link", "set", INTERFACE, "up"])
        _shape(["tc", "-n", namespace], INTERFACE, testbed)
        _shape(["tc"], host_end, testbed)


def _shape(tc: list[str], device: str, testbed: Testbed) -> None:
    rate_bit = max(1, round(testbed.inter_node_mbit * 1e6))
    burst = max(_MIN_BURST_BYTES, round(rate_bit / 8 * _BURST_SECONDS))
    # `default 1` sends unclassified traffic (all of it: there are no filters) to class 1:1; with the
    # default of 0 it would bypass the shaper.
    _run([*tc, "qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "1"])
    rate = ["rate", f"{rate_bit}bit", "ceil", f"{rate_bit}bit", "burst", f"{burst}b", "cburst", f"{burst}b"]
    _run(
        [
            *tc,
            "class",
            "add",
            "dev",
            device,
            "parent",
            "1:",
            "classid",
            "1:1",
            "htb",
            *rate,
            "quantum",
            str(_HTB_QUANTUM),
        ]
    )
    leaf = [*tc, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:"]
    if testbed.inter_node_delay_ms == 0:
        _run([*leaf, "pfifo", "limit", str(_QUEUE_LIMIT_PACKETS)])
        return
    half_delay_us = testbed.inter_node_delay_ms * 1000 / 2
    try:
        _run([*leaf, "netem", "delay", f"{half_delay_us:.3f}us", "limit", str(_QUEUE_LIMIT_PACKETS)])
    except SpecError as err:
        raise SpecError(
            f"inter_node_delay_ms = {testbed.inter_node_delay_ms} needs the kernel's netem qdisc (sch_netem), "
            f"and adding it failed: {err}; load it (`modprobe sch_netem`) or use inter_node_delay_ms = 0"
        ) from err


def _write_state(testbed: Testbed) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write a temporary file beside the target and rename it over: readers see the old file or the new one,
    # never half of one.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(testbed.to_json())
    try:
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, path)
    except OSError:
        Path(tmp.name).unlink(missing_ok=True)
        raise
