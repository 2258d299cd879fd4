"""VM drivers: libvirt (+ QMP) and a stateful fake."""
from hypervisor.driver import DiskSpec, Driver, NicSpec, VmInfo, VmSpec

__all__ = ["DiskSpec", "Driver", "NicSpec", "VmInfo", "VmSpec"]
