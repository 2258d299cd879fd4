"""``LibvirtDriver``: VMs as libvirt domains (libvirt-python), QEMU under KVM or TCG.

libvirt is the source of truth: nothing about a domain is cached here (but which domains,
by UUID, carry our tag: bulk_stats asks each new one once), so a new driver (after an agent
restart) sees every domain an earlier one defined. Only domains tagged with nodeagent's
metadata element are ours; get/find/list/bulk_stats ignore the rest.

States: libvirt's shutoff -> "stopped", running/blocked/shutting down -> "running",
paused/pmsuspended -> "paused", crashed -> "crashed". The driver never deletes volumes.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import libvirt

from agent.errors import (AgentError, CommandFailed, Conflict, InsufficientResources, InvalidInput,
                          NotFound, Unavailable, Unprocessable)
from hypervisor import qmp, secrets
from containers import bandwidth
from hypervisor.domain_xml import (BANDWIDTH_NS, HOST_MODEL, NODEAGENT_NS, bandwidth_from, bandwidth_xml, disk_xml,
                                   domain_xml, taps, taps_by_mac)
from hypervisor.driver import DiskSpec, VmInfo, VmSpec
from hypervisor.host import VIRT_TYPES, detect_virt_type
from hypervisor.validate import check_disk_file, check_name, check_resize, check_spec

if TYPE_CHECKING:
    from agent.state import Database
    from containers.network import Network

DEFAULT_STATE_DIR = "/var/lib/nodeagent/hypervisor"
DEFAULT_QMP_DIR = "/var/lib/libvirt/qemu"  # writable by the user QEMU runs as (libvirt-qemu)
STOP_POLL_S = 0.1
DETACH_TIMEOUT_S = 15  # the guest must release a hot-unplugged virtio disk
QEMU_IMG_TIMEOUT_S = 30
UNAVAILABLE_HINT = ("start it as root: `virtlogd -d && libvirtd -d` (`nodeagent serve` does it by itself on a host "
                    "without systemd), or under systemd `systemctl start libvirtd`")
CEPH_CLIENT_CONF = "nodeagent-ceph-client.conf"  # in qmp_dir: QEMU (libvirt-qemu) must read it
CEPH_MOUNT_TIMEOUT_S = 20  # QEMU gives up on unreachable monitors or a refused key after this
# (librados' default is 300 s, so a start with a wrong key would hang for five minutes)
CEPH_CLIENT_CONF_TEXT = f"""# written by nodeagent for QEMU's librbd: monitors and the cephx key come
# from the domain XML (<host>, <auth>); this file only bounds how long a connect may take.
[global]
client_mount_timeout = {CEPH_MOUNT_TIMEOUT_S}
"""

log = logging.getLogger(__name__)

# what bulk_stats asks of getAllDomainStats: the figures stats() reads one call at a time
BULK_STATS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
              | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}


_REASONS = {  # (state, reason) -> VmInfo.reason: the states a post-copy migration leaves
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY): "postcopy",  # its source
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY): "postcopy",  # its destination
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED): "postcopy-failed",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED): "postcopy-failed",
}


def _ignore_libvirt_errors(_ctx, _err) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


def qemu_img_check(disk: DiskSpec) -> None:
    """A file disk opens in its declared format with its whole backing chain
    (Unprocessable naming the problem otherwise)."""
    check_disk_file(disk)
    if disk.type != "file":
        return
    argv = ["qemu-img", "info", "-U", "--backing-chain", "--output=json", "-f", disk.format, disk.source]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S)
    except FileNotFoundError:
        raise Unavailable("qemu-img is missing: apt-get install qemu-utils (or run scripts/setup-host)") from None
    if r.returncode != 0:
        raise Unprocessable(f"disk {disk.target}: QEMU cannot open {disk.source} as {disk.format}: "
                            f"{r.stderr.strip()}", path=disk.source)


def check_bridge(bridge: str) -> None:
    """The host bridge a NIC plugs into exists (libvirt would only fail at start). Asked over
    netlink: /sys/class/net shows the namespace sysfs was mounted in, not necessarily ours."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        links = ipr.get_links(ifname=bridge) if ipr.link_lookup(ifname=bridge) else []
    info = links[0].get_attr("IFLA_LINKINFO") if links else None
    if info is None or info.get_attr("IFLA_INFO_KIND") != "bridge":
        raise NotFound(f"bridge {bridge} does not exist on this host: create it "
                       f"(`ip link add {bridge} type bridge`) or run scripts/setup-host", bridge=bridge)


def qemu_img_snapshots(path: str) -> list[str]:
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True,
                       text=True, timeout=QEMU_IMG_TIMEOUT_S)
    if r.returncode != 0:
        raise CommandFailed(f"qemu-img info {path} failed: {r.stderr.strip()}",
                            argv=["qemu-img", "info", path], returncode=r.returncode, stderr=r.stderr)
    return [s["name"] for s in json.loads(r.stdout).get("snapshots", [])]


def qemu_img_snapshot_create(path: str, snapshot: str) -> None:
    argv = ["qemu-img", "snapshot", "-c", snapshot, path]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S)
    if r.returncode != 0:
        raise CommandFailed(f"qemu-img snapshot of {path} failed: {r.stderr.strip()}",
                            argv=argv, returncode=r.returncode, stderr=r.stderr)


def qemu_img_snapshot_delete(path: str, snapshot: str) -> None:
    subprocess.run(["qemu-img", "snapshot", "-d", snapshot, path], capture_output=True,
                   timeout=QEMU_IMG_TIMEOUT_S)


def _mib(el: ET.Element | None) -> int:
    """A libvirt memory element (<memory unit="KiB">...) in MiB; 0 if absent."""
    if el is None or not (el.text or "").strip().isdigit():
        return 0
    scale = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "m": 1024, "mib": 1024,
             "g": 1024 ** 2, "gib": 1024 ** 2}.get((el.get("unit") or "KiB").lower(), 1)
    return int(int(el.text) * scale) // 1024


def stats_from_record(rec: Mapping[str, Any]) -> dict:
    """LibvirtDriver.stats()'s dict from one getAllDomainStats record (typed parameters named
    ``state.state``, ``cpu.time``, ``balloon.rss`` (KiB), ``block.<i>.rd.bytes``,
    ``net.<i>.rx.bytes``, ...): zeros while stopped, as stats() gives. A section whose every
    device lacks its figures (a busy domain under NOWAIT) is left empty: unknown, not 0."""
    state = _STATE_NAMES.get(rec.get("state.state", libvirt.VIR_DOMAIN_NOSTATE), "unknown")
    out = {"state": state, "cpu_time_ns": int(rec.get("cpu.time", 0)), "memory_bytes": 0,
           "disk": {"rd_bytes": 0, "wr_bytes": 0},
           "net": {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0}}
    if state == "stopped":  # libvirt reports a cpu.time for a shut-off domain too (not its own)
        out["cpu_time_ns"] = 0
        return out
    out["memory_bytes"] = int(rec.get("balloon.rss", rec.get("balloon.current", 0))) * 1024
    for section, prefix, fields in (("disk", "block", (("rd_bytes", "rd.bytes"), ("wr_bytes", "wr.bytes"))),
                                    ("net", "net", (("rx_bytes", "rx.bytes"), ("rx_packets", "rx.pkts"),
                                                    ("tx_bytes", "tx.bytes"), ("tx_packets", "tx.pkts")))):
        count = int(rec.get(f"{prefix}.count", 0))
        read = [i for i in range(count) if f"{prefix}.{i}.{fields[0][1]}" in rec]
        if count and not read:
            out[section] = {}
        for i in read:
            for key, param in fields:
                out[section][key] += int(rec.get(f"{prefix}.{i}.{param}", 0))
    return out


def disks_from_xml(root: ET.Element) -> list[DiskSpec]:
    """The DiskSpecs of a domain's <disk> elements (file, rbd, nbd)."""
    out = []
    for el in root.findall("devices/disk"):
        target = el.find("target").get("dev")
        src = el.find("source")
        fmt = (el.find("driver").get("type") if el.find("driver") is not None else "raw") or "raw"
        ro = el.find("readonly") is not None
        device = el.get("device", "disk")
        if el.get("type") == "file":
            out.append(DiskSpec(target=target, source=src.get("file") if src is not None else "",
                                format=fmt, device=device, readonly=ro))
        elif el.get("type") == "network" and src is not None:
            proto = src.get("protocol")
            hosts = src.findall("host")
            if proto == "rbd":
                attach = {"monitors": [f"{h.get('name')}:{h.get('port')}" for h in hosts]}
                if src.find("config") is not None:
                    attach["config"] = src.find("config").get("file")
                auth = el.find("auth")
                if auth is not None:
                    attach["user"] = auth.get("username")
                    attach["secret_uuid"] = auth.find("secret").get("uuid")
                out.append(DiskSpec(target=target, source=src.get("name"), type="rbd", format=fmt,
                                    device=device, readonly=ro, attach=attach))
            elif proto == "nbd" and hosts:
                h = hosts[0]
                out.append(DiskSpec(target=target, type="nbd", format=fmt, device=device, readonly=ro,
                                    source=f"nbd://{h.get('name')}:{h.get('port')}/{src.get('name')}"))
    return sorted(out, key=lambda d: d.target)


def open_serial_pty(path: str) -> int:
    """Privileged: open a VM's serial pty (a /dev/pts device libvirt named) raw and non-blocking."""
    import termios
    import tty
    if not path.startswith("/dev/pts/") or not path[len("/dev/pts/"):].isdigit():
        raise Unavailable(f"serial console {path!r} is not a /dev/pts device")
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        tty.setraw(fd, termios.TCSANOW)
    except Exception:
        os.close(fd)
        raise
    return fd


def cpu_unsupported(conn: libvirt.virConnect, cpu_xml: str) -> str | None:
    """Why the host of ``conn`` cannot run a guest CPU ``cpu_xml`` (libvirt's compareCPU against
    the host CPU of its capabilities), None if it can. ``cpu_xml`` comes from a peer: it must be
    one ``<cpu>`` element with no DOCTYPE (InvalidInput otherwise)."""
    _cpu_element(cpu_xml, "the guest CPU")
    try:
        conn.compareCPU(cpu_xml, libvirt.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_CPU_INCOMPATIBLE:
            return e.get_error_message()
        raise InvalidInput(f"libvirt cannot compare the guest CPU: {e.get_error_message()}") from None
    return None


def tcg_model_unusable(conn: libvirt.virConnect, cpu_xml: str) -> str | None:
    """Why this host's QEMU cannot emulate (TCG) the named model of guest CPU ``cpu_xml``
    (libvirt's domain capabilities for virt type qemu list the models it can), None if it
    can or the CPU names no model."""
    model = _cpu_element(cpu_xml, "the guest CPU").findtext("model")
    if not model:
        return None
    caps = ET.fromstring(conn.getDomainCapabilities(None, "x86_64", None, "qemu", 0))
    usable = {m.text for m in caps.findall("cpu/mode[@name='custom']/model") if m.get("usable") != "no"}
    if model not in usable:
        return f"its QEMU cannot emulate CPU model {model!r} (TCG)"
    return None


def _cpu_element(cpu_xml: str, what: str) -> ET.Element:
    if "<!" in cpu_xml:
        raise InvalidInput(f"{what} may not hold a DOCTYPE, entity or CDATA")
    try:
        root = ET.fromstring(cpu_xml)
    except ET.ParseError as e:
        raise InvalidInput(f"{what} is not XML: {e}") from None
    if root.tag != "cpu":
        raise InvalidInput(f"{what} must be a <cpu> element, not <{root.tag[:40]}>")
    return root


def _model_features(conn: libvirt.virConnect, model: str | None, vendor: str | None) -> set[str]:
    """Every feature CPU model ``model`` has (libvirt's CPU map, through baselineCPU: no KVM needed)."""
    if not model:
        return set()
    doc = ET.Element("cpu")
    ET.SubElement(doc, "arch").text = "x86_64"
    ET.SubElement(doc, "model").text = model
    if vendor:
        ET.SubElement(doc, "vendor").text = vendor
    try:
        out = conn.baselineCPU([ET.tostring(doc, encoding="unicode")],
                               libvirt.VIR_CONNECT_BASELINE_CPU_EXPAND_FEATURES)
    except libvirt.libvirtError as e:
        raise InvalidInput(f"libvirt does not know CPU model {model[:64]!r}: {e.get_error_message()}") from None
    return {f.get("name") for f in ET.fromstring(out).iter("feature") if f.get("policy") in (None, "require")}


def cpu_missing(conn: libvirt.virConnect, guest_cpu: str, host_cpu: str) -> str | None:
    """Why a host whose CPU is ``host_cpu`` (the <cpu> of its libvirt capabilities) cannot run a
    guest CPU ``guest_cpu`` (a running guest's <cpu>: model, vendor, required and disabled
    features), None if it can: its vendor differs, or it lacks features the guest's model or
    the guest requires. Both are expanded through libvirt's CPU map on ``conn`` (any host's
    libvirtd will do: no KVM needed), so the source can check a destination's CPU it only read."""
    guest = _cpu_element(guest_cpu, "the guest CPU")
    host = _cpu_element(host_cpu, "the destination's host CPU")
    g_vendor, h_vendor = guest.findtext("vendor"), host.findtext("vendor")
    if g_vendor and h_vendor and g_vendor != h_vendor:
        return f"the guest's CPU is {g_vendor}'s ({guest.findtext('model')}), the host's {h_vendor}'s"
    want = _model_features(conn, guest.findtext("model"), g_vendor or h_vendor)
    for f in guest.iter("feature"):
        if f.get("policy") in ("require", "force", None):
            want.add(f.get("name"))
        elif f.get("policy") in ("disable", "forbid"):
            want.discard(f.get("name"))
    have = _model_features(conn, host.findtext("model"), h_vendor)
    have |= {f.get("name") for f in host.iter("feature") if f.get("policy") in (None, "require")}
    lacks = sorted(n for n in want - have if n)
    if lacks:
        return f"the host CPU ({host.findtext('model')}) lacks {', '.join(lacks[:20])}" + \
            (f" and {len(lacks) - 20} more" if len(lacks) > 20 else "") + \
            f" of the guest's CPU ({guest.findtext('model')})"
    return None


def host_cpu(conn: libvirt.virConnect) -> str | None:
    """The host CPU of ``conn``'s capabilities (<cpu> with model, vendor, features)."""
    cpu = ET.fromstring(conn.getCapabilities()).find("host/cpu")
    if cpu is None:
        return None
    for extra in ("microcode", "signature", "counter", "topology", "maxphysaddr", "pages"):
        for e in cpu.findall(extra):
            cpu.remove(e)
    return ET.tostring(cpu, encoding="unicode").strip()


class LibvirtDriver:
    """``hypervisor.Driver`` on libvirt. ``virt_type``: "auto" (probe, see hypervisor.host),
    "kvm" or "qemu". The connection opens lazily; if libvirtd is down every call raises
    Unavailable saying how to start it."""

    uses_host_network = True  # NICs on the host bridge: the agent leases the VMs' addresses

    def __init__(self, uri: str = "qemu:///system", virt_type: str = "auto",
                 state_dir: str = DEFAULT_STATE_DIR, *, qmp_dir: str = DEFAULT_QMP_DIR,
                 cpu_model: str = HOST_MODEL):
        if virt_type not in ("auto", *VIRT_TYPES):
            raise InvalidInput(f"virt_type must be auto, kvm or qemu, got {virt_type!r}")
        self.uri = uri
        self.cpu_model = cpu_model  # "host-model" or a host group's named model (domain_xml.cpu_element)
        self.state_dir = state_dir
        self.qmp_dir = qmp_dir
        self._virt_type = None if virt_type == "auto" else virt_type
        self._conn: libvirt.virConnect | None = None
        self._secrets_lock = threading.Lock()  # a define must not lose its secret to a delete's cleanup
        self._owned: dict[str, bool] = {}  # domain UUID -> tagged ours (bulk_stats; pruned to what exists)
        self._owned_lock = threading.Lock()
        libvirt.registerErrorHandler(_ignore_libvirt_errors, None)

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], *, state_dir: str, db: Database,
                    network: Network | None) -> LibvirtDriver:
        """agent.registry's uniform construction from ``[hypervisor]`` (``uri``, ``virt_type``);
        VM state (QMP sockets aside) under ``state_dir``. The database and the network are
        the agent's: VMs' addresses are leased by the agent, not by the driver."""
        return cls(uri=settings["uri"], virt_type=settings["virt_type"], state_dir=state_dir,
                   cpu_model=settings.get("cpu_model") or HOST_MODEL)

    # -- connection and lookups --
    @property
    def virt_type(self) -> str:
        if self._virt_type is None:
            self._virt_type = detect_virt_type(self.state_dir)
        return self._virt_type

    def conn(self) -> libvirt.virConnect:
        if self._conn is not None:
            try:
                if self._conn.isAlive():
                    return self._conn
            except libvirt.libvirtError:
                pass
            self._conn = None
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise Unavailable(f"libvirtd is not running: {UNAVAILABLE_HINT} "
                              f"(connecting to {self.uri}: {e.get_error_message()})", uri=self.uri) from None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except libvirt.libvirtError:
                pass
            self._conn = None

    def host_memory_mib(self) -> int:
        return self.conn().getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"] // 1024

    def _find_dom(self, name: str) -> libvirt.virDomain | None:
        try:
            dom = self.conn().lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._error(e, name) from None
        return dom if self._ours(dom) else None

    def _dom(self, name: str) -> libvirt.virDomain:
        dom = self._find_dom(name)
        if dom is None:
            raise NotFound(f"VM {name!r} not found", vm=name)
        return dom

    @staticmethod
    def _ours(dom: libvirt.virDomain) -> bool:
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NODEAGENT_NS)
            return True
        except libvirt.libvirtError:
            return False

    def _error(self, e: libvirt.libvirtError, name: str) -> AgentError:
        """Map a libvirt error to the agent's hierarchy with a message that says what to do."""
        code, msg = e.get_error_code(), e.get_error_message() or str(e)
        if '"driver":"rbd"' in msg.replace(" ", "") and "error connecting" in msg:
            return Unavailable(f"VM {name!r}: QEMU cannot connect to the Ceph cluster of its RBD disk: "
                               "check that its monitors run and answer from this host and that the "
                               f"Ceph user's key (in the pool's keyring) is right ({msg})", vm=name)
        if code in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_NO_CONNECT,
                    libvirt.VIR_ERR_INTERNAL_ERROR) and "connection" in msg.lower():
            self._conn = None
            return Unavailable(f"libvirtd is not running: {UNAVAILABLE_HINT} ({msg})", uri=self.uri)
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            return NotFound(f"VM {name!r} not found", vm=name)
        if code == libvirt.VIR_ERR_OPERATION_INVALID:
            return Conflict(f"VM {name!r}: {msg}", vm=name)
        if "Exchange full" in msg and "bridge" in msg:  # EXFULL: the bridge has BR_MAX_PORTS (1024) ports
            return InsufficientResources(f"VM {name!r}: its NIC's bridge has no free port: a Linux bridge holds at "
                                         "most 1024 ports (containers' veths and VMs' taps together); delete "
                                         f"instances or create it with network none ({msg})", vm=name)
        if "Cannot allocate memory" in msg or "cannot set up guest memory" in msg:
            return InsufficientResources(f"VM {name!r}: not enough host memory: {msg}", vm=name)
        if "Could not open" in msg or "Image is not in" in msg or "cannot open" in msg.lower():
            return Unprocessable(f"VM {name!r}: QEMU cannot open a disk: {msg}", vm=name)
        return CommandFailed(f"VM {name!r}: libvirt failed: {msg}", stderr=msg)

    def _info(self, dom: libvirt.virDomain) -> VmInfo:
        """What the VM has now: plugged vCPUs and the balloon's target (its definition's while
        stopped), its maximum (``<vcpu>``, ``<memory>``), and why it is in its state where it
        matters (VmInfo.reason)."""
        _state, max_kib, _mem, vcpus, _cpu = dom.info()
        state, why = dom.state()
        root = self._xml(dom)
        try:
            max_cpus = int(root.findtext("vcpu") or vcpus)
        except ValueError:
            max_cpus = vcpus
        return VmInfo(name=dom.name(), uuid=dom.UUIDString(), state=_STATE_NAMES.get(state, "unknown"),
                      cpus=vcpus, memory_mib=_mib(root.find("currentMemory")) or max_kib // 1024,
                      max_cpus=max_cpus, max_memory_mib=max_kib // 1024, reason=_REASONS.get((state, why)))

    def _state(self, dom: libvirt.virDomain) -> str:
        return _STATE_NAMES.get(dom.state()[0], "unknown")

    def _xml(self, dom: libvirt.virDomain, *, inactive: bool = False) -> ET.Element:
        return ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))

    def qmp_socket(self, name: str) -> str:
        return os.path.join(self.qmp_dir, f"nodeagent-{name}.qmp")

    def default_console_log(self, name: str) -> str:
        return os.path.join(self.state_dir, "console", f"{name}.log")

    # -- lifecycle --
    def define(self, spec: VmSpec) -> VmInfo:
        """Conflict if the name exists; every file disk must open in its format (Unprocessable
        otherwise). On failure no domain is left defined."""
        check_spec(spec, host_memory_mib=self.host_memory_mib())
        if self._exists(spec.name):
            raise Conflict(f"VM {spec.name!r} already exists: pick another name or delete it", vm=spec.name)
        for disk in spec.disks:
            qemu_img_check(disk)
        for nic in spec.nics:
            check_bridge(nic.bridge)
        if spec.console_log is None:
            spec = replace(spec, console_log=self.default_console_log(spec.name))
        os.makedirs(os.path.dirname(spec.console_log), exist_ok=True)
        with self._secrets_lock:
            disks, made = self._with_ceph_secrets(spec.disks)
            xml = domain_xml(replace(spec, disks=disks), virt_type=self.virt_type,
                             qmp_socket=self.qmp_socket(spec.name), cpu_model=self.cpu_model)
            try:
                dom = self.conn().defineXML(xml)
            except libvirt.libvirtError as e:
                for sid in made:
                    secrets.delete_ceph_secret(self.conn(), sid)
                if self._exists(spec.name):  # lost a race, or the uuid is taken: report, leave theirs
                    raise Conflict(f"VM {spec.name!r} already exists: pick another name or delete it",
                                   vm=spec.name) from None
                if "uuid" in (e.get_error_message() or "") and "already" in (e.get_error_message() or ""):
                    raise Conflict(f"a VM with uuid {spec.uuid} already exists", uuid=spec.uuid) from None
                raise self._error(e, spec.name) from None
        return self._info(dom)

    def _with_ceph_secrets(self, disks) -> tuple[tuple[DiskSpec, ...], list[str]]:
        """RBD disks that carry a cephx ``key`` get a libvirt secret (hypervisor.secrets) and
        reference it by ``secret_uuid`` instead; returns the disks and the secrets newly made
        (for the caller to remove on failure). Call with ``_secrets_lock`` held."""
        out, made = [], []
        try:
            for d in disks:
                if d.type == "rbd" and "config" not in d.attach:
                    d = replace(d, attach={**d.attach, "config": self._ceph_client_conf()})
                if d.type == "rbd" and d.attach.get("key") and not d.attach.get("secret_uuid"):
                    attach = dict(d.attach)
                    sid, created = secrets.ensure_ceph_secret(
                        self.conn(), monitors=attach.get("monitors", ()),
                        user=attach.get("user") or "admin", key=attach.pop("key"))
                    if created:
                        made.append(sid)
                    attach.setdefault("user", "admin")
                    d = replace(d, attach={**attach, "secret_uuid": sid})
                out.append(d)
        except BaseException:
            for sid in made:
                secrets.delete_ceph_secret(self.conn(), sid)
            raise
        return tuple(out), made

    def _ceph_client_conf(self) -> str:
        """The ceph.conf QEMU's librbd reads for RBD disks that name none (written once)."""
        path = os.path.join(self.qmp_dir, CEPH_CLIENT_CONF)
        try:
            with open(path) as f:
                if f.read() == CEPH_CLIENT_CONF_TEXT:
                    return path
        except FileNotFoundError:
            pass
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(CEPH_CLIENT_CONF_TEXT)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    def _delete_unused_secrets(self) -> None:
        """After a domain or disk went away: drop the ceph secrets nothing refers to any more.
        A failure here is logged, not raised: the VM is already gone."""
        with self._secrets_lock:
            try:
                secrets.delete_unused_ceph_secrets(self.conn())
            except (AgentError, libvirt.libvirtError) as e:
                log.warning("cannot remove unused Ceph secrets", extra={"error": str(e)})

    def _exists(self, name: str) -> bool:
        try:
            self.conn().lookupByName(name)
            return True
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise self._error(e, name) from None

    def start(self, name: str) -> VmInfo:
        """Boot a stopped VM; no-op if running; Conflict if paused (resume it)."""
        dom = self._dom(name)
        state = self._state(dom)
        if state == "paused":
            raise Conflict(f"VM {name!r} is paused: resume it instead", vm=name)
        if state not in ("running",):
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise self._error(e, name) from None
            try:
                self._shape(dom, bandwidth_from(self._xml(dom)))  # the taps are new
            except BaseException:
                self._destroy(dom, name)
                raise
        return self._info(dom)

    # -- resize --
    def resize(self, name: str, *, cpus: int | None = None, memory_mib: int | None = None) -> VmInfo:
        """hypervisor.driver.SupportsResize: vCPUs hot-plugged (setVcpusFlags), memory through
        the balloon (setMemoryFlags), live and in the definition if the VM runs or is paused,
        in the definition only if it is stopped. Up to the maximum it was defined with."""
        dom = self._dom(name)
        info = self._info(dom)
        live = bool(self._call(dom.isActive, name))
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
        old_cpus = self._call(dom.vcpusFlags, name, libvirt.VIR_DOMAIN_AFFECT_LIVE if live
                              else libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        check_resize(name, cpus=cpus, memory_mib=memory_mib, max_cpus=info.max_cpus or info.cpus,
                     max_memory_mib=info.max_memory_mib or info.memory_mib, live_cpus=old_cpus if live else None)
        if cpus is not None and cpus != old_cpus:
            self._call(dom.setVcpusFlags, name, cpus, flags)
        if memory_mib is not None:
            try:
                self._call(dom.setMemoryFlags, name, memory_mib * 1024, flags)
            except BaseException:
                if cpus is not None and cpus != old_cpus:  # nothing half-changed
                    try:
                        dom.setVcpusFlags(old_cpus, flags)
                    except libvirt.libvirtError as e:
                        log.warning("cannot undo a vCPU change", extra={"vm": name,
                                                                        "error": e.get_error_message()})
                raise
        return self._info(dom)

    # -- bandwidth --
    def _shape(self, dom: libvirt.virDomain, bw: bandwidth.Bandwidth) -> None:
        """Apply ``bw`` to the running domain's taps (clear them when unlimited)."""
        for tap in taps(self._xml(dom)):
            if bw.limited:
                bandwidth.apply(tap, bw)
            else:
                bandwidth.clear(tap)

    def nic_taps(self, name: str) -> dict[str, str]:
        """hypervisor.driver.ReportsNicTaps: from the live XML (libvirt names a tap its NIC's
        ``<target dev>``, or ``vnetN`` at each start where the definition has none)."""
        dom = self._dom(name)
        if self._state(dom) not in ("running", "paused"):
            return {}
        return taps_by_mac(self._xml(dom))

    def set_bandwidth(self, name: str, bw: bandwidth.Bandwidth) -> None:
        """hypervisor.driver.SupportsBandwidth: kept in the domain's metadata (persistent and
        live: a migration carries it) and applied to its taps now if it runs."""
        bw.check()
        dom = self._dom(name)
        active = dom.isActive()
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if active else 0)
        self._call(dom.setMetadata, name, libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                   bandwidth_xml(bw) if bw.limited else None, "nodeagent-bw" if bw.limited else None,
                   BANDWIDTH_NS, flags)
        if active:
            self._shape(dom, bw)

    def bandwidth(self, name: str) -> bandwidth.Bandwidth:
        """The limits the VM keeps (its persistent definition)."""
        return bandwidth_from(self._xml(self._dom(name), inactive=True))

    def stop(self, name: str, *, force: bool = False, timeout: float = 60) -> VmInfo:
        """ACPI power button unless ``force``; destroy if still up after ``timeout`` seconds."""
        dom = self._dom(name)
        state = self._state(dom)
        if state == "stopped":
            return self._info(dom)
        if not force and state == "paused":
            self._call(dom.resume, name)
        if not force and state != "crashed":
            try:
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError:
                pass  # fall through to destroy
            deadline = time.monotonic() + timeout
            while self._state(dom) != "stopped" and time.monotonic() < deadline:
                time.sleep(STOP_POLL_S)
        if self._state(dom) != "stopped":
            self._destroy(dom, name)
        bandwidth.sweep()  # the ifbs of its taps
        return self._info(dom)

    def _destroy(self, dom: libvirt.virDomain, name: str) -> None:
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # already off
                raise self._error(e, name) from None
        bandwidth.sweep()  # the ifbs of the taps that went with it

    def _call(self, fn, name: str, *args):
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            raise self._error(e, name) from None

    def reboot(self, name: str, *, force: bool = True) -> VmInfo:
        """Restart a running VM. ``force`` (default): a reset, like the reset button;
        otherwise an ACPI reboot request the guest may ignore."""
        dom = self._dom(name)
        state = self._state(dom)
        if state != "running":
            raise Conflict(f"VM {name!r} is {state}: only a running VM can reboot", vm=name)
        if force:
            self._call(dom.reset, name, 0)
        else:
            self._call(dom.reboot, name, libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
        return self._info(dom)

    def pause(self, name: str) -> VmInfo:
        dom = self._dom(name)
        state = self._state(dom)
        if state == "stopped":
            raise Conflict(f"VM {name!r} is stopped: start it first", vm=name)
        if state != "paused":
            self._call(dom.suspend, name)
        return self._info(dom)

    def resume(self, name: str) -> VmInfo:
        dom = self._dom(name)
        state = self._state(dom)
        if state == "stopped":
            raise Conflict(f"VM {name!r} is stopped: start it instead", vm=name)
        if state == "paused":
            self._call(dom.resume, name)
        return self._info(dom)

    def delete(self, name: str) -> bool:
        """Destroy if running and undefine; never touches volumes. The console log is removed
        when it is the driver's default one. False if the VM was already gone."""
        dom = self._find_dom(name)
        if dom is None:
            return False
        console = self._console_path(dom)
        used_secrets = any(el.get("uuid") for el in self._xml(dom, inactive=True).iter("secret"))
        if dom.isActive():
            self._destroy(dom, name)
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise self._error(e, name) from None
        if used_secrets:
            self._delete_unused_secrets()
        for path in (self.qmp_socket(name), console if console == self.default_console_log(name) else None):
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return True

    # -- queries --
    def get(self, name: str) -> VmInfo:
        return self._info(self._dom(name))

    def find(self, name: str) -> VmInfo | None:
        try:
            check_name(name)
        except InvalidInput:
            return None
        dom = self._find_dom(name)
        return self._info(dom) if dom else None

    def list(self) -> list[VmInfo]:
        try:
            doms = self.conn().listAllDomains(0)
        except libvirt.libvirtError as e:
            raise self._error(e, "*") from None
        out = []
        for dom in doms:
            try:
                if self._ours(dom):
                    out.append(self._info(dom))
            except libvirt.libvirtError:
                continue  # undefined while we looked
        return sorted(out, key=lambda i: i.name)

    def disks(self, name: str) -> list[DiskSpec]:
        """The VM's disks from its persistent definition, by target."""
        return disks_from_xml(self._xml(self._dom(name), inactive=True))

    def spec(self, name: str) -> VmSpec:
        """A VmSpec read back from libvirt (re-adoption after a restart)."""
        dom = self._dom(name)
        root = self._xml(dom, inactive=True)
        info = self._info(dom)
        nics = []
        from hypervisor.driver import NicSpec
        for el in root.findall("devices/interface"):
            src, mac, tap = el.find("source"), el.find("mac"), el.find("target")
            if src is not None and src.get("bridge") and mac is not None:
                nics.append(NicSpec(bridge=src.get("bridge"), mac=mac.get("address"),
                                    target=tap.get("dev") if tap is not None else None))
        os_ = root.find("os")
        text = lambda tag: os_.findtext(tag) if os_ is not None else None  # noqa: E731
        machine = os_.find("type").get("machine", "q35") if os_ is not None else "q35"
        return VmSpec(name=info.name, uuid=info.uuid, cpus=info.cpus, memory_mib=info.memory_mib,
                      max_cpus=info.max_cpus, max_memory_mib=info.max_memory_mib,
                      disks=tuple(disks_from_xml(root)), nics=tuple(nics),
                      console_log=self._console_path(dom), kernel=text("kernel"), initrd=text("initrd"),
                      cmdline=text("cmdline"), machine="pc" if "i440fx" in machine or machine == "pc" else "q35",
                      bandwidth=bandwidth_from(root))

    def stats(self, name: str) -> dict:
        """{state, cpu_time_ns, memory_bytes (QEMU's RSS), disk: {rd_bytes, wr_bytes},
        net: {rx_bytes, tx_bytes, rx_packets, tx_packets}} from libvirt; zeros while stopped."""
        dom = self._dom(name)
        state, _max, _mem, _vcpus, cpu_ns = self._call(dom.info, name)
        out = {"state": _STATE_NAMES.get(state, "unknown"), "cpu_time_ns": int(cpu_ns),
               "memory_bytes": 0, "disk": {"rd_bytes": 0, "wr_bytes": 0},
               "net": {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0}}
        if not dom.isActive():
            return out
        try:  # the cgroup's figure, in ns (info()'s counts clock ticks): what bulk_stats' cpu.time reads
            out["cpu_time_ns"] = int(dom.getCPUStats(True)[0]["cpu_time"])
        except (libvirt.libvirtError, IndexError, KeyError):
            pass
        try:
            mem = dom.memoryStats()
            out["memory_bytes"] = int(mem.get("rss", mem.get("actual", 0))) * 1024
        except libvirt.libvirtError:
            pass
        root = self._xml(dom)
        for el in root.findall("devices/disk/target"):
            try:
                _rr, rd, _wr, wr, _err = dom.blockStats(el.get("dev"))
            except libvirt.libvirtError:
                continue
            out["disk"]["rd_bytes"] += rd
            out["disk"]["wr_bytes"] += wr
        for el in root.findall("devices/interface/target"):
            try:
                st = dom.interfaceStats(el.get("dev"))
            except libvirt.libvirtError:
                continue
            out["net"]["rx_bytes"] += st[0]
            out["net"]["rx_packets"] += st[1]
            out["net"]["tx_bytes"] += st[4]
            out["net"]["tx_packets"] += st[5]
        return out

    def bulk_stats(self) -> dict[str, dict]:
        """hypervisor.driver.SupportsBulkStats: one getAllDomainStats call for every domain
        (NOWAIT: a domain whose monitor a job holds, a migration say, reports what it can at
        once; its disk figures are then left out, not waited for). Whether a domain is ours is
        asked once per UUID (its metadata: an RPC each) and remembered while it exists."""
        try:
            records = self.conn().getAllDomainStats(BULK_STATS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
        except libvirt.libvirtError as e:
            raise self._error(e, "*") from None
        out, seen = {}, set()
        for dom, rec in records:
            uuid = dom.UUIDString()  # held by the handle: no RPC
            seen.add(uuid)
            with self._owned_lock:
                ours = self._owned.get(uuid)
            if ours is None:
                try:
                    ours = self._ours(dom)
                except libvirt.libvirtError:
                    continue  # undefined while we looked
                with self._owned_lock:
                    self._owned[uuid] = ours
            if ours:
                out[dom.name()] = stats_from_record(rec)
        with self._owned_lock:
            for uuid in set(self._owned) - seen:
                del self._owned[uuid]
        return out

    def _console_path(self, dom: libvirt.virDomain) -> str | None:
        log = self._xml(dom, inactive=True).find("devices/serial/log")
        return log.get("file") if log is not None else None

    def console_log(self, name: str, tail: int | None = None) -> str:
        """What the guest wrote on its serial console (all boots), or its last ``tail`` lines."""
        path = self._console_path(self._dom(name))
        if not path:
            return ""
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        if tail is None:
            return text
        if tail <= 0:
            return ""
        lines = text.splitlines(keepends=True)
        return "".join(lines[-tail:])

    def open_console(self, name: str) -> int:
        """hypervisor.driver.SupportsConsole: the serial port's pty, as libvirt reports it for
        the running domain, opened raw (what virDomainOpenConsole does for a local client;
        libvirt's console lock is not taken, so a `virsh console` beside it would share the
        output)."""
        dom = self._dom(name)
        if not dom.isActive():
            raise Conflict(f"VM {name!r} is not running: its console opens when it runs", vm=name)
        src = self._xml(dom).find("devices/serial[@type='pty']/source")
        path = src.get("path") if src is not None else None
        if not path:
            raise Unavailable(f"VM {name!r} has no serial pty (libvirt reported none)", vm=name)
        return open_serial_pty(path)

    def qmp_status(self, name: str) -> dict:
        """QEMU's own run state through the agent's QMP socket (Unavailable when stopped)."""
        self._dom(name)
        return qmp.query_status(self.qmp_socket(name))

    def block_jobs(self, name: str) -> list[dict]:
        self._dom(name)
        return qmp.query_block_jobs(self.qmp_socket(name))

    # -- disks --
    def attach_disk(self, name: str, disk: DiskSpec) -> None:
        """Attach to the running VM (hot-plug) and to its persistent definition; config only
        while stopped. Conflict if the target is taken."""
        qemu_img_check(disk)
        dom = self._dom(name)
        if any(d.target == disk.target for d in disks_from_xml(self._xml(dom, inactive=True))):
            raise Conflict(f"VM {name!r} already has a disk {disk.target}: pick another target",
                           vm=name, target=disk.target)
        machine = self._xml(dom, inactive=True).find("os/type").get("machine", "q35")
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        machine = "pc" if "i440fx" in machine or machine == "pc" else "q35"
        with self._secrets_lock:
            (disk,), made = self._with_ceph_secrets((disk,))
            try:
                self._call(dom.attachDeviceFlags, name, disk_xml(disk, machine=machine), flags)
            except BaseException:
                for sid in made:
                    secrets.delete_ceph_secret(self.conn(), sid)
                raise

    def detach_disk(self, name: str, target: str) -> None:
        """Detach from the persistent definition and, while running, from the guest (waits up
        to DETACH_TIMEOUT_S for the guest to release it). NotFound if there is no such disk."""
        dom = self._dom(name)
        root = self._xml(dom, inactive=True)
        el = next((d for d in root.findall("devices/disk") if d.find("target").get("dev") == target), None)
        if el is None:
            raise NotFound(f"VM {name!r} has no disk {target}", vm=name, target=target)
        xml = ET.tostring(el, encoding="unicode")
        if dom.isActive() and self._live_has(dom, target):
            self._call(dom.detachDeviceFlags, name, xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            deadline = time.monotonic() + DETACH_TIMEOUT_S
            while self._live_has(dom, target):
                if time.monotonic() > deadline:
                    raise Conflict(f"VM {name!r}: the guest did not release disk {target} within "
                                   f"{DETACH_TIMEOUT_S}s; retry, or stop the VM and detach", vm=name)
                time.sleep(STOP_POLL_S)
        self._call(dom.detachDeviceFlags, name, xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if el.get("type") == "network":
            self._delete_unused_secrets()

    def resize_disk(self, name: str, target: str, size: int) -> None:
        """hypervisor.driver.SupportsDiskResize: QEMU's block_resize of a running VM's disk."""
        dom = self._dom(name)
        if not dom.isActive() or not self._live_has(dom, target):
            raise NotFound(f"VM {name!r} has no disk {target} in use", vm=name, target=target)
        self._call(dom.blockResize, name, target, int(size), libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    def _live_has(self, dom: libvirt.virDomain, target: str) -> bool:
        return any(t.get("dev") == target for t in self._xml(dom).findall("devices/disk/target"))

    # -- snapshots --
    def _snapshot_paths(self, name: str) -> list[str]:
        paths = []
        for d in self.disks(name):
            if d.readonly or d.device == "cdrom":
                continue
            if d.type != "file" or d.format != "qcow2":
                raise Unprocessable(f"VM {name!r}: disk {d.target} is {d.type}/{d.format}; only qcow2 "
                                    "file disks take snapshots here", vm=name)
            paths.append(d.source)
        return paths

    def snapshot(self, name: str, snapshot: str) -> None:
        """Only valid while stopped: an internal qcow2 snapshot of every writable disk. On
        failure the snapshots already taken are removed."""
        if not snapshot or "/" in snapshot or snapshot.startswith("-") or "," in snapshot:
            raise InvalidInput(f"bad snapshot name {snapshot!r}: use letters, digits, '-', '_'")
        dom = self._dom(name)
        state = self._state(dom)
        if state != "stopped":
            raise Conflict(f"VM {name!r} is {state}: stop it before taking a snapshot", vm=name)
        paths = self._snapshot_paths(name)
        for p in paths:
            if snapshot in qemu_img_snapshots(p):
                raise Conflict(f"VM {name!r} already has a snapshot {snapshot!r}", vm=name)
        done = []
        try:
            for p in paths:
                qemu_img_snapshot_create(p, snapshot)
                done.append(p)
        except AgentError:
            for p in done:
                qemu_img_snapshot_delete(p, snapshot)
            raise

    def list_snapshots(self, name: str) -> list[str]:
        """Snapshots present on every writable disk."""
        paths = self._snapshot_paths(name)
        if not paths:
            return []
        common = set(qemu_img_snapshots(paths[0]))
        for p in paths[1:]:
            common &= set(qemu_img_snapshots(p))
        return sorted(common)

    # hypervisor.driver.SupportsSnapshots: running or stopped (the work is in libvirt_snapshots)
    def create_snapshot(self, name: str, snapshot: str) -> str:
        from hypervisor import libvirt_snapshots
        return libvirt_snapshots.create(self, name, snapshot)

    def frozen(self, name: str):
        """hypervisor.driver.SupportsFilesystemFreeze (the work is in hypervisor.guest_agent):
        a VM that is not running is not asked."""
        from contextlib import nullcontext

        from hypervisor import guest_agent
        dom = self._dom(name)
        if self._state(dom) != "running":
            return nullcontext(False)
        return guest_agent.frozen(dom, self._xml(dom), name)

    def thaw(self, name: str) -> bool:
        """hypervisor.driver.SupportsFilesystemFreeze.thaw."""
        from hypervisor import guest_agent
        dom = self._dom(name)
        if self._state(dom) != "running" or not guest_agent.connected(self._xml(dom)):
            return False
        return guest_agent.bounded(dom, name) and guest_agent.thaw(dom, name)

    def revert_snapshot(self, name: str, snapshot: str) -> None:
        from hypervisor import libvirt_snapshots
        libvirt_snapshots.revert(self, name, snapshot)

    def delete_snapshot(self, name: str, snapshot: str) -> bool:
        from hypervisor import libvirt_snapshots
        return libvirt_snapshots.delete(self, name, snapshot)

    def export_disk(self, name: str, target: str, dest: str, *, snapshot: str, backing: str | None = None,
                    backing_format: str | None = None, held=None) -> None:
        """hypervisor.driver.SupportsDiskExport (the work is in libvirt_snapshots)."""
        from hypervisor import libvirt_snapshots
        libvirt_snapshots.export_disk(self, name, target, dest, snapshot=snapshot, backing=backing,
                                      backing_format=backing_format, held=held)

    # -- migration (hypervisor.driver.SupportsMigration; the work is in libvirt_migration) --
    def migrate(self, name: str, dest_uri: str, options, *, progress=None, cancelled=None):
        """Peer-to-peer live migration to the libvirtd at ``dest_uri``; see
        hypervisor.libvirt_migration. On failure the VM keeps running here."""
        from hypervisor import libvirt_migration
        result = libvirt_migration.migrate(self, name, dest_uri, options, progress=progress,
                                           cancelled=cancelled)
        bandwidth.sweep()  # its taps left with it: so do their ifbs
        return result

    def prepare_incoming_disks(self, disks) -> tuple[DiskSpec, ...]:
        """Destination of a migration: what an incoming domain's RBD disks need on this host
        (the cephx key as a libvirt secret, the client ceph.conf); returns the disks as this
        host attaches them (``attach`` with secret_uuid and config, never the key). Undone by
        delete_unused_secrets() if the domain does not arrive."""
        with self._secrets_lock:
            out, _ = self._with_ceph_secrets(tuple(disks))
        return out

    def delete_unused_secrets(self) -> None:
        """Drop the Ceph secrets no domain refers to (after a domain left this host)."""
        self._delete_unused_secrets()

    # -- CPU model (SupportsCpuCheck) --
    def guest_cpu(self, name: str) -> str | None:
        """The running guest's CPU (its live migratable XML: host-model expanded to a model and
        features; a named model as defined, under TCG too); None without a CPU model (TCG's
        default)."""
        dom = self._dom(name)
        try:
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        except libvirt.libvirtError as e:
            raise self._error(e, name) from None
        cpu = ET.fromstring(xml).find("cpu")
        if cpu is None or cpu.find("model") is None:
            return None
        return ET.tostring(cpu, encoding="unicode")

    def cpu_unsupported(self, cpu_xml: str) -> str | None:
        if self.virt_type != "kvm":  # TCG emulates the CPU: only whether its QEMU knows the model
            return tcg_model_unusable(self.conn(), cpu_xml)
        return cpu_unsupported(self.conn(), cpu_xml)

    def host_cpu(self) -> str | None:
        return host_cpu(self.conn()) if self.virt_type == "kvm" else None

    def cpu_missing(self, guest_cpu: str, host_cpu: str) -> str | None:
        return cpu_missing(self.conn(), guest_cpu, host_cpu)

    def postcopy_unavailable(self) -> str | None:
        from hypervisor.host import userfaultfd_missing
        return userfaultfd_missing()

    def abort_migration(self, name: str) -> bool:
        from hypervisor import libvirt_migration
        return libvirt_migration.abort(self, name)

    # -- post-copy recovery (hypervisor.driver.SupportsPostcopyResume) --
    def postcopy_split(self, name: str) -> bool:
        from hypervisor import libvirt_migration
        return libvirt_migration.postcopy_split(self, name)

    def resume_postcopy(self, name: str, dest_uri: str, options, *, progress=None):
        """See hypervisor.libvirt_migration.resume_postcopy."""
        from hypervisor import libvirt_migration
        result = libvirt_migration.resume_postcopy(self, name, dest_uri, options, progress=progress)
        bandwidth.sweep()  # its taps left with it: so do their ifbs
        return result
