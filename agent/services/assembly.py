"""What an instance is made of, put together in one place for VMs and containers.

A *VM* is: a root disk (a copy-on-write clone of its image, ``i-<id12>-disk`` in a pool), a
NoCloud seed in its instance dir (its id, hostname, user-data and, with an address, a
network-config for its NIC), an address leased on the host bridge (network ``bridge``)
and the driver's VmSpec naming them (root at ROOT_TARGET, seed at SEED_TARGET).
A *container* is: its rootfs (the image's layers + a fresh upper dir, ``i-<id12>-rootfs``)
and the runtime's ContainerSpec, whose process follows the image's OCI config as Docker
and Podman do (containers.bundle.resolve_process: Entrypoint + (command or Cmd), the
request's env over the image's Env by key, WorkingDir, User looked up in the image's
/etc/passwd and /etc/group).

Used by the API's create, a migration's destination, bench/vms.py and the tests. Nothing
here writes a record: on failure the caller removes what was made (the instance service
does, by its record; ``remove_vm`` is that removal for callers that keep none).
"""
from __future__ import annotations

import math
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import InvalidInput, Unprocessable
from storage.units import GiB

ROOT_TARGET = "vda"
SEED_TARGET = "vdz"  # read-only virtio disk labelled "cidata" (cloud kernels lack AHCI for a cdrom)
INSTANCE_DIR_MODE = 0o711  # QEMU (another user) may reach its seed and log inside; nobody lists them


def mac_for(inst_id: str) -> str:
    """The VM's NIC address: QEMU's OUI and the first 6 hex digits of its id."""
    h = inst_id[:6]
    return "52:54:00:" + ":".join(h[i:i + 2] for i in range(0, 6, 2))


def tap_for(inst_id: str) -> str:
    """The VM's tap on the host bridge (``<target dev>``, at most 15 characters): derived from
    its id alone, so a migrated VM keeps it and its filter rules (keyed by it) exist before
    the VM starts."""
    return "nt" + inst_id[:12]


def root_volume(kind: str, inst_id: str) -> str:
    """The name of an instance's root volume (VM disk or container rootfs) in its pool."""
    return f"i-{inst_id[:12]}-disk" if kind == "vm" else f"i-{inst_id[:12]}-rootfs"


def seed_disk(path: str):
    """The NoCloud seed as the guest sees it: a read-only virtio disk at SEED_TARGET."""
    from hypervisor.driver import DiskSpec
    return DiskSpec(target=SEED_TARGET, source=path, format="raw", readonly=True)


def bandwidth_of(req):
    """The driver's Bandwidth of a request (models.InstanceCreate; unlimited without one)."""
    from containers.bandwidth import Bandwidth
    spec = getattr(req, "bandwidth", None)
    return spec.limits() if spec is not None else Bandwidth()


@dataclass(frozen=True)
class DirectBoot:
    """A kernel booted directly instead of the disk's boot loader (the test guest of
    scripts/build-test-images, used by tests and bench/vms.py; the API has no such field)."""
    kernel: str
    initrd: str | None = None
    cmdline: str | None = None


def _nothing(_phase: str) -> None:
    pass


class Assembly:
    """Puts instances together from the image store, the host network (None: VMs get no
    address, as with the fake driver) and the host bridge's name; instance dirs (seed,
    console log) live under ``instances_dir``."""

    def __init__(self, store, network, *, bridge: str, instances_dir: Path):
        self.store = store
        self.network = network
        self.bridge = bridge
        self.instances_dir = Path(instances_dir)

    # -- files --
    def instance_dir(self, inst_id: str) -> Path:
        """The instance's own dir (made if missing): its seed (0600: user_data), console log.
        Traversable by QEMU (which runs as another user), listable and readable by root only."""
        d = self.instances_dir / inst_id
        d.mkdir(mode=INSTANCE_DIR_MODE, parents=True, exist_ok=True)
        for path in (d.parent, d):
            if path.stat().st_mode & 0o777 != INSTANCE_DIR_MODE:
                path.chmod(INSTANCE_DIR_MODE)
        return d

    # -- VMs --
    def vm_address(self, inst_id: str, want: str | None = None) -> str | None:
        """Lease the VM's address on the host bridge (made if missing), ``want`` if free;
        None without a host network."""
        from containers.network import VM_LEASE_PREFIX
        if self.network is None:
            return None
        self.network.ready_bridge()  # once per process (iptables checks), not per VM
        return self.network.lease(VM_LEASE_PREFIX + inst_id, want, mac=mac_for(inst_id),
                                  ifname=tap_for(inst_id))

    def sync_vm_port(self, driver, inst_id: str, name: str) -> bool:
        """Key the running VM's filter rules (anti-spoofing, security groups) to the tap it
        runs on, read from the driver's live definition (hypervisor.driver.ReportsNicTaps): a
        VM defined before the filter existed keeps libvirt's ``vnetN``, a new name at each
        start, and a lease without MAC or port. True if the rules moved; a no-op without a
        host network, a lease, a NIC, or a driver that names its taps."""
        from containers.network import VM_LEASE_PREFIX
        from hypervisor.driver import ReportsNicTaps
        if self.network is None or not isinstance(driver, ReportsNicTaps):
            return False
        lease = VM_LEASE_PREFIX + inst_id
        if self.network.find_lease(lease) is None:
            return False
        taps = driver.nic_taps(name)
        mac = mac_for(inst_id)
        if mac not in taps:
            if len(taps) != 1:  # stopped, or NICs that are not the agent's: nothing to key
                return False
            mac = next(iter(taps))  # its one NIC, with a MAC of its own
        return self.network.move_port(lease, mac=mac, ifname=taps[mac])

    def release_address(self, inst_id: str) -> bool:
        """Give the VM's address back; False if it had none."""
        from containers.network import VM_LEASE_PREFIX
        return self.network.release(VM_LEASE_PREFIX + inst_id) if self.network is not None else False

    def vm_seed(self, inst_id: str, name: str, *, user_data: str | None = None,
                ip: str | None = None) -> str:
        """Write the VM's NoCloud seed (with ``ip``: a network-config for its NIC, with the
        bridge's gateway); its path."""
        from hypervisor.seed import make_seed, network_config
        net = self.network
        netcfg = network_config(mac_for(inst_id), f"{ip}/{net.subnet.prefixlen}", net.gateway) \
            if ip and net is not None else None
        return make_seed(str(self.instance_dir(inst_id) / "seed.iso"), instance_id=inst_id,
                         hostname=name, user_data=user_data, network_config=netcfg)

    def vm_disks(self, inst_id: str, name: str, image_id: str, pool: str, volume: str, *,
                 size: int | None = None, user_data: str | None = None, ip: str | None = None):
        """Clone the root disk and write the seed (at create, and on a migration's
        destination); returns (root volume, seed path)."""
        vol = self.store.clone_disk(image_id, volume, pool=pool, size=size)
        return vol, self.vm_seed(inst_id, name, user_data=user_data, ip=ip)

    def vm_spec(self, inst_id: str, req, vol, seed: str, *, boot: DirectBoot | None = None, volumes=()):
        """The driver's VmSpec of ``req`` (a models.InstanceCreate) on its root volume and seed,
        with ``volumes`` (DiskSpecs of attached volumes) after them."""
        from hypervisor.disks import disk_for_volume
        from hypervisor.driver import NicSpec, VmSpec

        nics = (NicSpec(bridge=self.bridge, mac=mac_for(inst_id), target=tap_for(inst_id)),) \
            if req.network == "bridge" else ()
        kernel, initrd, cmdline = (boot.kernel, boot.initrd, boot.cmdline) if boot else (None, None, None)
        return VmSpec(name=req.name, uuid=str(uuid.UUID(inst_id)), cpus=max(1, math.ceil(req.cpus)),
                      memory_mib=req.memory_mib, bandwidth=bandwidth_of(req),
                      max_cpus=getattr(req, "max_cpus", None), max_memory_mib=getattr(req, "max_memory_mib", None),
                      disks=(disk_for_volume(vol, ROOT_TARGET), seed_disk(seed), *volumes),
                      nics=nics, console_log=str(self.instance_dir(inst_id) / "console.log"),
                      kernel=kernel, initrd=initrd, cmdline=cmdline)

    def create_vm(self, driver, inst_id: str, req, image_id: str, pool: str, *,
                  phase: Callable[[str], None] = _nothing, boot: DirectBoot | None = None, volumes=(),
                  fill: Callable[[str], None] | None = None):
        """Lease the address (network ``bridge``), clone the disk, write the seed, define the
        domain (with ``volumes``: DiskSpecs of attached volumes) and, with ``req.start``, start
        it; returns (VmInfo, ip). ``fill(volume name)`` runs between the clone and the define (a
        backup's restore puts its data into the disk). On failure what was made stays: the
        caller removes it (by its record, or with ``remove_vm``)."""
        phase("clone")
        ip = self.vm_address(inst_id) if req.network == "bridge" else None
        vol, seed = self.vm_disks(inst_id, req.name, image_id, pool, root_volume("vm", inst_id),
                                  size=req.disk_gib * GiB if req.disk_gib else None,
                                  user_data=req.user_data, ip=ip)
        if fill is not None:
            phase("fill")
            fill(root_volume("vm", inst_id))
        phase("define")
        info = driver.define(self.vm_spec(inst_id, req, vol, seed, boot=boot, volumes=volumes))
        if req.start:
            phase("start")
            info = driver.start(req.name)
        return info, ip

    def remove_vm(self, driver, inst_id: str, name: str, pool: str) -> None:
        """Remove what create_vm made, each step tolerating absence, for callers that keep no
        record (bench/vms.py, tests); the instance service removes the same by its record."""
        driver.delete(name)
        self.remove_vm_parts(inst_id, pool)

    def remove_vm_parts(self, inst_id: str, pool: str) -> None:
        """Remove a VM's address, root volume and files, but not its domain (a define that
        failed made none; a domain of the same name may be another instance's)."""
        self.release_address(inst_id)
        self.store.release(pool, root_volume("vm", inst_id))
        shutil.rmtree(self.instances_dir / inst_id, ignore_errors=True)

    # -- containers --
    def container_spec(self, req, image, layers, volumes=()):
        """The runtime's ContainerSpec for ``req`` (a models.InstanceCreate) on ``image``'s
        prepared rootfs ``layers``, with the image's process rules applied and its user
        resolved in the image's layers. Unprocessable (422) if the image names a user it
        does not have, or neither the request nor the image gives a command."""
        from containers.bundle import apply_image_config
        from containers.runtime import ContainerSpec, Limits, NetworkSpec, PortMap, Rootfs

        spec = ContainerSpec(
            name=req.name,
            rootfs=Rootfs(lowerdirs=tuple(layers.lowerdirs), upperdir=layers.upperdir, workdir=layers.workdir,
                          quota_bytes=req.disk_gib * GiB if req.disk_gib else None),
            command=tuple(req.command or ()), env=dict(req.env), hostname=req.name,
            limits=Limits(cpus=req.cpus, memory_mib=req.memory_mib, pids_max=req.pids_max),
            network=NetworkSpec(mode=req.network, ports=tuple(
                PortMap(p.host_port, p.container_port, p.protocol, p.host_ip) for p in req.ports)),
            bandwidth=bandwidth_of(req),
            cap_add=tuple(getattr(req, "cap_add", None) or ()), cap_drop=tuple(getattr(req, "cap_drop", None) or ()),
            userns=not getattr(req, "privileged", False), image_config=dict(image.config or {}),
            volumes=tuple(volumes), tty=bool(getattr(req, "tty", False)))
        try:
            return apply_image_config(spec, *layers.lowerdirs)
        except InvalidInput as e:
            raise Unprocessable(f"image {image.name!r}: {e.message}") from None

    def create_container(self, runtime, req, image, pool: str, inst_id: str, *,
                         phase: Callable[[str], None] = _nothing, volumes=(), fill=None):
        """Prepare the rootfs, create the container (with ``volumes``, runtime VolumeMounts)
        and, with ``req.start``, start it; returns its ContainerInfo. ``fill(layers)`` runs
        before the create (a backup's restore puts its writes into the upper dir). On failure
        what was made stays: the caller removes it."""
        phase("rootfs")
        layers = self.store.prepare_rootfs(image.id, root_volume("container", inst_id), pool=pool)
        if fill is not None:
            phase("fill")
            fill(layers)
        phase("create")
        info = runtime.create(self.container_spec(req, image, layers, volumes))
        if req.start:
            phase("start")
            info = runtime.start(req.name)
        return info
