"""The control domain: moving instances to another host, agent to agent.

The package: ``peer`` (the HTTP client of a peer agent), ``source`` (the flows of the host that
sends), ``destination`` (the handlers of the host that receives), ``transfer`` (tar, filesystem and
stream helpers), ``evacuation`` (host maintenance: drain the host to its peers);
``MigrationService`` here is what the API calls.

Terms: the *source* agent owns the instance and orchestrates; the *destination* agent
is a configured peer (``[peers.NAME] url, token`` in the source's config). Protocol:

1. source -> destination ``POST /v1/peer/migrations``: the destination checks the
   caller is one of *its* configured peers, pulls the image from the source if it lacks
   it (``GET /v1/peer/images/{id}`` on the source), creates the instance's volume
   (same size; a qcow2 overlay on the same base image), seed and row (state ``incoming``)
   and answers with its disk paths and its libvirt migration URI. Shared storage (a VM on
   a ``block`` pool): the destination makes no volume; it checks its pool of the same name
   holds the very image, adopts it (records a reference), writes the seed, defines the
   cephx libvirt secret and answers the same ``rbd:pool/image``;
2. the source runs the hypervisor's peer-to-peer live migration to that URI, with the
   writable disks copied (local pools; memory only for shared storage) and progress
   sampled into the operation; it
   aborts the job if the destination agent stops answering;
3. source -> destination ``POST /v1/peer/migrations/{id}/finish``: the destination
   confirms the guest runs there and its record becomes the instance's record;
4. the source deletes its record and releases its volumes (shared volumes are only
   forgotten: the destination owns them now).

A container's attached volumes (ext4 files of a local pool) move with it: step 1 names them
(``attached_volumes``) and the destination makes each as a fresh filesystem of its size, with
its id and name, in state ``incoming``; once the container is stopped the source unmounts
them from it, mounts each read-only and streams its file tree (``PUT /v1/peer/migrations/
{id}/volumes/{volume}``, unpacked by the hardened extractor, owners shifted as the rootfs's:
the destination never mounts a filesystem image a peer made); at 3 they become the
container's there, at 4 the source deletes its own.

A VM's attached volumes (raw files of a local pool) move with it the same way: step 1 names
them (``attached_volumes``: id, name, size, target, pool) and the destination makes each as an
empty raw file of exactly that size in its own pool of that name (422 if it has none; 409 if
a volume of that name or id exists there), state ``incoming``, and answers its own path per
target in ``disk_sources`` (the domain XML there is rewritten to those paths: a path never
comes from the source). Live: the hypervisor's storage copy (libvirt's NBD mirror) copies each
writable one with the root disk; a read-only one (libvirt copies no read-only disk) is streamed
first. Stopped: each is streamed as raw bytes (``PUT .../volumes/{volume}``, exactly its size,
zeros kept as holes, never mounted there) after the disk, and defined with the domain. At 3
they become the VM's there, at 4 the source deletes its own; on a failure before 3 the
destination removes the files it made and the VM keeps its volumes here. A volume on a block
(RBD) pool is shared storage: never copied (libvirt's copy skips network disks); step 1 names
its image (``shared_uri``), the destination's pool of that name must see that very image (else
422), adopts it (a row, no image made) and defines its cephx secret, answering its own attach
facts; an abort only forgets it there, and at 4 the source only forgets it.

On any failure before 3 the guest keeps running on the source, the source calls
``DELETE /v1/peer/migrations/{id}`` so the destination removes what it prepared
(a destination that was down cleans up on restart, or when the migration is retried;
it never deletes an adopted shared volume), and the operation fails with what went wrong.

Trust: a destination accepts these calls only from a token whose *name* is one of its
configured peers and whose role is peer (or admin): create it on the destination with
``nodeagent token create <source-peer-name> --role peer`` and put the secret in the
source's ``[peers.<destination>] token``. A peer is still not a friend: every field it sends
has the public API's constrained type (agent/models.py), the rootfs stream is unpacked by the
hardened extractor (storage/upper.py), a disk layer may reference no file but the image's base,
an image it sends must have the digest asked for, and it touches only the incoming instances it
prepared (SOURCE_FILE); the source parses the destination's answers as strictly (its migration
URI reaches libvirt), and exports only the image of an instance it is sending to that peer.

Cancel (``DELETE /v1/operations/{id}``) fails a migration the same way until the guest
runs on the destination: that is the operation's point of no return (a later cancel gets 409).
A live VM migration that switched to post-copy (source.live_options: the request's controls
over the [migration] policy) passed it at the switch; if it then fails, the guest is split
between the hosts: nothing is aborted on the destination; the source resumes the copy from where
it stopped as soon as the destination answers again ([migration] postcopy_resume_window_s,
postcopy_resume_attempts), else its record goes to error and ``POST /v1/migrations/{id}/resume``
resumes it later (README "Post-copy failures"). A resumed copy ends as the migration would have.

Space: the source sends how much the copy writes (its disk's own allocated bytes, or the
container's upper dir) and the image's size; a destination whose local pool cannot take
that plus SPACE_HEADROOM refuses at 1 (507 ``insufficient_resources``), and a pool that
fills up during the copy fails it the same way, naming the pool and saying to free space
or pick another host.

Stopped VMs move offline: after 1, the source streams the disk's own qcow2 layer
(``PUT /v1/peer/migrations/{id}/disk``; the destination rebases it onto its copy of the
same base image) and 3 (``define: true``) defines the domain there, stopped. Its snapshots
(internal ones, inside that layer) go along: 1 names them (``snapshots``), 3 checks the
layer holds each (else 422, nothing defined) and records them there; the source forgets its
rows at 4. Every other migration of an instance with snapshots is refused (422) at the start.

Finish is idempotent and retried while the destination is unreachable: a retry gets the
record adopted by an earlier finish (whose answer was lost) or, for a running VM, by the
destination agent's restart. If a live-migrated VM's destination stays down through the
retries, the source's record goes to state ``error`` and the operation says the VM runs
on the destination: nothing is lost; delete the stale record. A container is started
here again instead (it may never have started there); if the destination had started it
and died before answering, that copy runs on until the destination agent restarts, whose
``recover()`` removes every incoming instance it finds that is not a running VM.
"""
from __future__ import annotations

from agent import models
from agent.migration.destination import MigrationDestination
from agent.migration.evacuation import Evacuation
from agent.migration.peer import PeerClient, Peers
from agent.migration.source import MigrationSource

__all__ = ["MigrationService", "MigrationSource", "MigrationDestination", "PeerClient", "Peers"]


class MigrationService:
    """Both sides of migration on this host: ``source`` (sending instances: agent.migration.source)
    and ``destination`` (receiving them: agent.migration.destination), and the configured ``peers``.
    The API calls these methods; each is the one of the side that does it."""

    def __init__(self, root):
        self.root = root
        self.peers = Peers(root)
        self.source = MigrationSource(root, self.peers)
        self.destination = MigrationDestination(root, self.peers, self.source.sending_to)
        self.evacuation = Evacuation(root, self.peers, self.source)

    def peer(self, name: str) -> PeerClient:
        return self.peers.get(name)

    def require_peer(self, caller: dict | None) -> str:
        return self.peers.require(caller)

    # -- source side --
    def create(self, req: models.MigrationCreate) -> dict:
        return self.source.create(req)

    def get(self, mig_id: str) -> dict:
        return self.source.get(mig_id)

    def resume(self, mig_id: str) -> dict:
        return self.source.resume(mig_id)

    # -- host maintenance (agent.migration.evacuation) --
    def evacuate(self, req: models.EvacuateRequest) -> dict:
        return self.evacuation.start(req)

    def restore(self) -> dict:
        return self.evacuation.restore()

    # -- destination side --
    def prepare_incoming(self, caller: dict, req: models.IncomingMigration) -> models.IncomingPrepared:
        return self.destination.prepare_incoming(caller, req)

    def finish_incoming(self, caller: dict, inst_id: str, resume: bool = True, start: bool = True,
                        keep=None, define: bool = False) -> dict:
        return self.destination.finish_incoming(caller, inst_id, resume=resume, start=start, keep=keep,
                                                define=define)

    def receive_rootfs(self, caller: dict, inst_id: str, stream) -> models.Received:
        return self.destination.receive_rootfs(caller, inst_id, stream)

    def receive_disk(self, caller: dict, inst_id: str, stream) -> models.Received:
        return self.destination.receive_disk(caller, inst_id, stream)

    def receive_volume(self, caller: dict, inst_id: str, vol_id: str, stream) -> models.Received:
        return self.destination.receive_volume(caller, inst_id, vol_id, stream)

    def abort_incoming(self, caller: dict, inst_id: str) -> bool:
        return self.destination.abort_incoming(caller, inst_id)

    def export_image(self, caller: dict, image_id: str):
        return self.destination.export_image(caller, image_id)

    def recover(self) -> int:
        return self.destination.recover()
