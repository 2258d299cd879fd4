"""Request and response models of the v1 API (pydantic v2). Unknown fields are refused.

The OpenAPI spec (agent/openapi.py) is generated from these models, so a field's
``description`` here is its documentation.
"""
from __future__ import annotations

import ipaddress
import math
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, \
    model_validator

from containers import bandwidth as net_limits
from containers import validate as container_limits
from containers.security import ALL_CAPABILITIES
from hypervisor import validate as vm_limits

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"  # a hostname label: instance names
INSTANCE_ID_PATTERN = r"^[0-9a-f]{32}$"  # uuid4().hex, as this agent makes them
SHA256_PATTERN = r"^[0-9a-f]{64}$"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
# pools and volumes: words joined by single '-', '_' or '.' (so never '..', '/', a leading '.' or '-')
POOL_NAME_PATTERN = r"^[A-Za-z0-9]+([_.-][A-Za-z0-9]+)*$"
VOLUME_NAME_PATTERN = POOL_NAME_PATTERN
MAC_PATTERN = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"
HOST_PATH_PATTERN = r"^/[^\x00-\x1f]{0,4095}$"  # absolute, no control characters
REL_PATH_PATTERN = r"^[^/\x00][^\x00]{0,4095}$"  # relative, no NUL
DISK_TARGET_PATTERN = r"^[svh]d[a-z]{1,2}$"  # vda, sda, ...
# names and ids that later appear in URL paths (agent.api.path_id takes the same ones): at
# most MAX_REF characters, no '/' and no '..' (written without look-ahead: the spec and
# pydantic's regex engine share it)
REF_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_:-])*\.?$"
MAX_REF = 128
IPV4_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"^({IPV4_OCTET}\.){{3}}{IPV4_OCTET}$"  # dotted quad, no leading zeros
IMAGE_NAME_PATTERN = REF_PATTERN
MAX_MEMORY_MIB = 1024 * 1024  # 1 TiB
# the limits are the drivers' own (one source of truth); a model validator applies the kind's
MAX_CPUS = max(container_limits.MAX_CPUS, vm_limits.MAX_VCPUS)
# Strings that reach argv, env, file names or logs. NUL ends a C string (execve, open): the
# rest would be cut silently or refused late; other control characters forge log lines and
# break one-line files (seed meta-data, /etc/hosts). Multi-line text (a `sh -c` script, an
# env value, user_data) may hold tab/CR/LF, never NUL.
NO_NUL = r"^[^\x00]*$"
ONE_LINE = r"^[^\x00-\x1f\x7f]*$"
ENV_KEY_PATTERN = r"^[^=\x00-\x1f\x7f]+$"  # execve's "KEY=VALUE": the key holds no '='
MAX_ARG_CHARS = 32 * 1024  # one argv/env string (the kernel's MAX_ARG_STRLEN is 128 KiB of bytes)
MAX_USER_DATA = 64 * 1024  # characters; cloud-init reads it from a small seed ISO


Ref = Annotated[str, Field(max_length=MAX_REF, pattern=REF_PATTERN)]
Arg = Annotated[str, Field(max_length=MAX_ARG_CHARS, pattern=NO_NUL)]
EnvKey = Annotated[str, Field(min_length=1, max_length=256, pattern=ENV_KEY_PATTERN)]


def Line(max_length: int, min_length: int = 1):  # noqa: N802 - a type
    """A one-line string: no NUL or other control characters."""
    return Annotated[str, Field(min_length=min_length, max_length=max_length, pattern=ONE_LINE)]


def _integral(v):
    """JSON Schema calls 92.0 an integer: accept it (strict mode refuses floats for ints)."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else v


Int = Annotated[int, BeforeValidator(_integral)]


def IntRange(lo: int, hi: int):  # noqa: N802 - a type
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(_integral)]


def _ipv4(v: str) -> str:
    ipaddress.IPv4Address(v)  # ValueError: 999.1.1.1, 01.2.3.4
    return v


# Every string that may reach a path, a cgroup, a libvirt name, a URI or a command is one of
# these types, in the public models and in the peer models alike: a field cannot be added
# without its pattern (tests/unit/test_peer_models.py checks every peer-facing string).
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="an instance name: a hostname label")]
Capability = Literal[tuple([*ALL_CAPABILITIES, "ALL"])]
InstanceId = Annotated[str, Field(pattern=INSTANCE_ID_PATTERN)]
ImageId = Annotated[str, Field(pattern=SHA256_PATTERN, description="an image id: its sha256 digest, hex")]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]
Digest = Annotated[str, Field(pattern=DIGEST_PATTERN)]
ImageName = Ref  # reachable by URL afterwards: no "/", no ".."
PoolName = Annotated[str, Field(min_length=1, max_length=64, pattern=POOL_NAME_PATTERN)]
VolumeName = Annotated[str, Field(min_length=1, max_length=128, pattern=VOLUME_NAME_PATTERN)]
Mac = Annotated[str, Field(pattern=MAC_PATTERN)]
IPv4 = Annotated[str, Field(pattern=IPV4_PATTERN), AfterValidator(_ipv4)]
HostPath = Annotated[str, Field(pattern=HOST_PATH_PATTERN)]
RelPath = Annotated[str, Field(pattern=REL_PATH_PATTERN)]
DiskTarget = Annotated[str, Field(pattern=DISK_TARGET_PATTERN)]


def check(type_, value, what: str):
    """``value`` as ``type_`` (one of the types above), or InvalidInput naming ``what``: for
    values that arrive outside a model (a path segment)."""
    from agent.errors import InvalidInput
    try:
        return TypeAdapter(type_).validate_python(value, strict=True)
    except ValidationError as e:
        raise InvalidInput(f"{what} {str(value)[:80]!r} is malformed: "
                           f"{e.errors(include_url=False)[0]['msg']}") from None


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,  # no "1" -> 1 or 0 -> False coercion
                              defer_build=True)  # validators built at first use: the agent starts sooner


# -- common --

class ErrorDetail(Model):
    code: str
    message: str
    details: dict[str, Any] | None = None


class Error(Model):
    error: ErrorDetail


class Health(Model):
    status: Literal["ok"]
    # present (true) after a restart until every instance is re-adopted: reads show the last
    # known state meanwhile and changes wait for it
    adopting: bool | None = None


class Deleted(Model):
    deleted: bool


# -- operations --

class EvacuationItem(Model):
    instance: str
    name: str
    kind: str
    status: Literal["pending", "migrating", "done", "failed"]
    destination: str | None = None
    mode: str | None = None
    migration: str | None = Field(None, description="the migration's operation id")
    error: str | None = Field(None, description="why it stayed here")


class Progress(Model):
    phase: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    # live VM migrations (phase precopy | postcopy): the last sample of the copy
    remaining_bytes: int | None = None
    dirty_rate: int | None = None  # pages/s the guest dirties
    iterations: int | None = None  # memory passes so far
    throttle_pct: int | None = None  # auto-converge's vCPU throttle
    # host evacuations: each instance's status (EvacuationItem)
    instances: list[EvacuationItem] | None = None


class Operation(Model):
    id: str
    kind: str
    target: str | None = None
    status: Literal["pending", "running", "succeeded", "failed", "cancelled"]
    progress: Progress
    result: dict[str, Any] | None = None
    error: ErrorDetail | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    request_id: str | None = None  # the X-Request-Id of the request that made it


class OperationList(Model):
    operations: list[Operation]


# -- host and pools --

class PoolUsage(Model):
    capacity: int
    used: int
    available: int


class Pool(Model):
    name: str
    kind: str
    default: bool
    supports_volumes: bool
    usage: PoolUsage | None = None
    error: str | None = None


class PoolList(Model):
    pools: list[Pool]


class Host(Model):
    hostname: str
    hypervisor: Literal["kvm", "qemu", "none"]
    hypervisor_driver: str
    container_runtime: str
    container_idmap: dict[str, int] | None = Field(
        None, description="{host_id, size}: the host ids containers' user namespaces map 0.. to")
    migration_tls: bool = Field(False, description="VM migrations to and from peers over TLS ([migration] tls; "
                                "README \"Migration transport security\")")
    cpu_model: str = Field("host-model", description="the guests' CPU model here ([hypervisor] cpu_model): "
                           "host-model or the named baseline of its host group (README \"CPU model\")")
    cpu_group: str | None = Field(None, description="its host group ([hypervisor] cpu_group): hosts of one group "
                                  "define VMs with the same named CPU model")
    cpus: int
    memory_bytes: int
    pools: list[Pool]
    capacity: dict[str, int]
    versions: dict[str, str]
    draining: bool = Field(False, description="host maintenance: it takes no new instances or incoming migrations "
                           "(POST /v1/host/evacuate; POST /v1/host/restore ends it)")
    draining_since: float | None = None


MAX_CPU_XML = 64 * 1024  # a <cpu> element with every feature libvirt knows is a few KiB
# libvirt <cpu> XML from a peer: one element, no DOCTYPE, entity, CDATA or comment ("!" never occurs in it)
CpuXml = Annotated[str, Field(min_length=5, max_length=MAX_CPU_XML, pattern=r"^<cpu[\s/>][^!\x00]*$")]


class EvacuateRequest(Model):
    """Drain this host: every instance (or those named) moves to peers, ``parallel`` at a time."""
    peers: list[Ref] | None = Field(None, min_length=1, max_length=64, description=(
        "configured peers to move instances to (default: all); each instance goes to the one with the most "
        "free memory that can take it"))
    parallel: IntRange(1, 16) = Field(2, description="migrations at a time")
    instances: list[Ref] | None = Field(None, min_length=1, max_length=4096,
                                        description="names or ids (default: every instance of this host)")


class Draining(Model):
    draining: bool


class PeerHost(Model):
    """What a peer agent answers at GET /v1/peer/host: whether it takes instances, its free capacity."""
    hostname: str = Field(max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    draining: bool
    capacity: dict[Annotated[str, Field(pattern=r"^[a-z_]{1,64}$")], Annotated[int, Field(ge=0)]] = \
        Field(max_length=32)
    host_cpu: CpuXml | None = Field(
        None, description="its host CPU (<cpu> of libvirt's capabilities) under KVM: a source checks a live "
                          "migration's guest CPU against it; None under TCG")
    cpu_model: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                                  description="the CPU model its guests get (host-model or its group's named one)")
    cpu_group: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# -- images --

class FileSource(Model):
    type: Literal["file"]
    path: HostPath = Field(min_length=2, max_length=4096,
                           description="absolute path on the agent's host, under one of its [images] import_dirs")


class UrlSource(Model):
    type: Literal["url"]
    url: str = Field(pattern=r"^https?://[^\x00-\x20\x7f]+$", max_length=4096)
    sha256: Sha256 | None = None


class RegistrySource(Model):
    type: Literal["registry"]
    reference: str = Field(min_length=1, max_length=512, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$",
                           description="e.g. registry.example:5000/alpine:3.19")
    tls_verify: bool = True


class S3Source(Model):
    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["digest"]}, {"required": ["key"]}],
        "dependentRequired": {"sha256": ["key"]}})

    type: Literal["s3"]
    pool: PoolName = Field(description="an object pool of this agent (S3 bucket) holding the image")
    digest: str = Field(None, pattern=r"^sha256:[0-9a-f]{64}$",
                        description="the image's digest (of its disk blob or OCI manifest), as "
                                    "another host that put it into the pool reports it")
    key: str = Field(None, min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f]+$",
                     description="or: the key of an object some other tool put in the bucket "
                                 "(a qcow2/raw disk, or with format oci an OCI archive)")
    sha256: str = Field(None, pattern=r"^[0-9a-f]{64}$",
                        description="with key: the object's expected sha256, checked before "
                                    "anything is stored")

    @model_validator(mode="after")
    def _one_name(self):
        if (self.digest is None) == (self.key is None):
            raise ValueError("give exactly one of digest (an image in the pool's layout) or key "
                             "(any object of the bucket)")
        if self.sha256 is not None and self.key is None:
            raise ValueError("sha256 goes with key: a digest names its content already")
        return self


ImageSource = Annotated[Union[FileSource, UrlSource, RegistrySource, S3Source],
                        Field(discriminator="type")]


class ImageImport(Model):
    name: ImageName
    source: ImageSource
    format: Literal["qcow2", "raw", "oci"] | None = Field(
        None, description="what the source holds; by default detected from its content: a "
                          "directory or a tar archive (plain, gzip, bzip2, xz; zstd is refused: "
                          "decompress it) is a container image (an OCI layout or a `docker "
                          "save`), anything else a disk image whose format qemu-img reads "
                          "(qcow2 or raw). An archive is never a VM disk: qcow2/raw given for a "
                          "tar or compressed file is refused, and so is oci for a file that is "
                          "not a tar. Given, it must match the content")
    pool: PoolName | None = Field(None, description="where to store the image (default: the default pool; "
                                                  "for an s3 source by digest: source.pool, nothing is copied)")


class Image(Model):
    id: str
    name: str
    kind: Literal["vm", "container"]
    format: str
    digest: str
    size: int
    virtual_size: int | None = None
    pool: str
    created_at: float
    config: dict[str, Any]
    layers: list[str]


class ImageList(Model):
    images: list[Image]


# -- security groups --

SecurityGroupName = Annotated[str, Field(pattern=NAME_PATTERN, description="a security group's name: a hostname label")]
MAX_GROUPS_PER_INSTANCE = 16
MAX_RULES = 256  # per group; a rule is one nft rule in each member's chain


def _cidr4(v: str) -> str:
    net = ipaddress.IPv4Network(v, strict=False)  # ValueError: not an IPv4 network
    return str(net)


CIDR4_PATTERN = rf"^({IPV4_OCTET}\.){{3}}{IPV4_OCTET}(/([0-9]|[12][0-9]|3[0-2]))?$"
Cidr4 = Annotated[str, Field(max_length=18, pattern=CIDR4_PATTERN,
                             description="an IPv4 network (10.0.0.0/8) or address"), AfterValidator(_cidr4)]


class SecurityGroupRule(Model):
    """Allows traffic: ``ingress`` to a member, ``egress`` from it. The other end is
    ``remote_cidr``, the members of ``remote_group``, or (neither) anywhere. A member's egress
    is open until one of its groups has an egress rule; then only what the rules allow leaves."""
    direction: Literal["ingress", "egress"]
    protocol: Literal["tcp", "udp", "icmp", "any"] = "any"
    port_min: IntRange(1, 65535) | None = Field(None, description="tcp/udp: first destination port")
    port_max: IntRange(1, 65535) | None = Field(None, description="tcp/udp: the other end of the destination "
                                                                 "port range (default port_min)")
    remote_cidr: Cidr4 | None = None
    remote_group: SecurityGroupName | None = None

    # the rules of _consistent, for the spec (a schema-valid body is accepted)
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"not": {"properties": {"protocol": {"enum": ["tcp", "udp"]}}, "required": ["protocol"]}},
         "then": {"properties": {"port_min": {"type": "null"}, "port_max": {"type": "null"}}}},
        {"if": {"properties": {"port_max": {"type": "integer"}}, "required": ["port_max"]},
         "then": {"properties": {"port_min": {"type": "integer"}}, "required": ["port_min"]}},
        {"not": {"properties": {"remote_cidr": {"type": "string"}, "remote_group": {"type": "string"}},
                 "required": ["remote_cidr", "remote_group"]}},
    ]})

    @model_validator(mode="after")
    def _consistent(self):
        if (self.port_min is not None or self.port_max is not None) and self.protocol not in ("tcp", "udp"):
            raise ValueError("port_min/port_max are for protocol tcp or udp")
        if self.port_max is not None and self.port_min is None:
            raise ValueError("port_max needs port_min")
        if self.port_max is not None and self.port_max < self.port_min:  # the range between them
            self.port_min, self.port_max = self.port_max, self.port_min
        if self.remote_cidr is not None and self.remote_group is not None:
            raise ValueError("give remote_cidr or remote_group, not both")
        return self


class SecurityGroupRules(Model):
    rules: list[SecurityGroupRule] = Field(default_factory=list, max_length=MAX_RULES)


class SecurityGroupCreate(SecurityGroupRules):
    name: SecurityGroupName
    description: Line(256, 0) = ""


class SecurityGroup(Model):
    name: str
    description: str
    rules: list[SecurityGroupRule]
    instances: list[str] = Field(description="names of the instances in the group")
    created_at: float
    updated_at: float


class SecurityGroupList(Model):
    security_groups: list[SecurityGroup]


class InstanceSecurityGroups(Model):
    security_groups: list[SecurityGroupName] = Field(
        min_length=1, max_length=MAX_GROUPS_PER_INSTANCE, json_schema_extra={"uniqueItems": True})

    @model_validator(mode="after")
    def _unique(self):
        if len(set(self.security_groups)) != len(self.security_groups):
            raise ValueError("security_groups lists a group twice")
        return self


# -- instances --

class PortSpec(Model):
    host_port: Int = Field(ge=1, le=65535)
    container_port: Int = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"
    host_ip: IPv4 = "127.0.0.1"


class BandwidthSpec(Model):
    """Network rate limits of an instance's bridge port (a container's veth, a VM's tap), in
    kbit/s (1000 bits per second); null or absent: unlimited in that direction."""

    ingress_kbit: IntRange(net_limits.MIN_RATE_KBIT, net_limits.MAX_RATE_KBIT) | None = Field(
        None, description="traffic to the instance")
    egress_kbit: IntRange(net_limits.MIN_RATE_KBIT, net_limits.MAX_RATE_KBIT) | None = Field(
        None, description="traffic from the instance")
    burst_kbit: IntRange(net_limits.MIN_BURST_KBIT, net_limits.MAX_BURST_KBIT) | None = Field(
        None, description="what may pass at line rate after a quiet spell (default: 50 ms at the "
                          f"rate, at least {net_limits.DEFAULT_BURST_MIN_KBIT}); a bucket holds at most "
                          f"{net_limits.BURST_SECONDS_MAX} s of traffic at its rate (more is cut to that); "
                          "needs ingress_kbit or egress_kbit")

    # burst_kbit needs a rate: said in the spec too, so a schema-valid body is accepted
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"burst_kbit": {"type": "integer"}}, "required": ["burst_kbit"]},
        "then": {"anyOf": [{"properties": {"ingress_kbit": {"type": "integer"}}, "required": ["ingress_kbit"]},
                           {"properties": {"egress_kbit": {"type": "integer"}}, "required": ["egress_kbit"]}]}})

    @model_validator(mode="after")
    def _burst_fits(self):
        from agent.errors import InvalidInput
        try:
            self.limits().check()
        except InvalidInput as e:
            raise ValueError(e.message) from None
        return self

    def limits(self) -> net_limits.Bandwidth:
        return net_limits.Bandwidth(self.ingress_kbit, self.egress_kbit, self.burst_kbit)


def _keys_by_pattern(schema: dict) -> None:
    """pydantic writes a dict's key pattern as patternProperties, which lets keys that do not
    match through with any value: say it as propertyNames, so the spec is what is accepted."""
    for pattern, value in schema.pop("patternProperties", {}).items():
        schema["propertyNames"] = {**schema.get("propertyNames", {}), "pattern": pattern}
        schema["additionalProperties"] = value


# -- volumes (POST/GET /v1/volumes, GET/PATCH/DELETE /v1/volumes/{id}, /v1/instances/{id}/volumes) --

VolumeRef = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63,
                                 description="a volume's name (a hostname label) or id")]
MAX_VOLUMES_PER_INSTANCE = 16
MAX_VOLUME_MIB = 64 * 1024 * 1024  # 64 TiB
MIN_VOLUME_MIB = 8  # room for an ext4 filesystem and its journal
VDISK_TARGET_PATTERN = r"^vd[b-y]$"  # vda is the root disk, vdz the NoCloud seed
MountPath = Annotated[str, Field(min_length=2, max_length=4096, pattern=r"^/[^\x00-\x1f\x7f]*$",
                                 description="an absolute, normalised path inside the container")]


def _mount_path(v: str) -> str:
    try:
        container_limits.check_volume_path(v)
    except Exception as e:  # agent.errors.InvalidInput: its message says why
        raise ValueError(getattr(e, "message", str(e))) from None
    return v


# exactly one of the two sizes, given as a number (null is not a size)
ONE_SIZE = {"oneOf": [{"required": [k], "properties": {k: {"type": "integer"}}} for k in ("size_gib", "size_mib")]}


class VolumeMountSpec(Model):
    """A volume an instance is created with: a container mounts it at ``path`` (required); a VM
    gets it as a disk at ``target`` (default: the first free of vdb..vdy)."""

    volume: VolumeRef
    path: Annotated[MountPath, AfterValidator(_mount_path)] | None = Field(None, description="containers")
    target: Annotated[str, Field(pattern=VDISK_TARGET_PATTERN)] | None = Field(None, description="VMs")
    readonly: bool = False


class VolumeCreate(Model):
    """A new, empty volume: exactly one of size_gib and size_mib. On a local pool it is a
    sparse raw file holding an empty ext4 filesystem (a VM sees a disk with it; a container
    mounts it); on a block (Ceph RBD) pool, an empty raw RBD image (VMs only here)."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63, description="a hostname label")]
    size_gib: IntRange(1, MAX_VOLUME_MIB // 1024) | None = None
    size_mib: IntRange(MIN_VOLUME_MIB, MAX_VOLUME_MIB) | None = None
    pool: PoolName | None = Field(None, description="a local or block pool (default: the default pool)")

    model_config = ConfigDict(json_schema_extra=ONE_SIZE)

    @model_validator(mode="after")
    def _one_size(self):
        if (self.size_gib is None) == (self.size_mib is None):
            raise ValueError("give exactly one of size_gib and size_mib")
        if len(self.name) == 32 and all(c in "0123456789abcdef" for c in self.name):
            raise ValueError("name: 32 hex digits look like a volume id: pick another name")
        return self

    @property
    def size_bytes(self) -> int:
        return (self.size_gib * 1024 if self.size_gib is not None else self.size_mib) * 1024 * 1024


class VolumeUpdate(Model):
    """Grow a volume (never shrink): exactly one of size_gib and size_mib, at least its size
    now. Online for a running VM's disk (the guest sees the new size at once); a container's
    mounted filesystem grows with it."""

    size_gib: IntRange(1, MAX_VOLUME_MIB // 1024) | None = None
    size_mib: IntRange(MIN_VOLUME_MIB, MAX_VOLUME_MIB) | None = None

    model_config = ConfigDict(json_schema_extra=ONE_SIZE)

    @model_validator(mode="after")
    def _one_size(self):
        if (self.size_gib is None) == (self.size_mib is None):
            raise ValueError("give exactly one of size_gib and size_mib")
        return self

    @property
    def size_bytes(self) -> int:
        return (self.size_gib * 1024 if self.size_gib is not None else self.size_mib) * 1024 * 1024


class VolumeAttachment(Model):
    instance: str = Field(description="the instance's id")
    instance_name: str
    target: str | None = Field(None, description="VMs: the disk's name in the guest (vdb..vdy)")
    path: str | None = Field(None, description="containers: where it is mounted")
    readonly: bool = False


class Volume(Model):
    id: str
    name: str
    pool: str
    size_bytes: int
    format: str
    state: Literal["available", "attached"]
    attachment: VolumeAttachment | None = None
    created_at: float
    updated_at: float


class VolumeList(Model):
    volumes: list[Volume]


class VolumeAttach(Model):
    """Attach a volume: to a VM (running: hot-plugged, the guest sees a new disk; stopped: in
    its definition), or to a stopped container (mounted at ``path`` from its next start)."""

    volume: VolumeRef
    target: Annotated[str, Field(pattern=VDISK_TARGET_PATTERN)] | None = Field(
        None, description="VMs: vdb..vdy (default: the first free one)")
    path: Annotated[MountPath, AfterValidator(_mount_path)] | None = Field(
        None, description="containers: where to mount it (required for them)")
    readonly: bool = False


class InstanceVolumes(Model):
    volumes: list[Volume]


# -- NBD exports (POST/GET /v1/exports, GET/DELETE /v1/exports/{name}) --

EXPORT_NAME_PATTERN = POOL_NAME_PATTERN  # it becomes a file name and the NBD export's name
ExportName = Annotated[str, Field(pattern=EXPORT_NAME_PATTERN, max_length=63,
                                  description="letters and digits joined by single '_', '.' or '-'")]


class ExportCreate(Model):
    """Export a volume (read-write or read-only) or a VM image (read-only) over NBD."""

    volume: VolumeRef | None = Field(None, description="a volume's name or id")
    image: Ref | None = Field(None, description="a VM image's name or id (read-only exports only)")
    readonly: bool = False
    name: ExportName | None = Field(None, description="the export's name (default: the volume's name, "
                                                      "or image-<id12>)")

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["volume"], "properties": {"volume": {"type": "string"}, "image": {"type": "null"}}},
        {"required": ["image", "readonly"], "properties": {"image": {"type": "string"}, "readonly": {"const": True},
                                                           "volume": {"type": "null"}}},
    ]})

    @model_validator(mode="after")
    def _one_source(self):
        if (self.volume is None) == (self.image is None):
            raise ValueError("give exactly one of volume and image")
        if self.image is not None and not self.readonly:
            raise ValueError("an image is exported read-only only: send \"readonly\": true")
        return self


class ExportPsk(Model):
    identity: str = Field(description="the PSK username (the export's name)")
    key: str = Field(description="the key, hex: written as IDENTITY:KEY in a keys.psk file for QEMU's "
                                 "tls-creds-psk; shown only in the answer to the create")


class Export(Model):
    name: str
    uri: str = Field(description="nbd://host:port/name")
    host: str
    port: int
    readonly: bool
    tls: Literal["psk", "x509", "none"]
    volume: str | None = Field(None, description="the exported volume's id")
    image: str | None = Field(None, description="the exported image's id")
    format: Literal["raw"] = Field(description="what a client opens the export as: the disk's contents (a qcow2 "
                                               "volume or image is served decoded)")
    created_at: float


class ExportCreated(Export):
    psk: ExportPsk | None = Field(None, description="tls psk: the export's key, handed out once")


class ExportList(Model):
    exports: list[Export]


class InstanceCreate(Model):
    """Fields a kind does not use are refused, never ignored; cpus and memory_mib are checked
    against the kind's driver limits here, so a create is refused at once (422) instead of
    failing (or being silently rounded) in its operation."""

    name: Name
    kind: Literal["vm", "container"]
    image: Ref = Field(description="image name or id")
    cpus: float = Field(1, gt=0, le=MAX_CPUS,
                        description=f"VMs: whole vCPUs 1..{vm_limits.MAX_VCPUS}; containers: "
                                    f"{container_limits.MIN_CPUS}..{container_limits.MAX_CPUS} "
                                    "(a CFS quota, e.g. 0.5 for half a core)")
    memory_mib: Int = Field(256, ge=min(vm_limits.MIN_MEMORY_MIB, container_limits.MIN_MEMORY_MIB),
                            le=MAX_MEMORY_MIB)
    disk_gib: IntRange(1, 65536) | None = Field(
        None, description="VMs: grow the root disk to this; containers: the most their writes to the rootfs "
                          "may take (ENOSPC beyond)")
    pids_max: IntRange(1, container_limits.MAX_PIDS) | None = Field(None, description="containers")
    pool: PoolName | None = None
    network: Literal["bridge", "none", "host"] = Field("bridge", description="host: containers only")
    ports: list[PortSpec] = Field(default_factory=list, max_length=64, description="containers",
                                  json_schema_extra={"uniqueItems": True})
    env: dict[EnvKey, Arg] = Field(default_factory=dict, max_length=256, description="containers",
                                   json_schema_extra=_keys_by_pattern)
    command: list[Arg] | None = Field(None, min_length=1, max_length=256, description="containers",
                                      json_schema_extra={"prefixItems": [{"type": "string", "minLength": 1}]})
    user_data: Annotated[str, Field(max_length=MAX_USER_DATA, pattern=NO_NUL)] | None = Field(
        None, description="VMs: cloud-init user-data")
    bandwidth: BandwidthSpec | None = Field(None, description="network rate limits (network bridge only); "
                                                            "changeable later with PATCH")
    cap_add: list[Capability] = Field(
        default_factory=list, max_length=len(ALL_CAPABILITIES) + 1, json_schema_extra={"uniqueItems": True},
        description="containers: capabilities on top of the default set (Docker's 14), e.g. CAP_NET_ADMIN; "
                    "ALL for every one. Without a user namespace CAP_SYS_ADMIN and friends make the "
                    "container's root nearly the host's: grant them only to trusted workloads")
    cap_drop: list[Capability] = Field(
        default_factory=list, max_length=len(ALL_CAPABILITIES) + 1, json_schema_extra={"uniqueItems": True},
        description="containers: capabilities taken from the default set (ALL: every one; cap_add then "
                    "adds back)")
    privileged: bool = Field(False, description="containers, admin tokens only: run without a user "
                                                "namespace (container root is host root)")
    tty: bool = Field(False, description="containers: run the process on a terminal (Docker's and Podman's "
                                         "`-it`): GET /v1/instances/{id}/console attaches to it (admins "
                                         "type, readers watch); its input is that console's, its output "
                                         "also goes to the logs. A VM's console is its serial line")
    start: bool = True
    max_cpus: IntRange(1, vm_limits.MAX_VCPUS) | None = Field(
        None, description="VMs: the most vCPUs a live resize (PATCH cpus) may give it (default: cpus)")
    max_memory_mib: Int | None = Field(
        None, ge=vm_limits.MIN_MEMORY_MIB, le=MAX_MEMORY_MIB,
        description="VMs: the most memory a live resize (PATCH memory_mib) may give it, through the "
                    "balloon (default: memory_mib)")
    autostart: bool = Field(True, description="start it again when the agent starts after a host reboot, "
                                              "if it was running when the host went down")
    security_groups: list[SecurityGroupName] | None = Field(
        None, min_length=1, max_length=MAX_GROUPS_PER_INSTANCE, json_schema_extra={"uniqueItems": True},
        description='network "bridge": the groups filtering its traffic (default ["default"])')
    volumes: list[VolumeMountSpec] = Field(
        default_factory=list, max_length=MAX_VOLUMES_PER_INSTANCE,
        description="volumes (POST /v1/volumes) the instance is made with: a container mounts each at its "
                    "path (local pools); a VM gets each as a disk (target, default the first free)")

    # the kind-dependent rules of _fits_kind, for the spec (a schema-valid body is accepted)
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"kind": {"const": "vm"}}, "required": ["kind"]},
         "then": {"properties": {
             "cpus": {"multipleOf": 1, "minimum": 1, "maximum": vm_limits.MAX_VCPUS},
             "memory_mib": {"minimum": vm_limits.MIN_MEMORY_MIB},
             "network": {"enum": ["bridge", "none"]}, "ports": {"maxItems": 0},
             "env": {"maxProperties": 0}, "command": {"type": "null"}, "pids_max": {"type": "null"},
             "cap_add": {"maxItems": 0}, "cap_drop": {"maxItems": 0},
             "privileged": {"const": False}, "tty": {"const": False},
             "volumes": {"items": {"properties": {"path": {"type": "null"}}}}}}},
        {"if": {"properties": {"kind": {"const": "container"}}, "required": ["kind"]},
         "then": {"properties": {
             "cpus": {"minimum": container_limits.MIN_CPUS, "maximum": container_limits.MAX_CPUS},
             "memory_mib": {"minimum": container_limits.MIN_MEMORY_MIB},
             "user_data": {"type": "null"}, "max_cpus": {"type": "null"},
             "max_memory_mib": {"type": "null"},
             "volumes": {"items": {"required": ["path"], "properties": {
                 "path": {"type": "string"}, "target": {"type": "null"}}}}}}},
        {"if": {"properties": {"network": {"enum": ["none", "host"]}}, "required": ["network"]},
         "then": {"properties": {"ports": {"maxItems": 0}, "bandwidth": {"type": "null"}}}},
    ]})

    @model_validator(mode="after")
    def _fits_kind(self):
        if not math.isfinite(self.cpus):
            raise ValueError("cpus must be a finite number")
        if self.security_groups is not None and len(set(self.security_groups)) != len(self.security_groups):
            raise ValueError("security_groups lists a group twice")
        if self.security_groups is not None and self.network != "bridge":
            raise ValueError(f"security_groups filter the bridge: network {self.network!r} has none")
        if self.kind == "vm":
            self._vm_checks()
        else:
            self._container_checks()
        return self

    def _vm_checks(self) -> None:
        unused = [f for f in ("ports", "env", "command", "pids_max", "cap_add", "cap_drop", "privileged", "tty")
                  if getattr(self, f)]
        if unused:
            raise ValueError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} for containers: a VM "
                             "takes user_data (and its console is its serial line)")
        if self.network == "host":
            raise ValueError("network 'host' is for containers: a VM takes 'bridge' or 'none'")
        if self.bandwidth is not None and self.network != "bridge":
            raise ValueError("bandwidth limits apply to the bridge port: network 'none' has none")
        if any(v.path is not None for v in self.volumes):
            raise ValueError("volumes: path is for containers: a VM gets each volume as a disk (target)")
        if self.cpus != int(self.cpus) or not 1 <= self.cpus <= vm_limits.MAX_VCPUS:
            raise ValueError(f"cpus of a VM are whole vCPUs 1..{vm_limits.MAX_VCPUS}, got {self.cpus}")
        if self.memory_mib < vm_limits.MIN_MEMORY_MIB:
            raise ValueError(f"memory_mib of a VM must be at least {vm_limits.MIN_MEMORY_MIB}")
        if self.max_cpus is not None and self.max_cpus < self.cpus:
            raise ValueError(f"max_cpus ({self.max_cpus}) is below cpus ({int(self.cpus)})")
        if self.max_memory_mib is not None and self.max_memory_mib < self.memory_mib:
            raise ValueError(f"max_memory_mib ({self.max_memory_mib}) is below memory_mib ({self.memory_mib})")

    def _container_checks(self) -> None:
        unused = [f for f in ("user_data", "max_cpus", "max_memory_mib") if getattr(self, f) is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} for VMs: a container "
                             "takes env and command, and resizes up to the host's capacity")
        lo, hi = container_limits.MIN_CPUS, container_limits.MAX_CPUS
        if not lo <= self.cpus <= hi:
            raise ValueError(f"cpus of a container must be {lo}..{hi} (the kernel's smallest CFS "
                             f"quota is {lo} of a core), got {self.cpus}")
        if self.memory_mib < container_limits.MIN_MEMORY_MIB:
            raise ValueError(f"memory_mib of a container must be at least {container_limits.MIN_MEMORY_MIB}")
        if self.command is not None and not self.command[0]:
            raise ValueError("command[0] is empty: give the program to run")
        if self.ports and self.network != "bridge":
            raise ValueError(f"ports are published on the bridge: network {self.network!r} has none")
        if self.bandwidth is not None and self.network != "bridge":
            raise ValueError(f"bandwidth limits apply to the bridge port: network {self.network!r} has none")
        if any(v.target is not None for v in self.volumes):
            raise ValueError("volumes: target is for VMs: a container mounts each volume at its path")
        if any(v.path is None for v in self.volumes):
            raise ValueError("volumes: a container's volume needs a path to be mounted at (e.g. /data)")
        for what in ("cap_add", "cap_drop"):
            caps = getattr(self, what)
            if len(set(caps)) != len(caps):
                raise ValueError(f"{what} names a capability twice")
        seen = set()
        for p in self.ports:
            key = (p.host_ip, p.host_port, p.protocol)
            if key in seen:
                raise ValueError(f"port {p.host_ip}:{p.host_port}/{p.protocol} is published twice")
            seen.add(key)


class Instance(Model):
    id: str
    name: str
    kind: Literal["vm", "container"]
    image: str
    state: str
    pool: str
    cpus: float
    memory_mib: int
    volumes: list[str]
    ip: str | None = None
    mac: str | None = None
    node: str | None = None
    error: str | None = None
    bandwidth: BandwidthSpec | None = None
    max_cpus: int | None = Field(None, description="VMs: the most vCPUs a resize may give it")
    max_memory_mib: int | None = Field(None, description="VMs: the most memory a resize may give it")
    autostart: bool = True
    tty: bool = Field(False, description="containers: created with a terminal (GET .../console attaches to it)")
    created_at: float
    updated_at: float


class InstanceUpdate(Model):
    """A partial update of an instance: only the fields given change, live where the
    instance runs. ``bandwidth``: the whole object is replaced (fields left out or null
    become unlimited; ``{}`` or null removes every limit). ``cpus`` and ``memory_mib``: a
    resize, live if it runs (containers: cgroups, up to the host's capacity; VMs: vCPU
    hot-plug and the balloon, up to the max_cpus/max_memory_mib set at create), else kept
    for its next start. ``autostart``: see InstanceCreate."""

    bandwidth: BandwidthSpec | None = Field(None, description="network rate limits (network bridge only)")
    cpus: float = Field(None, gt=0, le=MAX_CPUS,
                        description="VMs: whole vCPUs up to max_cpus (a running VM only gains "
                                    "vCPUs: fewer is 409 until it is stopped); containers: a CFS quota "
                                    f"{container_limits.MIN_CPUS}.. the host's cpus")
    memory_mib: Int = Field(None, ge=min(vm_limits.MIN_MEMORY_MIB, container_limits.MIN_MEMORY_MIB),
                            le=MAX_MEMORY_MIB,
                            description="VMs: up to max_memory_mib; containers: up to the host's memory")
    autostart: bool = Field(None, description="start it again after a host reboot if it was running")

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    @model_validator(mode="after")
    def _something(self):
        if not self.model_fields_set:
            raise ValueError("nothing to change: give at least one of " + ", ".join(type(self).model_fields))
        if self.cpus is not None and not math.isfinite(self.cpus):
            raise ValueError("cpus must be a finite number")
        return self


class InstanceList(Model):
    instances: list[Instance]


class InstanceAction(Model):
    action: Literal["start", "stop", "restart", "pause", "resume", "kill", "rebuild"]
    force: bool = False
    timeout: float = Field(60, gt=0, le=3600)
    image: Ref | None = Field(None, description="rebuild only: the image (name or id) to rebuild from; "
                                                "default: the instance's own")

    # the rule of _image_for_rebuild, for the spec (a schema-valid body is accepted)
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"image": {"type": "string"}}, "required": ["image"]},
         "then": {"properties": {"action": {"const": "rebuild"}}}},
    ]})

    @model_validator(mode="after")
    def _image_for_rebuild(self):
        if self.image is not None and self.action != "rebuild":
            raise ValueError("image is for action rebuild only")
        return self


class ExecRequest(Model):
    command: list[Arg] = Field(min_length=1, max_length=256,
                               json_schema_extra={"prefixItems": [{"type": "string", "minLength": 1}]})
    timeout: float = Field(60, gt=0, le=3600, description="buffered exec only")
    interactive: bool = Field(False, description="a websocket session (201 with its URL) instead of a "
                                                 "buffered run")
    tty: bool = Field(False, description="interactive: run it on a terminal")
    env: dict[EnvKey, Arg] = Field(default_factory=dict, max_length=256, description="interactive")
    cwd: str | None = Field(None, max_length=4096, pattern=r"^/[^\x00]*$", description="interactive")
    user: str | None = Field(None, pattern=r"^[0-9]{1,10}(:[0-9]{1,10})?$",
                             description="interactive: UID or UID:GID in the container")
    cols: Int = Field(80, ge=1, le=1000)
    rows: Int = Field(24, ge=1, le=1000)

    # _program's rule, for the spec (a schema-valid body is accepted)
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"not": {"properties": {"interactive": {"const": True}}, "required": ["interactive"]}},
         "then": {"properties": {"tty": {"const": False}, "env": {"maxProperties": 0}, "cwd": {"type": "null"},
                                 "user": {"type": "null"}}}}]})

    @model_validator(mode="after")
    def _program(self):
        if not self.command[0]:
            raise ValueError("command[0] is empty: give the program to run")
        given = [f for f in ("tty", "env", "cwd", "user") if getattr(self, f)]
        if given and not self.interactive:
            raise ValueError(f"{', '.join(given)} needs interactive: true (a websocket session)")
        return self


class ExecSession(Model):
    session: str = Field(description="one use, by the same caller, within expires_in seconds")
    websocket: str = Field(description="GET this path as a websocket to start the process")
    expires_in: int


class ExecResult(Model):
    exit_code: int
    stdout: str
    stderr: str
    truncated: bool = Field(False, description="stdout or stderr was longer than the agent keeps "
                                               "([containers] exec_output_bytes each); the rest was dropped")
    timed_out: bool = Field(False, description="the command ran past timeout and was killed "
                                               "(with every process it started)")


# -- snapshots (agent/services/snapshots.py) --

SNAPSHOT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"  # reaches qemu-img, QMP and file names
SnapshotName = Annotated[str, Field(pattern=SNAPSHOT_NAME_PATTERN,
                                    description="1-63 letters, digits, '-', '_', starting with a letter or digit")]


MAX_SNAPSHOTS_PER_INSTANCE = 32  # agent.services.snapshots.MAX_PER_INSTANCE


class SnapshotCreate(Model):
    name: SnapshotName


class Snapshot(Model):
    id: str
    name: SnapshotName
    instance: str
    instance_id: str
    kind: Literal["vm", "container"]
    image: str = Field(description="the image under it (kept while the instance exists)")
    instance_state: str = Field(description="what the instance was doing when it was taken")
    consistency: Literal["stopped", "crash-consistent", "filesystem-consistent", "frozen"] = Field(
        description="stopped: exact; filesystem-consistent: a running VM's disks at one instant, its "
                    "filesystems frozen by its guest agent (QEMU guest agent protocol on the "
                    "org.qemu.guest_agent.0 port) for that instant; crash-consistent: the same without "
                    "a freeze (no agent, or it failed or did not answer in time), as a power cut would "
                    "leave them; frozen: a running container's files, its processes frozen during the copy")
    created_at: float


class SnapshotList(Model):
    snapshots: list[Snapshot]


# -- backups --

BACKUP_ID_PATTERN = INSTANCE_ID_PATTERN  # uuid4().hex
BackupId = Annotated[str, Field(pattern=BACKUP_ID_PATTERN)]


class BackupCreate(Model):
    pool: PoolName | None = Field(None, description="an object (S3) or local pool that keeps backups (default: "
                                                    "the first object pool, else the default pool)")


class BackupRestore(Model):
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63, description="the new instance's name")]
    pool: PoolName | None = Field(None, description="where its disk and volumes go: a local pool, or an RBD "
                                                    "pool for a VM (default: the default pool)")
    start: bool = True


class Backup(Model):
    id: str
    pool: str | None = None
    kind: Literal["vm", "container"]
    instance: str | None = Field(None, description="the instance backed up (it may be gone, or on another host)")
    instance_id: str | None = None
    instance_state: str | None = None
    consistency: str | None = Field(None, description="stopped: exact; crash-consistent: a running VM's disk at "
                                                      "one instant, as a power cut would leave it")
    image: str | None = None
    image_name: str | None = None
    host: str | None = Field(None, description="the host that took it")
    created_at: float | None = None
    uploaded_at: float | None = None
    size: int | None = Field(None, description="the artifact's bytes (GET .../content)")
    sha256: str | None = Field(None, description="the artifact's sha256 (checked on every restore)")
    data_bytes: int | None = None


class BackupList(Model):
    backups: list[Backup]


class Logs(Model):
    logs: str


class Stats(Model):
    cpu_ns: int | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    oom_kills: int | None = None  # containers: OOM kills in the instance's memory cgroup
    io: dict[str, int] = Field(default_factory=dict)  # containers: read_bytes, write_bytes; VMs: rd_bytes, wr_bytes
    net: dict[str, int] = Field(default_factory=dict)  # rx_bytes, tx_bytes, rx_packets, tx_packets


# -- migrations --

MAX_DOWNTIME_MS = 60_000  # a minute of switchover is no longer "live"
MAX_MIGRATION_BANDWIDTH = 1024 * 1024  # MiB/s (1 TiB/s): any real link is below
MAX_COMPLETION_TIMEOUT_S = 7 * 86400


class MigrationCreate(Model):
    """What to move where, and (live VM migrations only) how: each control left out takes the
    host's default policy ([migration] of the agent's config: pre-copy, auto-converge, then
    post-copy after a bound)."""

    instance: Ref = Field(description="instance name or id")
    destination: Ref = Field(description="a configured peer's name ([peers.NAME])")
    mode: Literal["live", "cold", "refresh"] = "live"  # refresh: containers, sync while running, then stop
    max_downtime_ms: IntRange(1, MAX_DOWNTIME_MS) | None = Field(
        None, description="VMs: the longest pause the switchover may take (default [migration] max_downtime_ms)")
    bandwidth_mib_s: IntRange(1, MAX_MIGRATION_BANDWIDTH) | None = Field(
        None, description="VMs: cap on the pre-copy stream, MiB/s (default: unlimited; post-copy is never capped)")
    completion_timeout_s: Annotated[float, Field(gt=0, le=MAX_COMPLETION_TIMEOUT_S, allow_inf_nan=False)] \
        | None = Field(None, description="VMs: seconds the copy may take before timeout_action applies")
    timeout_action: Literal["abort", "pause", "postcopy"] | None = Field(
        None, description="VMs: at completion_timeout_s abort (the guest keeps running here), pause the guest "
                          "(the copy then converges), or switch to post-copy")
    auto_converge: bool | None = Field(
        None, description="VMs: throttle the guest's vCPUs when it dirties memory faster than it is copied")
    postcopy: bool | None = Field(
        None, description="VMs: allow post-copy (the guest runs on the destination and pulls the pages it "
                          "lacks; needs userfaultfd; once it starts the migration can no longer be cancelled). "
                          "Default: the policy's ([migration] postcopy, where the kernel allows it)")

    VM_ONLY: ClassVar[tuple[str, ...]] = ("max_downtime_ms", "bandwidth_mib_s", "completion_timeout_s",
                                          "timeout_action", "auto_converge", "postcopy")

    def controls(self) -> dict:
        """The live-migration controls the caller set (the rest follow the policy)."""
        return {k: getattr(self, k) for k in self.VM_ONLY if getattr(self, k) is not None}

    @model_validator(mode="after")
    def _consistent(self):
        if self.timeout_action == "postcopy" and self.postcopy is False:
            raise ValueError("timeout_action=postcopy switches to post-copy: it cannot go with postcopy=false")
        if self.mode != "live" and (self.postcopy or self.timeout_action == "postcopy"):
            raise ValueError("post-copy moves a running guest: it needs mode=live")
        return self


class MigrationBytes(Model):
    processed: int | None = None
    total: int | None = None
    remaining: int | None = None


class Migration(Model):
    id: str
    operation: str
    instance: str | None = None
    name: str | None = None
    destination: str | None = None
    mode: str | None = None
    status: str
    phase: str | None = None  # prepare, migrate, precopy, postcopy, confirm, cleanup (VMs); see README
    bytes: MigrationBytes
    dirty_rate: int | None = None  # pages/s the guest dirtied at the last sample
    iterations: int | None = None  # memory passes so far (1: the first full copy)
    throttle_pct: int | None = None  # auto-converge's vCPU throttle at the last sample
    postcopy: bool | None = None  # it switched to post-copy (the guest runs on the destination)
    options: dict[str, Any] | None = None  # the live-migration controls in effect (request + policy)
    downtime_ms: float | None = None
    total_ms: float | None = None
    # live VMs: the switchover's pause taken apart (ms; README "Migration controls")
    switchover: dict[str, float | None] | None = None
    error: ErrorDetail | None = None


# peer-to-peer (destination side of a migration; only configured peers may call these).
# A peer is another host, not a friend: every field is typed with the same constrained types
# as the public API, and the answers a destination gives are parsed as strictly by the source.

URI_PATTERN = r"^[a-z][a-z0-9+.-]*:[^\x00-\x20]{1,1024}$"
DISK_SOURCE_PATTERN = r"^(/|rbd:)[^\x00-\x1f]{1,4095}$"  # a host path, or an RBD image
# libvirt's remote transports over the network only: no ext (runs a command), ssh (runs ssh
# with the host as an argument), unix or local URIs, no query (?command=, ?socket=, ?no_verify=)
MIGRATION_URI_PATTERN = (r"^(|qemu\+(tcp|tls)://([A-Za-z0-9]([A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])"
                         r"(:[0-9]{1,5})?/system|fake://[A-Za-z0-9]+([_.-][A-Za-z0-9]+)*)$")
Uri = Annotated[str, Field(pattern=URI_PATTERN)]
DiskSource = Annotated[str, Field(pattern=DISK_SOURCE_PATTERN)]
MigrationUri = Annotated[str, Field(pattern=MIGRATION_URI_PATTERN)]
HostPort = Annotated[str, Field(pattern=r"^([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}$")]
CephUser = Annotated[str, Field(pattern=r"^[A-Za-z0-9]+([_.-][A-Za-z0-9]+)*$", max_length=64)]
Uuid = Annotated[str, Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]


class IncomingInstance(Model):
    id: InstanceId
    name: Name
    kind: Literal["vm", "container"]
    pool: PoolName
    volumes: list[VolumeName] = Field(min_length=1, max_length=8)
    mac: Mac | None = None
    ip: IPv4 | None = None


class IncomingImage(Model):
    id: ImageId
    name: ImageName
    format: Literal["qcow2", "raw", "oci"]
    kind: Literal["vm", "container"]

    @model_validator(mode="after")
    def _format_of_kind(self):
        if (self.kind == "container") != (self.format == "oci"):
            raise ValueError(f"a {self.kind} image cannot be of format {self.format}")
        return self


class InstanceSpec(InstanceCreate):
    """What the source asked for when it created the instance (its record's spec)."""
    image_id: ImageId | None = None


class IdRange(Model):
    """A user namespace's map: container ids 0..size-1 are host ids host_id.."""
    host_id: IntRange(0, 2**32 - 2)
    size: IntRange(1, 2**32 - 1)


class IncomingVolume(Model):
    """A volume attached to a migrating instance (a raw file of a local pool), made on the
    destination with its id, name and size, in the destination's own pool and path. A
    container's (``path``: where it is mounted) is a fresh ext4 filesystem filled from the
    file tree the source sends (PUT /v1/peer/migrations/{id}/volumes/{volume}). A VM's
    (``target``: its disk, vdb..vdy) is an empty raw file of the same size that the
    hypervisor's storage copy (live) or the raw byte stream (stopped VM) fills; ``pool``
    names the pool it lives in (the destination's pool of that name takes it)."""

    id: InstanceId = Field(description="the volume's id (32 hex digits, as this agent makes them)")
    name: VolumeRef
    size_bytes: IntRange(MIN_VOLUME_MIB * 1024 * 1024, MAX_VOLUME_MIB * 1024 * 1024)
    path: Annotated[MountPath, AfterValidator(_mount_path)] | None = None
    target: Annotated[str, Field(pattern=VDISK_TARGET_PATTERN)] | None = None
    pool: PoolName | None = None
    readonly: bool = False
    guest_written: bool = False  # a VM had it writable (a container on the destination must not mount it)
    # a VM's volume on shared storage (a block pool: "rbd:<pool>/<image>" on the source): not
    # copied; the destination's pool of that name must see the very image, which it adopts
    shared_uri: Annotated[str, Field(pattern=r"^rbd:[^\x00-\x1f]{1,4095}$")] | None = None


class IncomingSnapshot(Model):
    """A snapshot a stopped VM's offline move carries (an internal snapshot inside its disk
    layer, which the destination checks the layer it receives holds)."""

    name: SnapshotName
    instance_state: Literal["running", "paused", "stopped", "created"]
    created_at: Annotated[float, Field(ge=0, le=2**40)]


class IncomingMigration(Model):
    instance: IncomingInstance
    spec: InstanceSpec
    image: IncomingImage
    data_bytes: IntRange(0, 2**53) | None = None  # bytes the copy writes there (written disk data, upper dir)
    image_bytes: IntRange(0, 2**53) | None = None  # the image's size: what a destination lacking it stores
    disk_size: IntRange(0, 2**53) | None = None  # bytes
    # shared storage (block pools): volume name -> its uri on the source; the destination
    # adopts these volumes (the same images) instead of making new ones
    shared_volumes: dict[VolumeName, Uri] | None = Field(None, max_length=8)
    # a container's user namespace map on the source (its upper dir's owners are host ids of
    # that map); None: no user namespace there. The destination shifts owners to its own map.
    idmap: IdRange | None = None
    # the instance's security groups as defined on the source: the destination makes the
    # missing ones and refuses a group of the same name defined otherwise
    security_groups: list[SecurityGroupCreate] | None = Field(None, max_length=MAX_GROUPS_PER_INSTANCE)
    # a running KVM guest's CPU (<cpu> XML, host-model expanded): the destination refuses (422)
    # before anything is made if its CPU cannot run it; None under TCG (no check applies)
    guest_cpu: CpuXml | None = None
    # the instance's attached volumes (local raw files; a container's hold ext4): they move with it
    attached_volumes: list[IncomingVolume] | None = Field(None, max_length=MAX_VOLUMES_PER_INSTANCE)
    # a stopped VM's snapshots (internal snapshots of its disk layer): they move with it offline
    snapshots: list[IncomingSnapshot] | None = Field(None, max_length=MAX_SNAPSHOTS_PER_INSTANCE)

    @model_validator(mode="after")
    def _consistent(self):
        inst = self.instance
        if self.attached_volumes:
            where = "path" if inst.kind == "container" else "target"
            for v in self.attached_volumes:
                if getattr(v, where) is None or (v.path if inst.kind == "vm" else v.target) is not None:
                    raise ValueError(f"attached_volumes: a {inst.kind}'s volume has a {where} and only that")
                if inst.kind == "vm" and v.pool is None:
                    raise ValueError("attached_volumes: a VM's volume names its pool")
                if v.shared_uri is not None and inst.kind != "vm":
                    raise ValueError("attached_volumes: shared_uri is for a VM's volumes")
            for key in ("id", "name", where):
                values = [getattr(v, key) for v in self.attached_volumes]
                if len(set(values)) != len(values):
                    raise ValueError(f"attached_volumes: a volume {key} is given twice")
        if self.snapshots:
            if inst.kind != "vm" or self.shared_volumes is not None:
                raise ValueError("snapshots move with a stopped VM on a local pool only")
            names = [s.name for s in self.snapshots]
            if len(set(names)) != len(names):
                raise ValueError("snapshots: a name is given twice")
        if (self.spec.name, self.spec.kind) != (inst.name, inst.kind):
            raise ValueError("spec.name and spec.kind must be the instance's")
        if self.image.kind != inst.kind:
            raise ValueError(f"a {inst.kind} cannot be made from a {self.image.kind} image")
        if self.spec.image_id not in (None, self.image.id):
            raise ValueError("spec.image_id must be the image sent")
        if self.shared_volumes is not None and set(self.shared_volumes) != set(inst.volumes):
            raise ValueError("shared_volumes must name exactly the instance's volumes")
        if self.spec.privileged:
            raise ValueError("spec.privileged: a privileged container (root = host root) does not migrate; a "
                             "peer cannot make one: recreate it on the destination with an admin token")
        if self.idmap is not None and self.idmap.host_id < 65536:
            raise ValueError("idmap: a user namespace map starts at host id 65536 or above")
        return self


class RbdAttach(Model):
    monitors: list[HostPort] | None = Field(None, max_length=16)
    config: HostPath | None = None
    user: CephUser | None = None
    secret_uuid: Uuid | None = None


class IncomingPrepared(Model):
    """The destination's answer: where its disks are and how its hypervisor is reached. The
    source parses it as strictly as any request (a destination is untrusted too)."""
    # root, seed and the attached volumes' disks
    disk_sources: dict[DiskTarget, DiskSource] = Field(max_length=2 + MAX_VOLUMES_PER_INSTANCE)
    disk_attach: dict[DiskTarget, RbdAttach] | None = Field(None, max_length=2 + MAX_VOLUMES_PER_INSTANCE)  # RBD
    console_log: HostPath | None = None
    migration_uri: MigrationUri
    # VMs: whether post-copy can run here (QEMU may use userfaultfd); None: not said (older agent)
    postcopy: bool | None = None


class IncomingFinish(Model):
    resume: bool = True  # VMs: resume a guest the completion timeout paused
    start: bool = True  # containers: start it here (it ran on the source)
    keep: list[RelPath] | None = Field(None, max_length=1_000_000)  # containers: upper-dir paths to keep
    define: bool = False  # VMs moved offline (stopped, disk sent): define the domain here, stopped


class Received(Model):
    bytes: int


class InstanceResult(Model):
    instance: Instance


# -- tokens (admin only: POST/GET /v1/tokens, GET/DELETE /v1/tokens/{name}) --

TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # agent.auth.NAME_PATTERN
MAX_TOKEN_TTL = 10 * 365 * 86400  # seconds (10 years): agent.auth.MAX_TOKEN_LIFETIME


class TokenCreate(Model):
    """A new token. Expiry: ``ttl_s``, seconds from now (the answer's ``expires_at`` says
    when); none: it never expires. A relative expiry keeps every constraint in the schema (an
    absolute time in the past would be valid JSON and still refused); the CLI's
    ``--expires-at`` converts."""

    name: str = Field(pattern=TOKEN_NAME_PATTERN, max_length=64)
    role: Literal["admin", "reader", "peer"]
    ttl_s: float | None = Field(None, ge=60, le=MAX_TOKEN_TTL)


class TokenInfo(Model):
    name: str
    role: Literal["admin", "reader", "peer"]
    id: str  # the token's public half (na_<id>_...): names it in logs, is no secret
    created_at: float
    expires_at: float | None = None
    last_used_at: float | None = None  # kept within a minute (written at most once a minute)
    expired: bool = False


class TokenCreated(TokenInfo):
    token: str  # the secret token, shown only in this answer


class TokenList(Model):
    tokens: list[TokenInfo]
