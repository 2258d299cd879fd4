"""Libvirt domain XML from a ``VmSpec``: the one place that knows libvirt's schema.

Choices: virtio disks and NICs; the serial console is a pty whose output virtlogd also
writes to ``console_log``; the agent's own QMP monitor is a second, unix-socket monitor
added with ``qemu:commandline`` (libvirt's monitor cannot be shared); the domain carries
a ``nodeagent`` metadata tag so the driver only lists domains it made. Every domain has a
guest-agent channel (a virtio-serial port named ``org.qemu.guest_agent.0``, its host socket
chosen by libvirt): a guest that runs an agent on it gets filesystem-consistent snapshots
(hypervisor/guest_agent.py). The guest is the tenant's: libvirt parses what it says there.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from urllib.parse import urlsplit

from containers.bandwidth import Bandwidth
from hypervisor.driver import DiskSpec, NicSpec, VmSpec

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NODEAGENT_NS = "urn:nodeagent:vm:1"
# the VM's rate limits, in a metadata element of its own (libvirt replaces metadata by namespace):
# <nodeagent-bw:bandwidth ingress_kbit="..." egress_kbit="..." burst_kbit="..."/>. Not libvirt's
# <bandwidth>: see containers/bandwidth.py for why the agent shapes taps itself
BANDWIDTH_NS = "urn:nodeagent:bandwidth:1"
QMP_CHARDEV_ID = "nodeagent-qmp"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"  # the port name qemu-ga and libvirt look for
MACHINES = ("q35", "pc")
SPARE_ROOT_PORTS = 6  # q35 hot-plugs one virtio disk per free pcie-root-port (the balloon and the
# guest agent's virtio-serial controller take one each)
RBD_DEFAULT_PORT = "6789"

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("nodeagent", NODEAGENT_NS)
ET.register_namespace("nodeagent-bw", BANDWIDTH_NS)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items() if v is not None})
    if text is not None:
        el.text = text
    return el


def disk_element(disk: DiskSpec, *, machine: str = "q35") -> ET.Element:
    """One <disk>: a file (qcow2/raw), an RBD image through librbd, or an NBD export."""
    kind = "file" if disk.type == "file" else "network"
    el = ET.Element("disk", {"type": kind, "device": disk.device})
    _sub(el, "driver", name="qemu", type=disk.format,
         discard="unmap" if disk.device == "disk" else None)
    if disk.type == "file":
        _sub(el, "source", file=disk.source)
    elif disk.type == "rbd":
        src = _sub(el, "source", protocol="rbd", name=disk.source)
        for mon in disk.attach.get("monitors", ()):
            host, _, port = str(mon).rpartition(":") if ":" in str(mon) else (str(mon), "", "")
            _sub(src, "host", name=host, port=port or RBD_DEFAULT_PORT)
        if disk.attach.get("config"):  # a ceph.conf QEMU's librbd reads (see LibvirtDriver)
            _sub(src, "config", file=disk.attach["config"])
        if disk.attach.get("user") and disk.attach.get("secret_uuid"):  # the key itself never goes here
            auth = _sub(el, "auth", username=disk.attach["user"])
            _sub(auth, "secret", type="ceph", uuid=disk.attach["secret_uuid"])
    elif disk.type == "nbd":
        url = urlsplit(disk.source)
        src = _sub(el, "source", protocol="nbd", name=url.path.lstrip("/"))
        if disk.attach.get("tls"):  # x509, with qemu.conf's nbd_tls_x509_cert_dir (the hosts' CA)
            src.set("tls", "yes")
        _sub(src, "host", name=url.hostname, port=url.port)
    else:
        raise ValueError(f"unknown disk type {disk.type!r}")
    if disk.device == "cdrom":
        bus = "sata" if machine == "q35" else "ide"
    else:
        bus = "virtio"
    _sub(el, "target", dev=disk.target, bus=bus)
    if disk.readonly or disk.device == "cdrom":
        _sub(el, "readonly")
    return el


def disk_xml(disk: DiskSpec, *, machine: str = "q35") -> str:
    return ET.tostring(disk_element(disk, machine=machine), encoding="unicode")


def nic_element(nic: NicSpec) -> ET.Element:
    el = ET.Element("interface", {"type": "bridge"})
    _sub(el, "mac", address=nic.mac)
    _sub(el, "source", bridge=nic.bridge)
    if nic.target:
        _sub(el, "target", dev=nic.target)
    _sub(el, "model", type="virtio")
    return el


def bandwidth_element(bw: Bandwidth) -> ET.Element:
    return ET.Element(f"{{{BANDWIDTH_NS}}}bandwidth", {k: str(v) for k, v in bw.to_dict().items() if v is not None})


def bandwidth_xml(bw: Bandwidth) -> str:
    """The metadata element alone, without its namespace, for virDomainSetMetadata (which
    puts it in BANDWIDTH_NS itself)."""
    return ET.tostring(ET.Element("bandwidth", {k: str(v) for k, v in bw.to_dict().items() if v is not None}),
                       encoding="unicode")


def bandwidth_from(root: ET.Element) -> Bandwidth:
    """The limits kept in a domain's XML (none: unlimited)."""
    el = root.find(f"metadata/{{{BANDWIDTH_NS}}}bandwidth")
    if el is None:
        return Bandwidth()
    vals = {k: int(el.get(k)) for k in ("ingress_kbit", "egress_kbit", "burst_kbit")
            if (el.get(k) or "").isdigit()}
    return Bandwidth(**vals)


def taps(root: ET.Element) -> list[str]:
    """The host-side tap names of a running domain's bridged NICs (live XML)."""
    return [t.get("dev") for t in root.findall("devices/interface[@type='bridge']/target") if t.get("dev")]


def taps_by_mac(root: ET.Element) -> dict[str, str]:
    """MAC (lower case) -> host-side tap of a running domain's bridged NICs (live XML)."""
    out = {}
    for nic in root.findall("devices/interface[@type='bridge']"):
        mac, tap = nic.find("mac"), nic.find("target")
        if mac is not None and mac.get("address") and tap is not None and tap.get("dev"):
            out[mac.get("address").lower()] = tap.get("dev")
    return out


HOST_MODEL = "host-model"


def cpu_element(cpu_model: str, virt_type: str) -> ET.Element | None:
    """The guest's <cpu>: a named model (a host group's baseline) exactly, on KVM and TCG
    alike (``fallback="forbid"``: QEMU runs that model or refuses to start); "host-model"
    only under KVM (libvirt expands it at start to a named model plus features another host
    can reproduce; host-passthrough could not move); under TCG none: QEMU's default model."""
    if cpu_model != HOST_MODEL:
        cpu = ET.Element("cpu", mode="custom", match="exact", check="partial")
        _sub(cpu, "model", cpu_model, fallback="forbid")
        return cpu
    if virt_type == "kvm":
        return ET.Element("cpu", mode="host-model", check="partial")
    return None


def domain_xml(spec: VmSpec, *, virt_type: str = "qemu", qmp_socket: str | None = None,
               cpu_model: str = HOST_MODEL) -> str:
    """The full <domain> document. ``virt_type`` is "kvm" or "qemu" (TCG); ``cpu_model``:
    "host-model" or a named model (cpu_element)."""
    if spec.machine not in MACHINES:
        raise ValueError(f"machine must be one of {MACHINES}")
    dom = ET.Element("domain", {"type": virt_type})
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    meta = _sub(dom, "metadata")
    _sub(meta, f"{{{NODEAGENT_NS}}}vm", version="1")
    if spec.bandwidth.limited:
        meta.append(bandwidth_element(spec.bandwidth))
    # <memory> is the most the guest may have, <currentMemory> what the balloon leaves it;
    # <vcpu> the most vCPUs, ``current`` those plugged (SupportsResize changes both in place)
    _sub(dom, "memory", str(spec.memory_max), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.cpus_max), placement="static",
         current=str(spec.cpus) if spec.cpus_max != spec.cpus else None)
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.kernel:
        _sub(os_, "kernel", spec.kernel)
        if spec.initrd:
            _sub(os_, "initrd", spec.initrd)
        if spec.cmdline:
            _sub(os_, "cmdline", spec.cmdline)
    else:
        _sub(os_, "boot", dev="hd")
    features = _sub(dom, "features")
    _sub(features, "acpi")  # always: QEMU 7.2 rejects libvirt 9's -no-acpi
    _sub(features, "apic")
    cpu = cpu_element(cpu_model, virt_type)  # migratable; a destination checks it before a live migration
    if cpu is not None:
        dom.append(cpu)
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    dev = _sub(dom, "devices")
    for disk in spec.disks:
        dev.append(disk_element(disk, machine=spec.machine))
    for nic in spec.nics:
        dev.append(nic_element(nic))
    serial = _sub(dev, "serial", type="pty")
    if spec.console_log:
        _sub(serial, "log", file=spec.console_log, append="on")
    _sub(serial, "target", port="0")
    console = _sub(dev, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    _sub(dev, "controller", type="usb", model="none")
    if spec.machine == "q35":
        _sub(dev, "controller", type="pci", index="0", model="pcie-root")
        for _ in range(SPARE_ROOT_PORTS):
            _sub(dev, "controller", type="pci", model="pcie-root-port")
    # the guest agent's port: libvirt connects its own agent client to the unix socket it
    # creates (no source path: libvirt picks one under its own state directory)
    channel = _sub(dev, "channel", type="unix")
    _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    _sub(dev, "memballoon", model="virtio")  # memory resize: the guest gives back what is taken
    if qmp_socket:
        cmd = _sub(dom, f"{{{QEMU_NS}}}commandline")
        for arg in ("-chardev", f"socket,id={QMP_CHARDEV_ID},path={qmp_socket},server=on,wait=off",
                    "-mon", f"chardev={QMP_CHARDEV_ID},mode=control"):
            _sub(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"
