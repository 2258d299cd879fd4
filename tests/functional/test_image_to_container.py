"""End to end: registry -> OCI layout -> ImageStore -> rootfs -> RuncRuntime."""
from __future__ import annotations

import time

import pytest

from containers import ContainerSpec, NetworkSpec, Rootfs
from storage import ImageStore
from storage.local import LocalBackend
from storage.registry import pull_to_layout
from storage.sources import AddressPolicy
from testbed.runtimes import make_runc

pytestmark = pytest.mark.real


def test_pull_import_prepare_run_delete(busybox_ref, tmp_path, db):
    layout = str(tmp_path / "layout")
    tag = pull_to_layout(busybox_ref, layout, tls_verify=False,
                         policy=AddressPolicy(["127.0.0.1/32"]))  # the test registry is on loopback
    store = ImageStore(db, {"local": LocalBackend("local", path=str(tmp_path / "pool"))},
                       default_pool="local", cache_dir=str(tmp_path / "cache"))
    image = store.import_oci(layout, name="busybox", ref=tag)
    assert image.kind == "container" and image.config["Cmd"] == ["sh"]
    layers = store.prepare_rootfs(image.id, "ctr-vol")
    rt, cleanup = make_runc(tmp_path)
    try:
        spec = ContainerSpec(name="e2e", rootfs=Rootfs(tuple(layers.lowerdirs), layers.upperdir,
                                                       layers.workdir),
                             command=("sh", "-c", "echo $IMAGE > /made; cat /made /www/index.html"),
                             image_config=image.config, network=NetworkSpec())
        rt.create(spec)
        rt.start("e2e")
        deadline = time.monotonic() + 10
        while rt.get("e2e").state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.get("e2e").exit_code == 0
        assert rt.logs("e2e") == "busybox-test\nhello from busybox\n"
        assert rt.delete("e2e")
    finally:
        cleanup()
    # the write went to the container's own upper dir, never into the shared layers
    import os
    assert open(os.path.join(layers.upperdir, "made")).read() == "busybox-test\n"
    assert not any(os.path.exists(os.path.join(d, "made")) for d in layers.lowerdirs)
    assert store.release("local", "ctr-vol")
    assert store.delete(image.id)



@pytest.fixture
def agent(open_tmp):
    """An in-process agent (real runc) with its state under a traversable dir; yields
    (client with an admin token, services root, the dir), deletes its instances after."""
    from agent import config as agent_config
    from agent.app import create_app
    from testbed.runtimes import test_cgroup_parent, test_network

    bridge, subnet, parent = *test_network(), test_cgroup_parent()
    cfg = agent_config.parse({
        "state_dir": str(open_tmp / "state"), "workers": 2, "hypervisor": {"driver": "fake"},
        "containers": {"runtime": "runc", "cgroup_parent": parent},
        "network": {"bridge": bridge, "subnet": subnet},
        "images": {"import_dirs": [str(open_tmp)]},
        "pools": {"default": {"kind": "local", "path": str(open_tmp / "pool")}}})
    app = create_app(cfg)
    root = app.config["SERVICES"]
    root.start()
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {root.tokens.create('admin', 'admin')}"
    try:
        yield client, root, open_tmp
    finally:
        for inst in client.get("/v1/instances").json["instances"]:
            client.delete(f"/v1/instances/{inst['id']}")
        root.runtime.close()
        root.stop()
        from testbed.runtimes import agent_rtag, drop_cgroup_parent, drop_test_network
        drop_test_network(bridge, agent_rtag(open_tmp / "state"))
        drop_cgroup_parent(parent)


def _wait(client, r):
    assert r.status_code == 202, r.json
    return client.get(f"/v1/operations/{r.json['id']}/wait?timeout=60").json


def _import(client, tmp, name, layers, **config):
    from testbed.ocibuild import write_layout
    layout = write_layout(str(tmp / name), {"latest": layers}, **config)
    op = _wait(client, client.post("/v1/images", json={"name": name, "format": "oci",
                                                       "source": {"type": "file", "path": layout}}))
    assert op["status"] == "succeeded", op


def _create(client, name, image, **body):
    op = _wait(client, client.post("/v1/instances", json={"name": name, "kind": "container", "image": image,
                                                          "network": "none", **body}))
    assert op["status"] == "succeeded", op
    return op["result"]["instance"]


def _run(client, name, *argv):
    """exec busybox applet argv[0] (the test images hold /bin/busybox and little else)."""
    argv = argv if argv[0].startswith("/") or argv[0] == "id" else ("/bin/busybox", *argv)
    return client.post(f"/v1/instances/{name}/exec", json={"command": list(argv)}).json


USERS = ("root:x:0:0::/root:/bin/sh\nnginx:x:101:102::/:/bin/sh\n", "root:x:0:\nnginx:x:102:\n")


def test_the_agent_runs_an_image_as_its_user_with_its_entrypoint(agent):
    """Through the agent (in-process app, real runc): USER nginx of the image's /etc/passwd
    is the uid the container runs as; a given command follows the image's Entrypoint and
    the request's env overrides the image's Env by key."""
    from testbed.ocibuild import busybox_layers, users_layer

    client, _, tmp = agent
    layers = busybox_layers() + [users_layer(*USERS)]
    _import(client, tmp, "as-nginx", layers, user="nginx")
    _import(client, tmp, "entry", layers, entrypoint=["/bin/sh", "-c", 'echo "$0 $* $GREETING" > /args; exec "$@"',
                                                      "entry"],
            cmd=["false"], env=("PATH=/bin", "GREETING=image"))
    _create(client, "web", "as-nginx", command=["/bin/busybox", "sleep", "1000"])
    _create(client, "ep", "entry", command=["/bin/busybox", "sleep", "1000"], env={"GREETING": "api"})
    assert _run(client, "web", "id", "-u")["stdout"] == "101\n"
    assert _run(client, "web", "id", "-g")["stdout"] == "102\n"
    out = _run(client, "ep", "/bin/busybox", "cat", "/args")
    assert out["stdout"] == "entry /bin/busybox sleep 1000 api\n", out


def _host_ids(pid: int) -> tuple[list[str], list[str]]:
    with open(f"/proc/{pid}/status") as f:
        lines = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    return lines["Uid"].split(), lines["Gid"].split()


def test_containers_run_unprivileged_by_default(agent):
    """Container root is root inside and an unprivileged uid of the host's range outside; the
    image's files keep their owners as the container sees them (root's and a USER's); what it
    writes is owned on the host by the shifted ids; with its credentials but the host's mount
    namespace (a mount-namespace escape) it can read no root file and mount nothing."""
    import os
    import subprocess

    from testbed.ocibuild import busybox_layers, layer, users_layer

    client, root, tmp = agent
    m = root.runtime.idmap
    assert m.host_id >= 65536
    assert client.get("/v1/host").json["container_idmap"] == {"host_id": m.host_id, "size": m.size}
    owned = layer([("srv/", "dir", None, 0o755), ("srv/root-file", "file", b"r\n", 0o600, 0, 0),
                   ("srv/nginx/", "dir", None, 0o755, 101, 102),
                   ("srv/nginx/own", "file", b"n\n", 0o640, 101, 102)])
    layers = busybox_layers() + [users_layer(*USERS), owned]
    _import(client, tmp, "owned", layers)
    _import(client, tmp, "owned-nginx", layers, user="nginx")
    inst = _create(client, "un", "owned", command=["/bin/busybox", "sleep", "1000"])
    _create(client, "unx", "owned-nginx", command=["/bin/busybox", "sleep", "1000"])

    assert _run(client, "un", "id", "-u")["stdout"] == "0\n"
    assert _run(client, "un", "cat", "/proc/self/uid_map")["stdout"].split() == ["0", str(m.host_id), str(m.size)]
    assert _run(client, "un", "stat", "-c", "%u:%g", "/srv/root-file", "/srv/nginx/own", "/bin/busybox",
                "/")["stdout"].split() == ["0:0", "101:102", "0:0", "0:0"]
    assert _run(client, "un", "cat", "/srv/root-file")["stdout"] == "r\n"  # root's 0600 file: its own
    assert _run(client, "unx", "cat", "/srv/nginx/own")["stdout"] == "n\n"  # USER nginx reads its own
    assert _run(client, "unx", "cat", "/srv/root-file")["exit_code"] != 0  # and not root's

    assert _run(client, "un", "touch", "/made-by-root")["exit_code"] == 0
    assert _run(client, "unx", "touch", "/srv/nginx/made-by-nginx")["exit_code"] == 0
    upper = os.path.join(root.pools["default"].get_volume(f"i-{inst['id'][:12]}-rootfs").path, "upper")
    st = os.stat(os.path.join(upper, "made-by-root"))
    assert (st.st_uid, st.st_gid) == (m.host_id, m.host_id)
    vol_x = root.pools["default"].get_volume(
        f"i-{client.get('/v1/instances/unx').json['id'][:12]}-rootfs").path
    st = os.stat(os.path.join(vol_x, "upper", "srv", "nginx", "made-by-nginx"))
    assert (st.st_uid, st.st_gid) == (m.host_id + 101, m.host_id + 102)
    # the shared layers on disk are untouched: shifted by the (id-mapped) mount only
    for d in spec_lowerdirs(root, "un"):
        assert os.stat(d).st_uid == 0

    pid = root.runtime.get("un").pid
    uids, gids = _host_ids(pid)
    assert uids == [str(m.host_id)] * 4 and gids == [str(m.host_id)] * 4
    # the container's own credentials (root of its user namespace, all its capabilities)
    # in the host's mount namespace: no host root file, no mount, no block device
    escape = ["nsenter", f"--user=/proc/{pid}/ns/user", "--", "/bin/busybox", "sh", "-c"]
    r = subprocess.run(escape + ["id -u; cat /etc/shadow"], capture_output=True, text=True)
    assert r.stdout.startswith("0\n") and r.returncode != 0 and "Permission denied" in r.stderr, r
    r = subprocess.run(escape + ["mount -t tmpfs none /mnt"], capture_output=True, text=True)
    assert r.returncode != 0, r
    dev = subprocess.run(["findmnt", "-no", "SOURCE", "/"], capture_output=True, text=True).stdout.strip()
    if dev.startswith("/dev/"):
        r = subprocess.run(escape + [f"mount -o ro {dev} /mnt"], capture_output=True, text=True)
        assert r.returncode != 0, r


def spec_lowerdirs(root, name):
    import json
    row = root.runtime.db.one("SELECT spec FROM containers WHERE name=?", (name,))
    return json.loads(row["spec"])["rootfs"]["lowerdirs"]


def test_a_privileged_container_is_for_admins_only(agent):
    """privileged: true runs without a user namespace (admin token); a reader's is refused
    (403) and a VM's is invalid (422); neither leaves anything behind."""
    from testbed.ocibuild import busybox_layers

    client, root, tmp = agent
    _import(client, tmp, "plain", busybox_layers())
    reader = root.tokens.create("reader", "reader")
    body = {"name": "priv", "kind": "container", "image": "plain", "network": "none", "privileged": True,
            "command": ["/bin/busybox", "sleep", "1000"]}
    r = client.post("/v1/instances", json=body, headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 403, r.json
    r = client.post("/v1/instances", json={**body, "kind": "vm", "command": None})
    assert r.status_code in (400, 422), r.json
    assert client.get("/v1/instances").json["instances"] == []
    _wait(client, client.post("/v1/instances", json=body))
    assert _run(client, "priv", "cat", "/proc/self/uid_map")["stdout"].split() == ["0", "0", "4294967295"]
    assert root.runtime.get("priv").idmap is None


NET_BIND_SERVICE = 1 << 10  # in every default capability set (runc's, Docker's)


@pytest.mark.parametrize("privileged", [False, True])
def test_file_capabilities_of_an_image_work_for_a_non_root_user(agent, privileged):
    """A binary with cap_net_bind_service+ep in the image's layer (security.capability, v2)
    gives that capability to a process of USER nginx started from it, in a user-namespaced
    container (read through the id-mapped layer as container root's) and a privileged one;
    the same program without the xattr has none."""
    from testbed.ocibuild import BUSYBOX, busybox_layers, layer, users_layer

    client, _, tmp = agent
    with open(BUSYBOX, "rb") as f:
        bb = f.read()
    caps = (0x02000000 | 1).to_bytes(4, "little") + NET_BIND_SERVICE.to_bytes(4, "little") + bytes(12)
    capped = layer([("usr/", "dir", None), ("usr/bin/", "dir", None),
                    ("usr/bin/busybox", "file", bb, 0o755, 0, 0, {"security.capability": caps})])
    name = f"caps-{int(privileged)}"
    _import(client, tmp, name, busybox_layers() + [users_layer(*USERS), capped], user="nginx")
    _create(client, name, name, command=["/bin/busybox", "sleep", "1000"], privileged=privileged)
    assert _run(client, name, "id", "-u")["stdout"] == "101\n"

    def cap_eff(prog):
        out = _run(client, name, prog, "grep", "CapEff", "/proc/self/status")
        assert out["exit_code"] == 0, out
        return int(out["stdout"].split()[1], 16)
    assert cap_eff("/usr/bin/busybox") == NET_BIND_SERVICE
    assert cap_eff("/bin/busybox") == 0
    # and it does what the capability is for: a port below 1024 as nginx
    assert _run(client, name, "/usr/bin/busybox", "httpd", "-p", "80")["exit_code"] == 0
    assert _run(client, name, "/bin/busybox", "httpd", "-p", "81")["exit_code"] != 0


def test_disk_gib_limits_a_containers_rootfs(agent):
    """disk_gib of a container is the size of the filesystem its writes go to (df of / inside)."""
    from testbed.ocibuild import busybox_layers

    client, _, tmp = agent
    _import(client, tmp, "sized", busybox_layers())
    _create(client, "sized", "sized", command=["/bin/busybox", "sleep", "1000"], disk_gib=1)
    out = _run(client, "sized", "df", "-k", "/")
    size_kib = int(out["stdout"].splitlines()[1].split()[1])
    assert 900 * 1024 < size_kib <= 1024 * 1024, out
