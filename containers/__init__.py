"""Container runtimes: runc + conmon, and a stateful fake."""
from containers.runtime import (ContainerInfo, ContainerSpec, ExecResult, IdMap, Limits, NetworkSpec,
                                PortMap, Rootfs, Runtime)

__all__ = ["ContainerInfo", "ContainerSpec", "ExecResult", "IdMap", "Limits", "NetworkSpec", "PortMap",
           "Rootfs", "Runtime"]
