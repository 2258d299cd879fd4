"""Rebuild: an instance's root disk (VM) or rootfs (container) made again from its image, or
from another image of the same kind, in place (POST /v1/instances/{id}/actions
{"action": "rebuild", "image"?}).

What stays: the record (name, id), the VM's domain (MAC, NoCloud seed with its user-data and
network-config), the address lease, the security groups, the limits. What goes: everything
the instance wrote on its root disk/rootfs. A running instance is stopped first (gracefully
within ``timeout``, or killed with ``force``) and started again after; a stopped one stays
stopped.

- VM: the root volume is released and cloned again from the image (same volume name, so the
  same path or RBD image; the domain's disk is re-pointed only if the new volume differs in
  type or format). The size is the create's ``disk_gib`` (or the image's).
- container: its writes (the overlay's upper dir) are dropped (containers.runtime.
  SupportsRootfsReset); the image's layers are its rootfs again. From another container
  image: that image's layers, and its process config resolved as at create (containers.
  bundle.apply_image_config: its Entrypoint + (the create's command or its Cmd), its Env
  under the create's env, its WorkingDir and User looked up in its layers) replace the old
  ones; the rootfs volume's image reference moves to it. Name, address, volumes, security
  groups and limits stay. A new image whose process cannot be resolved (no command, an
  unknown user, a command not in its layers) is refused (422) with the instance unchanged.

Refused before anything changes: an unknown image (404), one of the other kind (422), an
instance with snapshots (409: a VM's live in the disk the rebuild replaces, and a snapshot
keeps its image referenced; delete them first), a busy instance (409). If the clone fails
after the old disk was released, the instance is left stopped in state ``error`` naming the
cause: a new rebuild (or DELETE) fixes it.
"""
from __future__ import annotations

import logging

from agent.errors import AgentError, Conflict, Unprocessable, Unsupported
from agent.services.assembly import ROOT_TARGET, root_volume
from containers.runtime import SupportsRootfsReset
from storage.units import GiB

log = logging.getLogger(__name__)


def check(root, inst, req):
    """The image to rebuild ``inst`` from, after every check that needs no change; raises
    NotFound/Unprocessable/Conflict/Unsupported."""
    image = root.store.get(req.image or inst.image)
    if image.kind != inst.kind:
        raise Unprocessable(f"image {req.image!r} is a {image.kind} image: it cannot rebuild a {inst.kind}")
    if inst.kind == "container":
        if not image.layers:
            raise Unprocessable(f"image {image.id[:12]} has no layers to make a rootfs from")
        if not isinstance(root.runtime, SupportsRootfsReset):
            raise Unsupported(f"the {root.config.containers.runtime} runtime cannot rebuild containers")
    if root.snapshots.count(inst.id):
        raise Conflict(f"instance {inst.name!r} has snapshots: delete them before a rebuild "
                       "(they live in the disk it replaces and keep its image)")
    return image


def rebuild(root, inst, image, req, phase) -> object:
    """Do it (the caller holds the instance's lock and checked with ``check``); returns the
    driver's or runtime's info of the instance afterwards."""
    if inst.kind == "container":
        return _container(root, inst, image, req, phase)
    return _vm(root, inst, image, req, phase)


def _container(root, inst, image, req, phase):
    rt = root.runtime
    rimg, old_image = None, None
    volume = root_volume("container", inst.id)
    if image.id != inst.image:  # its layers and process, resolved before anything stops
        phase("layers")
        old_image, lowers = root.store.rebase_rootfs(image.id, inst.pool, volume)
        try:
            rimg = _rootfs_image(root, inst, image, lowers)
        except BaseException:
            root.store.rebase_rootfs(old_image, inst.pool, volume)
            raise
    was = rt.get(inst.name).state
    try:
        if was in ("running", "paused"):
            phase("stop")
            if was == "paused" or req.force:
                rt.kill(inst.name, 9)
            else:
                rt.stop(inst.name, timeout=req.timeout)
        phase("rootfs")
        rt.reset_rootfs(inst.name, rimg)
    except BaseException:
        if old_image is not None:
            root.store.rebase_rootfs(old_image, inst.pool, volume)
        raise
    if rimg is not None:
        root.records.update(inst.id, image=image.id)
        root.records.update_spec(inst.id, image_id=image.id)
    if was in ("running", "paused"):
        phase("start")
        return rt.start(inst.name)
    return rt.get(inst.name)


def _rootfs_image(root, inst, image, lowers):
    """The runtime's RootfsImage of ``image`` (layers ``lowers``) for ``inst``: its process
    resolved from the image's config and the instance's create request, as at create."""
    from agent import models
    from containers.runtime import RootfsImage
    from storage.images import RootfsLayers
    req = models.InstanceCreate.model_validate({k: v for k, v in inst.spec_dict().items() if k != "image_id"})
    spec = root.assembly.container_spec(req, image, RootfsLayers(tuple(lowers), "", "", None))
    return RootfsImage(lowerdirs=spec.rootfs.lowerdirs, command=spec.command, env=dict(spec.env),
                       workdir=spec.workdir, user=spec.user)


def _vm(root, inst, image, req, phase):
    from hypervisor.disks import disk_for_volume
    d = root.driver
    was = d.get(inst.name).state
    if was in ("running", "paused"):
        phase("stop")
        d.stop(inst.name, force=req.force or was == "paused", timeout=req.timeout)
    old = next((x for x in d.disks(inst.name) if x.target == ROOT_TARGET), None)
    name = root_volume("vm", inst.id)
    size = inst.spec.get("disk_gib")
    phase("clone")
    try:
        root.store.release(inst.pool, name)
        vol = root.store.clone_disk(image.id, name, pool=inst.pool, size=size * GiB if size else None)
        new = disk_for_volume(vol, ROOT_TARGET)
        if old is None or (old.source, old.type, old.format) != (new.source, new.type, new.format):
            if old is not None:
                d.detach_disk(inst.name, ROOT_TARGET)
            d.attach_disk(inst.name, new)
    except AgentError as e:
        root.records.update(inst.id, state="error", error=f"rebuild failed: {e.message}; rebuild again or delete it")
        raise
    root.records.update(inst.id, image=image.id)
    root.records.update_spec(inst.id, image_id=image.id)
    if was in ("running", "paused"):
        phase("start")
        return d.start(inst.name)
    return d.get(inst.name)
