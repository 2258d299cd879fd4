"""The ``nodeagent`` command: ``serve`` runs the daemon, ``token`` edits the state DB
directly (no server needed; with ``--remote`` it goes through the API); the other verbs talk to the API (NODEAGENT_URL,
NODEAGENT_TOKEN or the client config file). Read verbs take ``--json``.
"""
from __future__ import annotations

import json as jsonlib
import os
import re
import sys

import click

from agent.errors import AgentError  # agent.config and agent.log are imported where used: the API
# verbs (file push, exec, console) start without pydantic's models (~0.13 s)


@click.group()
@click.option("--config", "config_path", envvar="NODEAGENT_CONFIG", default=None,
              help="agent.toml (default /etc/nodeagent/agent.toml, else embedded defaults)")
@click.pass_context
def main(ctx, config_path):
    """nodeagent: per-host IaaS node agent."""
    ctx.obj = {"config_path": config_path}


def _load(ctx):
    from agent import config as config_mod
    try:
        return config_mod.load(ctx.obj["config_path"])
    except AgentError as e:
        raise click.ClickException(e.message) from None


@main.command()
@click.pass_context
def serve(ctx):
    """Run the agent in the foreground (one process; asyncio HTTP/1.1 in front of the app)."""
    from agent.server import AgentServer, limit_malloc_arenas
    limit_malloc_arenas()  # before any thread exists

    from agent.app import create_app

    from agent import log
    cfg = _load(ctx)
    log.setup(cfg.log_level, cfg.log_format, target=cfg.log_target, file=cfg.log_file,
              max_bytes=cfg.log_max_bytes, backups=cfg.log_backups)
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    _host_daemons(cfg)
    try:
        AgentServer(cfg, create_app).run()
    except AgentError as e:
        raise click.ClickException(e.message) from None


def _host_daemons(cfg) -> None:
    """On a host without systemd, start virtlogd and libvirtd if VMs need them and they are
    down (agent.hostdaemons). A failure is logged and serving goes on: containers work
    without them, and VM requests answer 503 naming the fix."""
    import logging

    from agent import hostdaemons
    hc = cfg.hypervisor
    if not hostdaemons.wanted(hc.driver, hc.uri, systemd=hostdaemons.systemd_booted()):
        return
    try:
        hostdaemons.ensure(str(cfg.state_path))
    except AgentError as e:
        logging.getLogger("agent.hostdaemons").warning("libvirt's daemons could not be started: %s", e.message)


@main.command("config")
@click.pass_context
def show_config(ctx):
    """Print the effective configuration as JSON."""
    click.echo(_load(ctx).model_dump_json(indent=2))


# -- tokens: straight to the state DB on the host, or through the API with --remote --

def _tokens(ctx):
    from agent.auth import Tokens
    from agent.state import Database
    return Tokens(Database(_load(ctx).db_path))


_REMOTE_HELP = ("through the API (NODEAGENT_URL and an admin NODEAGENT_TOKEN, or the client config) "
                "instead of this host's state DB")


@main.group()
def token():
    """Bearer tokens: on the agent's host they work without a running server (the state DB);
    with --remote they go through the API (/v1/tokens, admin only)."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "reader", "peer"]), required=True,
              help="admin: everything; reader: GET only; peer: another host's, the peer routes only")
@click.option("--ttl", "ttl_s", type=click.IntRange(60, None), help="expire SECONDS from now")
@click.option("--expires-at", type=float, help="expire at this time (unix seconds)")
@click.option("--remote", is_flag=True, help=_REMOTE_HELP)
@click.pass_context
def token_create(ctx, name, role, ttl_s, expires_at, remote):
    """Create a token and print ONLY the secret (shown once)."""
    import time
    if ttl_s is not None and expires_at is not None:
        raise click.UsageError("give --ttl or --expires-at, not both")
    if expires_at is not None and expires_at <= time.time() + 60:
        raise click.UsageError(f"--expires-at {expires_at:.0f} is not at least a minute from now "
                               f"({time.time():.0f}): give a later time (unix seconds)")
    if remote:
        if expires_at is not None:
            ttl_s = int(expires_at - time.time())  # the API takes a relative expiry
        body = {"name": name, "role": role, **({"ttl_s": ttl_s} if ttl_s is not None else {})}
        click.echo(_call(_client().post, "/v1/tokens", body)["token"])
        return
    try:
        click.echo(_tokens(ctx).create(name, role, expires_at, ttl_s))
    except AgentError as e:
        raise click.ClickException(e.message) from None


def _when(ts) -> str | None:
    import time
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--remote", is_flag=True, help=_REMOTE_HELP)
@click.pass_context
def token_list(ctx, as_json, remote):
    """List tokens (names, roles, expiry, last use; secrets are never stored)."""
    rows = _call(_client().get, "/v1/tokens")["tokens"] if remote else _tokens(ctx).list()
    if as_json:
        click.echo(jsonlib.dumps(rows, indent=2))
        return
    shown = [{**r, **{k: _when(r.get(k)) for k in ("created_at", "expires_at", "last_used_at")},
              "expired": "yes" if r.get("expired") else ""} for r in rows]
    _table(["name", "role", "id", "created_at", "expires_at", "last_used_at", "expired"], shown)


@token.command("revoke")
@click.argument("name")
@click.option("--remote", is_flag=True, help=_REMOTE_HELP)
@click.pass_context
def token_revoke(ctx, name, remote):
    """Revoke a token by name (exit 0 even if it is already gone)."""
    if remote:
        from agent.client import ApiError
        try:
            from urllib.parse import quote
            gone = _client().delete(f"/v1/tokens/{quote(name, safe='')}")["deleted"]
        except ApiError as e:
            if e.status != 404:
                raise click.ClickException(str(e)) from None
            gone = False
    else:
        gone = _tokens(ctx).revoke(name)
    click.echo(f"revoked {name}" if gone else f"no token named {name} (nothing to do)", err=True)


# -- API verbs --

def _client():
    from agent.client import Client
    return Client.from_env()


def _call(fn, *args, **kw):
    from agent.client import ApiError
    try:
        return fn(*args, **kw)
    except ApiError as e:
        raise click.ClickException(str(e)) from None


def _table(cols, rows):
    from rich.console import Console
    from rich.table import Table
    t = Table(*cols)
    for r in rows:
        t.add_row(*["" if r.get(c) is None else str(r.get(c)) for c in cols])
    Console().print(t)


def _out(data, as_json, cols=None, key=None):
    if as_json:
        click.echo(jsonlib.dumps(data, indent=2))
    elif key is not None:
        _table(cols, data[key])
    else:
        from rich.console import Console
        from rich.pretty import Pretty
        Console().print(Pretty(data))


def _finish(op, as_json):
    if as_json:
        click.echo(jsonlib.dumps(op, indent=2))
    if op["status"] != "succeeded":
        err = op.get("error") or {}
        raise click.ClickException(f"operation {op['id']} {op['status']}: {err.get('message', '')}")
    return op


def _wait_with_progress(c, op, label: str, as_json: bool):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    if as_json or not sys.stderr.isatty():
        return _call(c.wait, op["id"])
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=None)

        def show(o):
            p = o.get("progress") or {}
            bar.update(task, description=f"{label} [{p.get('phase') or o['status']}]",
                       completed=p.get("bytes_done") or 0, total=p.get("bytes_total"))
        return _call(c.wait, op["id"], on_progress=show)


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def host(ctx, as_json):
    """Host facts: hypervisor, cpus, memory, pools, versions, draining; `evacuate` and `restore`
    for host maintenance."""
    if ctx.invoked_subcommand is None:
        _out(_call(_client().get, "/v1/host"), as_json)


EVACUATION_WAIT_S = 7 * 24 * 3600  # an evacuation ends when its last migration does


@host.command("evacuate")
@click.option("--peer", "peers", multiple=True, help="a configured peer to move instances to (repeatable; "
              "default: all, each instance to the one with the most free memory)")
@click.option("--parallel", type=click.IntRange(1, 16), default=2, show_default=True, help="migrations at a time")
@click.option("--instance", "instances", multiple=True, help="only these instances (repeatable; default: all)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-wait", is_flag=True, help="print the operation and return")
def host_evacuate(peers, parallel, instances, as_json, no_wait):
    """Drain this host: refuse new work and move its instances to peers; list what moved and
    what stayed (and why). The host stays draining until `nodeagent host restore`."""
    body = {"parallel": parallel}
    if peers:
        body["peers"] = list(peers)
    if instances:
        body["instances"] = list(instances)
    c = _client()
    op = _call(c.post, "/v1/host/evacuate", body)
    if no_wait:
        _out(op, as_json)
        return

    def show(o):
        items = (o.get("progress") or {}).get("instances") or []
        done = sum(i["status"] in ("done", "failed") for i in items)
        if not as_json and sys.stderr.isatty():
            click.echo(f"\revacuating: {done}/{len(items)} settled", nl=False, err=True)
    op = _call(c.wait, op["id"], timeout=EVACUATION_WAIT_S, on_progress=show)
    items = (op.get("result") or {}).get("instances") or (op.get("progress") or {}).get("instances") or []
    if as_json:
        click.echo(jsonlib.dumps(op, indent=2))
    else:
        _table(["name", "kind", "status", "destination", "mode", "error"], items)
    stayed = [i for i in items if i["status"] != "done"]
    if op["status"] != "succeeded":
        err = (op.get("error") or {}).get("message", "")
        raise click.ClickException(f"evacuation {op['id']} {op['status']}: {err}")
    if stayed:
        raise click.ClickException(f"{len(stayed)} of {len(items)} instances stayed on this host (see above); "
                                   "it is still draining")
    if not as_json:
        click.echo(f"host evacuated: {len(items)} instances moved; it is draining until `nodeagent host restore`")


@host.command("restore")
def host_restore():
    """End host maintenance: accept creates and incoming migrations again."""
    _call(_client().post, "/v1/host/restore", None)
    click.echo("host restored: it accepts new instances and incoming migrations")


@main.group()
def image():
    """Images: import, list, rm."""


def image_source(source: str) -> dict:
    """The API's image source for the CLI's SOURCE argument."""
    if source.startswith(("http://", "https://")):
        return {"type": "url", "url": source}
    if source.startswith("s3://"):
        pool, _, key = source[len("s3://"):].partition("/")
        return {"type": "s3", "pool": pool, **({"digest": key} if key.startswith("sha256:") else {"key": key})}
    if source.startswith("docker://"):
        return {"type": "registry", "reference": source[len("docker://"):]}
    import os
    return {"type": "file", "path": os.path.abspath(source)}


@image.command("import")
@click.argument("source")
@click.option("--name", required=True)
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw", "oci"]),
              help="default: from the content (a dir or tar archive is a container image, "
                   "anything else a disk); an archive is never accepted as a disk")
@click.option("--pool")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-wait", is_flag=True, help="print the operation and return")
def image_import(source, name, fmt, pool, as_json, no_wait):
    """Import SOURCE: a path on the agent's host inside one of its import dirs ([images]
    import_dirs, default <state_dir>/import: copy the file there first), an http(s) URL,
    docker://REF (registry), or s3://POOL/KEY (an object of an object pool;
    s3://POOL/sha256:HEX names an image by digest)."""
    body = {"name": name, "source": image_source(source), **({"format": fmt} if fmt else {}),
            **({"pool": pool} if pool else {})}
    c = _client()
    op = _call(c.post, "/v1/images", body)
    if no_wait:
        return _out(op, True)
    op = _finish(_wait_with_progress(c, op, f"importing {name}", as_json), as_json)
    if not as_json:
        img = op["result"]["image"]
        click.echo(f"imported {img['name']} {img['id'][:12]} ({img['kind']}, {img['format']}, {img['size']} bytes)")


@image.command("gc")
@click.option("--json", "as_json", is_flag=True)
def image_gc(as_json):
    """Free blobs, unpacked layers and temp files that no image or running import uses."""
    c = _client()
    op = _finish(_call(c.wait, _call(c.post, "/v1/images/gc", {})["id"]), as_json)
    if not as_json:
        r = op["result"]
        click.echo(f"freed {r['bytes_freed']} bytes: {r['blobs_removed']} blob(s), "
                   f"{r['layers_removed']} layer(s), {r.get('temp_files_removed', 0)} temp file(s)")


@image.command("list")
@click.option("--json", "as_json", is_flag=True)
def image_list(as_json):
    data = _call(_client().get, "/v1/images")
    for i in data["images"]:
        i["short_id"] = i["id"][:12]
    _out(data, as_json, ["short_id", "name", "kind", "format", "size", "pool"], "images")


@image.command("rm")
@click.argument("ref")
def image_rm(ref):
    _call(_client().delete, f"/v1/images/{ref}")
    click.echo(f"deleted {ref}")


@main.group()
def instance():
    """Instances (VMs and containers)."""


@instance.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice(["vm", "container"]), required=True)
@click.option("--image", "image_ref", required=True)
@click.option("--cpus", type=float, default=1)
@click.option("--memory", "memory_mib", type=int, default=256, help="MiB")
@click.option("--disk", "disk_gib", type=int, help="GiB: a VM's root disk, a container's rootfs limit")
@click.option("--pool")
@click.option("--env", multiple=True, help="KEY=VALUE (containers)")
@click.option("--user-data", type=click.File("r"), help="cloud-init user-data file (VMs)")
@click.option("--network", type=click.Choice(["bridge", "none", "host"]), help="default: bridge")
@click.option("--ingress-kbit", type=int, help="limit traffic to the instance, kbit/s")
@click.option("--egress-kbit", type=int, help="limit traffic from the instance, kbit/s")
@click.option("--burst-kbit", type=int, help="the limits' burst, kbit (default: 50 ms at the rate)")
@click.option("--cap-add", multiple=True, help="containers: a capability to grant (CAP_NET_ADMIN, ALL)")
@click.option("--cap-drop", multiple=True, help="containers: a default capability to take away (ALL)")
@click.option("--privileged", is_flag=True,
              help="containers: no user namespace, container root = host root (admin tokens only)")
@click.option("-t", "--tty", "use_tty", is_flag=True,
              help="containers: run the process on a terminal; `nodeagent console NAME` attaches to it")
@click.option("--security-group", "groups", multiple=True, help="a security group (repeat; default: default)")
@click.option("--max-cpus", type=int, help="VMs: the most vCPUs a later resize may give it (default: --cpus)")
@click.option("--max-memory", "max_memory_mib", type=int,
              help="VMs: MiB, the most memory a later resize may give it (default: --memory)")
@click.option("--no-autostart", is_flag=True, help="stay stopped after a host reboot even if it was running")
@click.option("--no-start", is_flag=True)
@click.option("--volume", "volumes", multiple=True,
              help="a volume (repeat): containers VOLUME:PATH[:ro], VMs VOLUME[:TARGET][:ro]")
@click.option("--json", "as_json", is_flag=True)
@click.argument("command", nargs=-1)
def instance_create(name, kind, image_ref, cpus, memory_mib, disk_gib, pool, env, user_data, network,
                    ingress_kbit, egress_kbit, burst_kbit, cap_add, cap_drop, privileged, use_tty, groups, max_cpus,
                    max_memory_mib, no_autostart, no_start, volumes, as_json, command):
    """Create NAME from an image; for containers, COMMAND after `--` overrides the image's."""
    body = {"name": name, "kind": kind, "image": image_ref, "cpus": cpus, "memory_mib": memory_mib,
            "start": not no_start}
    if disk_gib:
        body["disk_gib"] = disk_gib
    if privileged:
        body["privileged"] = True
    if use_tty:
        body["tty"] = True
    if pool:
        body["pool"] = pool
    if env:
        body["env"] = dict(e.partition("=")[::2] for e in env)
    if command:
        body["command"] = list(command)
    if user_data:
        body["user_data"] = user_data.read()
    if network:
        body["network"] = network
    bw = _bandwidth(ingress_kbit, egress_kbit, burst_kbit)
    if bw:
        body["bandwidth"] = bw
    if cap_add:
        body["cap_add"] = list(cap_add)
    if cap_drop:
        body["cap_drop"] = list(cap_drop)
    if groups:
        body["security_groups"] = list(groups)
    if max_cpus:
        body["max_cpus"] = max_cpus
    if max_memory_mib:
        body["max_memory_mib"] = max_memory_mib
    if no_autostart:
        body["autostart"] = False
    if volumes:
        body["volumes"] = [_volume_mount(v) for v in volumes]
    c = _client()
    op = _call(c.post, "/v1/instances", body)
    op = _finish(_wait_with_progress(c, op, f"creating {name}", as_json), as_json)
    if not as_json:
        i = op["result"]["instance"]
        click.echo(f"{i['name']} {i['id'][:12]} {i['state']}" + (f" ip {i['ip']}" if i.get("ip") else ""))


def _bandwidth(ingress_kbit, egress_kbit, burst_kbit) -> dict:
    return {k: v for k, v in (("ingress_kbit", ingress_kbit), ("egress_kbit", egress_kbit),
                              ("burst_kbit", burst_kbit)) if v is not None}


@instance.command("set-bandwidth")
@click.argument("ref")
@click.option("--ingress-kbit", type=int, help="traffic to the instance, kbit/s")
@click.option("--egress-kbit", type=int, help="traffic from the instance, kbit/s")
@click.option("--burst-kbit", type=int, help="kbit (default: 50 ms at the rate)")
@click.option("--unlimited", is_flag=True, help="remove every limit")
@click.option("--json", "as_json", is_flag=True)
def instance_set_bandwidth(ref, ingress_kbit, egress_kbit, burst_kbit, unlimited, as_json):
    """Replace REF's network rate limits, live (a direction not given becomes unlimited)."""
    bw = _bandwidth(ingress_kbit, egress_kbit, burst_kbit)
    if bool(bw) == unlimited:
        raise click.UsageError("give --ingress-kbit and/or --egress-kbit (and --burst-kbit), or --unlimited")
    inst = _call(_client().patch, f"/v1/instances/{ref}", {"bandwidth": bw or None})
    if as_json:
        click.echo(jsonlib.dumps(inst, indent=2))
    else:
        b = inst.get("bandwidth") or {}
        burst = f" burst {b['burst_kbit']}" if b.get("burst_kbit") else ""
        click.echo(f"{inst['name']} ingress {b.get('ingress_kbit') or 'unlimited'} egress "
                   f"{b.get('egress_kbit') or 'unlimited'}{burst}")


@instance.command("list")
@click.option("--json", "as_json", is_flag=True)
def instance_list(as_json):
    _out(_call(_client().get, "/v1/instances"), as_json,
         ["name", "kind", "state", "cpus", "memory_mib", "ip", "pool"], "instances")


@instance.command("security-groups")
@click.argument("ref")
@click.argument("groups", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
def instance_security_groups(ref, groups, as_json):
    """Show REF's security groups, or make GROUPS its groups (live)."""
    c = _client()
    data = _call(c.put, f"/v1/instances/{ref}/security-groups", {"security_groups": list(groups)}) \
        if groups else _call(c.get, f"/v1/instances/{ref}/security-groups")
    click.echo(jsonlib.dumps(data, indent=2) if as_json else " ".join(data["security_groups"]))


@instance.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def instance_show(ref, as_json):
    _out(_call(_client().get, f"/v1/instances/{ref}"), as_json)


def _action(ref, action, as_json, **extra):
    c = _client()
    op = _call(c.post, f"/v1/instances/{ref}/actions", {"action": action, **extra})
    op = _finish(_call(c.wait, op["id"]), as_json)
    if not as_json:
        click.echo(f"{ref} {op['result']['instance']['state']}")


@instance.command("start")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def instance_start(ref, as_json):
    _action(ref, "start", as_json)


@instance.command("stop")
@click.argument("ref")
@click.option("--force", is_flag=True)
@click.option("--timeout", type=float, default=60)
@click.option("--json", "as_json", is_flag=True)
def instance_stop(ref, force, timeout, as_json):
    _action(ref, "stop", as_json, force=force, timeout=timeout)


@instance.command("rm")
@click.argument("ref")
def instance_rm(ref):
    _call(_client().delete, f"/v1/instances/{ref}")
    click.echo(f"deleted {ref}")


@instance.command("exec")
@click.argument("ref")
@click.argument("command", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def instance_exec(ref, command, as_json):
    res = _call(_client().post, f"/v1/instances/{ref}/exec", {"command": list(command)})
    if as_json:
        click.echo(jsonlib.dumps(res, indent=2))
        return
    sys.stdout.write(res["stdout"])
    sys.stderr.write(res["stderr"])
    sys.exit(res["exit_code"])


@main.command("console")
@click.argument("ref")
def console_cmd(ref):
    """Attach this terminal to a VM's serial console or to the terminal of a container created
    with --tty (GET /v1/instances/{id}/console). Detach with Ctrl-]: the instance runs on.
    Admins type (and size a container's terminal to this one); a reader token only watches.
    Several may watch at once."""
    from agent import terminal
    conn = _call(_client().websocket, f"/v1/instances/{ref}/console")
    sys.exit(terminal.console(conn, ref))


@main.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("-i", "--interactive", is_flag=True, help="keep stdin open (a websocket session)")
@click.option("-t", "--tty", "use_tty", is_flag=True, help="run on a terminal (with -i)")
@click.option("-e", "--env", "envs", multiple=True, metavar="KEY=VALUE")
@click.option("-w", "--cwd", help="working directory in the container")
@click.option("-u", "--user", help="UID or UID:GID in the container")
@click.argument("ref")
@click.argument("command", nargs=-1, required=True)
def exec_cmd(interactive, use_tty, envs, cwd, user, ref, command):
    """Run COMMAND in container REF; exits with its exit code. `nodeagent exec -it NAME -- sh`
    gives a shell on a terminal; without -i the output comes back at the end."""
    from agent import terminal
    env = {}
    for e in envs:
        k, sep, v = e.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{e!r} is not KEY=VALUE", param_hint="--env")
        env[k] = v
    if use_tty and not interactive:
        raise click.UsageError("-t needs -i: a terminal is interactive")
    body = {"command": list(command)}
    if not interactive:
        if env or cwd or user:
            raise click.UsageError("--env, --cwd and --user need -i")
        res = _call(_client().post, f"/v1/instances/{ref}/exec", body)
        sys.stdout.write(res["stdout"])
        sys.stderr.write(res["stderr"])
        sys.exit(res["exit_code"])
    cols, rows = terminal.terminal_size()
    body.update(interactive=True, tty=use_tty, env=env, cols=cols, rows=rows)
    body.update({k: v for k, v in (("cwd", cwd), ("user", user)) if v})
    c = _client()
    session = _call(c.post, f"/v1/instances/{ref}/exec", body)
    conn = _call(c.websocket, session["websocket"])
    sys.exit(terminal.exec_session(conn, use_tty))


@main.group("file")
def file_group():
    """Push files into containers and pull them out (streamed; paths stay inside the container)."""


def _remote(spec: str) -> tuple[str, str]:
    ref, sep, path = spec.partition(":")
    if not sep or not ref or not path.startswith("/"):
        raise click.BadParameter(f"{spec!r} is not NAME:/absolute/path")
    return ref, path


@file_group.command("push")
@click.argument("local", type=click.File("rb"))
@click.argument("remote")
@click.option("--uid", type=int, help="owner in the container (default 0)")
@click.option("--gid", type=int, help="group in the container (default 0)")
@click.option("--mode", help="octal permission bits (default 0644)")
def file_push(local, remote, uid, gid, mode):
    """Copy LOCAL (a file, or - for stdin) to REMOTE (NAME:/path) in a container."""
    ref, path = _remote(remote)
    res = _call(_client().push_file, ref, path, local, uid=uid, gid=gid, mode=_octal(mode))
    click.echo(f"pushed {res['bytes']} bytes to {ref}:{res['path']} (mode {res['mode']}, owner "
               f"{res['uid']}:{res['gid']})", err=True)


def _octal(mode: str | None) -> int | None:
    try:
        return int(mode, 8) if mode else None
    except ValueError:
        raise click.BadParameter(f"{mode!r} is not octal", param_hint="--mode") from None


@file_group.command("list")
@click.argument("remote")
@click.option("--json", "as_json", is_flag=True)
def file_list(remote, as_json):
    """List directory REMOTE (NAME:/path) of a container (symlinks listed, not followed)."""
    ref, path = _remote(remote)
    res = _call(_client().list_dir, ref, path)
    if as_json:
        click.echo(jsonlib.dumps(res, indent=2))
        return
    _table(["type", "mode", "uid", "gid", "size", "name"], res["entries"])
    if res.get("truncated"):
        click.echo("(more entries left out)", err=True)


@file_group.command("mkdir")
@click.argument("remote")
@click.option("--uid", type=int, help="owner in the container (default 0)")
@click.option("--gid", type=int, help="group in the container (default 0)")
@click.option("--mode", help="octal permission bits (default 0755)")
def file_mkdir(remote, uid, gid, mode):
    """Make directory REMOTE (NAME:/path) in a container (its parent must exist)."""
    ref, path = _remote(remote)
    _call(_client().make_dir, ref, path, uid=uid, gid=gid, mode=_octal(mode))
    click.echo(f"made {ref}:{path}", err=True)


@file_group.command("pull")
@click.argument("remote")
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
def file_pull(remote, local):
    """Copy REMOTE (NAME:/path) from a container to LOCAL (a file, or - for stdout)."""
    import os
    ref, path = _remote(remote)
    if local == "-":
        res = _call(_client().pull_file, ref, path, sys.stdout.buffer)
    else:
        tmp = f"{local}.nodeagent-pull"
        try:
            with open(tmp, "wb") as f:
                res = _call(_client().pull_file, ref, path, f)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    click.echo(f"pulled {res['bytes']} bytes from {ref}:{path} (mode {res['mode']}, owner "
               f"{res['uid']}:{res['gid']})", err=True)


@instance.command("logs")
@click.argument("ref")
@click.option("--tail", type=int)
@click.option("--json", "as_json", is_flag=True)
def instance_logs(ref, tail, as_json):
    res = _call(_client().get, f"/v1/instances/{ref}/logs", params={"tail": tail} if tail else None)
    click.echo(jsonlib.dumps(res, indent=2) if as_json else res["logs"], nl=False)


@instance.command("restart")
@click.argument("ref")
@click.option("--timeout", type=float, default=60, help="containers: seconds to stop gracefully before SIGKILL")
@click.option("--json", "as_json", is_flag=True)
def instance_restart(ref, timeout, as_json):
    """Restart REF (a VM is reset; a container is stopped and started again)."""
    _action(ref, "restart", as_json, timeout=timeout)


@instance.command("rebuild")
@click.argument("ref")
@click.option("--image", "image_ref", help="rebuild from this image (VMs; default: its own)")
@click.option("--force", is_flag=True, help="kill a running instance instead of stopping it gracefully")
@click.option("--timeout", type=float, default=60, help="seconds to stop gracefully before a kill")
@click.option("--json", "as_json", is_flag=True)
def instance_rebuild(ref, image_ref, force, timeout, as_json):
    """Recreate REF's root disk or rootfs from its image (its writes are lost); name, address and
    security groups stay; a running instance is stopped and started again."""
    kw = {"timeout": timeout, **({"image": image_ref} if image_ref else {}), **({"force": True} if force else {})}
    _action(ref, "rebuild", as_json, **kw)


@instance.command("pause")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def instance_pause(ref, as_json):
    """Freeze REF (a VM's vCPUs stop; a container's processes are frozen)."""
    _action(ref, "pause", as_json)


@instance.command("resume")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def instance_resume(ref, as_json):
    """Let a paused REF run again."""
    _action(ref, "resume", as_json)


@instance.command("kill")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def instance_kill(ref, as_json):
    """Stop REF at once (SIGKILL / power off), no graceful shutdown."""
    _action(ref, "kill", as_json)


@instance.command("stats")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def instance_stats(ref, as_json):
    """REF's counters: cpu time, memory, pids, disk and network I/O."""
    st = _call(_client().get, f"/v1/instances/{ref}/stats")
    if as_json:
        click.echo(jsonlib.dumps(st, indent=2))
        return
    rows = [{"counter": k, "value": v} for k, v in st.items() if not isinstance(v, dict)]
    rows += [{"counter": f"{k}.{sub}", "value": v} for k in ("io", "net") for sub, v in (st.get(k) or {}).items()]
    _table(["counter", "value"], rows)


@instance.command("set")
@click.argument("ref")
@click.option("--cpus", type=float, help="VMs: whole vCPUs up to its max_cpus; containers: a CFS quota (0.5)")
@click.option("--memory", "memory_mib", type=int, help="MiB: VMs up to their max_memory_mib")
@click.option("--autostart/--no-autostart", default=None,
              help="start it again after a host reboot if it was running")
@click.option("--json", "as_json", is_flag=True)
def instance_set(ref, cpus, memory_mib, autostart, as_json):
    """Resize REF (live if it runs, else for its next start) or change its autostart."""
    body = {k: v for k, v in (("cpus", cpus), ("memory_mib", memory_mib), ("autostart", autostart))
            if v is not None}
    if not body:
        raise click.UsageError("give --cpus, --memory and/or --autostart/--no-autostart")
    inst = _call(_client().patch, f"/v1/instances/{ref}", body)
    if as_json:
        click.echo(jsonlib.dumps(inst, indent=2))
        return
    top = f" (max {inst['max_cpus']} cpus, {inst['max_memory_mib']} MiB)" if inst.get("max_cpus") else ""
    click.echo(f"{inst['name']} cpus {inst['cpus']:g} memory {inst['memory_mib']} MiB{top} "
               f"autostart {'on' if inst.get('autostart', True) else 'off'}")


# -- operations and migrations --

@main.group()
def operation():
    """Operations (the agent's long work: creates, imports, migrations): list, show, wait, cancel."""


@operation.command("list")
@click.option("--status", type=click.Choice(["pending", "running", "succeeded", "failed", "cancelled"]))
@click.option("--json", "as_json", is_flag=True)
def operation_list(status, as_json):
    data = _call(_client().get, "/v1/operations", params={"status": status} if status else None)
    for o in data["operations"]:
        o["phase"] = (o.get("progress") or {}).get("phase")
        o["when"] = _when(o.get("created_at"))
    _out(data, as_json, ["id", "kind", "target", "status", "phase", "when"], "operations")


@operation.command("show")
@click.argument("op_id")
@click.option("--json", "as_json", is_flag=True)
def operation_show(op_id, as_json):
    _out(_call(_client().get, f"/v1/operations/{op_id}"), as_json)


@operation.command("wait")
@click.argument("op_id")
@click.option("--json", "as_json", is_flag=True)
def operation_wait(op_id, as_json):
    """Wait for OP_ID to end; exit 1 unless it succeeded."""
    c = _client()
    op = _finish(_call(c.wait, op_id), as_json)
    if not as_json:
        click.echo(f"{op['id']} {op['status']}")


@operation.command("cancel")
@click.argument("op_id")
@click.option("--json", "as_json", is_flag=True)
def operation_cancel(op_id, as_json):
    """Cancel a pending or running operation (what it made is removed)."""
    op = _call(_client().delete, f"/v1/operations/{op_id}")
    click.echo(jsonlib.dumps(op, indent=2) if as_json else f"{op['id']} {op['status']}")


# `nodeagent operations ...` works too
main.add_command(click.Group("operations", commands=operation.commands, hidden=True, help=operation.help))


# -- snapshots --

@main.group()
def snapshot():
    """Snapshots of an instance (VM disks or container rootfs): create, list, show, restore, delete."""


@snapshot.command("create")
@click.argument("instance")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def snapshot_create(instance, name, as_json):
    """Take snapshot NAME of INSTANCE, running (a VM: filesystem-consistent if its guest agent answers, else
    crash-consistent; a container: frozen) or stopped."""
    s = _call(_client().post, f"/v1/instances/{instance}/snapshots", {"name": name})
    if as_json:
        click.echo(jsonlib.dumps(s, indent=2))
    else:
        click.echo(f"snapshot {s['name']} of {s['instance']} taken ({s['consistency']})")


@snapshot.command("list")
@click.argument("instance")
@click.option("--json", "as_json", is_flag=True)
def snapshot_list(instance, as_json):
    data = _call(_client().get, f"/v1/instances/{instance}/snapshots")
    for s in data["snapshots"]:
        s["when"] = _when(s.get("created_at"))
    _out(data, as_json, ["name", "kind", "instance_state", "consistency", "when"], "snapshots")


@snapshot.command("show")
@click.argument("instance")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def snapshot_show(instance, name, as_json):
    _out(_call(_client().get, f"/v1/instances/{instance}/snapshots/{name}"), as_json)


@snapshot.command("restore")
@click.argument("instance")
@click.argument("name")
def snapshot_restore(instance, name):
    """Revert INSTANCE in place to snapshot NAME (stop it first)."""
    _call(_client().post, f"/v1/instances/{instance}/snapshots/{name}/restore", None)
    click.echo(f"{instance} restored to snapshot {name}")


@snapshot.command("delete")
@click.argument("instance")
@click.argument("name")
def snapshot_delete(instance, name):
    r = _call(_client().delete, f"/v1/instances/{instance}/snapshots/{name}")
    click.echo(f"deleted snapshot {name} of {instance}" if r.get("deleted") else f"no snapshot {name} (nothing to do)")


# -- backups --

@main.group()
def backup():
    """Backups of instances (a VM's disk and its image, one checksummed artifact in an object or
    local pool): create, list, show, delete, download, upload, restore (as a new instance)."""


def _show_backup(b, as_json):
    if as_json:
        click.echo(jsonlib.dumps(b, indent=2))
    else:
        click.echo(f"backup {b['id']} of {b.get('instance')} in pool {b.get('pool')} ({b.get('consistency')}, "
                   f"{b.get('size')} bytes, sha256 {b.get('sha256')})")


@backup.command("create")
@click.argument("instance")
@click.option("--pool", help="an object (S3) or local pool (default: the first object pool, else the default pool)")
@click.option("--json", "as_json", is_flag=True)
def backup_create(instance, pool, as_json):
    """Back INSTANCE up (running: crash-consistent, without stopping it)."""
    c = _client()
    op = _call(c.post, f"/v1/instances/{instance}/backups", {"pool": pool} if pool else {})
    op = _finish(_wait_with_progress(c, op, f"backing up {instance}", as_json), as_json)
    if not as_json:
        _show_backup(op["result"]["backup"], False)


@backup.command("list")
@click.option("--pool", help="only this pool's backups")
@click.option("--json", "as_json", is_flag=True)
def backup_list(pool, as_json):
    data = _call(_client().get, "/v1/backups", params={"pool": pool} if pool else None)
    for b in data["backups"]:
        b["when"] = _when(b.get("created_at"))
    _out(data, as_json, ["id", "instance", "pool", "when"], "backups")


@backup.command("show")
@click.argument("backup_id")
@click.option("--json", "as_json", is_flag=True)
def backup_show(backup_id, as_json):
    _out(_call(_client().get, f"/v1/backups/{backup_id}"), as_json)


@backup.command("delete")
@click.argument("backup_id")
def backup_delete(backup_id):
    r = _call(_client().delete, f"/v1/backups/{backup_id}")
    click.echo(f"deleted backup {backup_id}" if r.get("deleted") else f"no backup {backup_id} (nothing to do)")


@backup.command("download")
@click.argument("backup_id")
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
def backup_download(backup_id, local):
    """Save backup BACKUP_ID's artifact to LOCAL (a file, or - for stdout), its sha256 checked."""
    import os
    if local == "-":
        res = _call(_client().download_backup, backup_id, sys.stdout.buffer)
    else:
        tmp = f"{local}.nodeagent-download"
        try:
            with open(tmp, "wb") as f:
                res = _call(_client().download_backup, backup_id, f)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    click.echo(f"downloaded {res['bytes']} bytes (sha256 {res['sha256']})", err=True)


@backup.command("upload")
@click.argument("local", type=click.File("rb"))
@click.option("--pool", help="an object (S3) or local pool (default: the first object pool, else the default pool)")
@click.option("--json", "as_json", is_flag=True)
def backup_upload(local, pool, as_json):
    """Upload a backup artifact LOCAL (a file, or - for stdin); every checksum is checked first."""
    _show_backup(_call(_client().upload_backup, local, pool), as_json)


@backup.command("restore")
@click.argument("backup_id")
@click.argument("name")
@click.option("--pool", help="where the new instance's disk goes (default: the default pool)")
@click.option("--no-start", is_flag=True, help="leave it stopped")
@click.option("--json", "as_json", is_flag=True)
def backup_restore(backup_id, name, pool, no_start, as_json):
    """Restore backup BACKUP_ID as a new instance NAME (a new id and address)."""
    body = {"name": name, "start": not no_start, **({"pool": pool} if pool else {})}
    c = _client()
    op = _call(c.post, f"/v1/backups/{backup_id}/restore", body)
    op = _finish(_wait_with_progress(c, op, f"restoring {name}", as_json), as_json)
    if not as_json:
        i = op["result"]["instance"]
        click.echo(f"{i['name']} {i['id'][:12]} {i['state']}" + (f" ip {i['ip']}" if i.get("ip") else ""))


MIGRATION_ID_RE = re.compile(r"[0-9a-f]{32}")  # an operation id: `migrate resume ID` is not a move


@main.group()
def migration():
    """Migrations: `nodeagent migrate` starts one; show reports it."""


@migration.command("show")
@click.argument("migration_id")
@click.option("--json", "as_json", is_flag=True)
def migration_show(migration_id, as_json):
    """A migration's phase, bytes, downtime and error."""
    _out(_call(_client().get, f"/v1/migrations/{migration_id}"), as_json)


@migration.command("resume")
@click.argument("migration_id")
@click.option("--json", "as_json", is_flag=True)
def migration_resume(migration_id, as_json):
    """Resume a post-copy migration whose link broke (the guest split between the hosts,
    paused) from where it stopped; also `nodeagent migrate resume ID`."""
    _resume_migration(migration_id, as_json)


def _resume_migration(migration_id: str, as_json: bool) -> None:
    c = _client()
    op = _call(c.post, f"/v1/migrations/{migration_id}/resume", {})
    op = _finish(_wait_with_progress(c, op, f"resuming migration {migration_id}", as_json), as_json)
    if not as_json:
        res = op.get("result") or {}
        click.echo(f"{res.get('name')} now runs on {res.get('destination')} (post-copy resumed, "
                   f"total {res.get('total_ms')} ms)")


@main.command()
@click.option("--type", "types", help="comma-separated: lifecycle, operation, migration, security_group, "
                                      "volume, snapshot, export, backup (default: all)")
@click.option("--last-event-id", type=int, help="first replay what came after this event id")
@click.option("--timeout", type=float, help="stop after this many seconds (default: never)")
def events(types, last_event_id, timeout):
    """Print the agent's events as JSON lines; after a dropped connection, resume from the
    last one printed (the agent replays what was missed, or says what is lost: a "gap" event)."""
    import time

    from agent.client import ApiError
    c = _client()
    last, deadline = last_event_id, time.monotonic() + timeout if timeout else None
    while deadline is None or time.monotonic() < deadline:
        left = max(0.1, deadline - time.monotonic()) if deadline else None
        try:
            for ev in c.events(types, last, left):
                click.echo(jsonlib.dumps(ev, separators=(",", ":")))
                last = ev["id"] if ev["id"] is not None else last
            if deadline is None:
                return  # the agent ended the stream (it stops)
        except ApiError as e:
            if e.status:
                raise click.ClickException(str(e)) from None
            time.sleep(1)  # unreachable: retry, resuming from ``last``


@main.command()
@click.argument("ref")
@click.argument("destination", required=False)
@click.option("--to", "to", help="the destination: a peer name from the agent's [peers] config")
@click.option("--mode", type=click.Choice(["live", "cold", "refresh"]), default="live",
              help="live: VMs (running); cold: stop, copy, start there; refresh: containers, copy while "
                   "running, then a short stop (a stopped VM always moves offline)")
@click.option("--max-downtime-ms", type=int, help="VMs: the longest switchover pause (default: the host's policy)")
@click.option("--bandwidth", "bandwidth_mib_s", type=int, help="VMs: cap on the pre-copy stream, MiB/s")
@click.option("--timeout", "completion_timeout_s", type=float,
              help="VMs: seconds the copy may take before --timeout-action applies")
@click.option("--timeout-action", type=click.Choice(["abort", "pause", "postcopy"]),
              help="VMs: at --timeout abort (it keeps running here), pause the guest, or switch to post-copy")
@click.option("--auto-converge/--no-auto-converge", default=None,
              help="VMs: throttle a guest that dirties memory faster than it is copied")
@click.option("--postcopy/--no-postcopy", default=None,
              help="VMs: allow post-copy (needs userfaultfd; once it starts it cannot be cancelled)")
@click.option("--json", "as_json", is_flag=True)
def migrate(ref, destination, to, mode, as_json, **controls):
    """Move instance REF to a configured peer: `nodeagent migrate REF --to PEER`. Controls left
    out follow the host's policy ([migration]: pre-copy, auto-converge, then post-copy).
    `nodeagent migrate resume MIGRATION_ID`: resume a broken post-copy (`migration resume`)."""
    if ref == "resume" and not to and destination and MIGRATION_ID_RE.fullmatch(destination):
        return _resume_migration(destination, as_json)
    destination = to or destination
    if not destination:
        raise click.UsageError("name the destination peer with --to PEER")
    c = _client()
    body = {"instance": ref, "destination": destination, "mode": mode,
            **{k: v for k, v in controls.items() if v is not None}}
    op = _call(c.post, "/v1/migrations", body)
    op = _finish(_wait_with_progress(c, op, f"migrating {ref} to {destination}", as_json), as_json)
    if not as_json:
        res = op.get("result") or {}
        if (res.get("instance") or {}).get("state") == "stopped":
            click.echo(f"{ref} now lives on {destination}, stopped (moved offline in {res.get('total_ms')} ms)")
        else:
            click.echo(f"{ref} now runs on {destination} (total {res.get('total_ms')} ms, "
                       f"downtime {res.get('downtime_ms')} ms{', post-copy' if res.get('postcopy') else ''})")
            sw = res.get("switchover")
            if sw:  # the pause taken apart (README "Where the pause goes")
                click.echo(f"  paused {sw.get('pause_ms')} ms: RAM and devices {sw.get('ram_ms')}, disk flush "
                           f"{sw.get('flush_ms')}, mirror's end {sw.get('mirror_ms')}, Finish {sw.get('finish_ms')} "
                           f"(QEMU's limit {sw.get('downtime_limit_ms')} ms, reserve {sw.get('reserve_ms')} ms)")


# -- security groups --

def parse_rule(text: str) -> dict:
    """``DIRECTION[:PROTOCOL[:PORTS[:REMOTE]]]`` as a rule: PORTS ``80`` or ``8000-8080`` (empty:
    all), REMOTE a CIDR or ``@group`` (empty: anywhere). E.g. ``ingress:tcp:22:10.0.0.0/8``,
    ``ingress:any::@web``, ``egress:udp:53``."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 4 or parts[0] not in ("ingress", "egress"):
        raise click.BadParameter(f"{text!r}: use DIRECTION[:PROTOCOL[:PORTS[:REMOTE]]], "
                                 "e.g. ingress:tcp:80 or ingress:any::@web")
    parts += [""] * (4 - len(parts))
    rule: dict = {"direction": parts[0], "protocol": parts[1] or "any"}
    if parts[2]:
        lo, _, hi = parts[2].partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise click.BadParameter(f"{text!r}: PORTS is 80 or 8000-8080")
        rule["port_min"] = int(lo)
        if hi:
            rule["port_max"] = int(hi)
    if parts[3].startswith("@"):
        rule["remote_group"] = parts[3][1:]
    elif parts[3]:
        rule["remote_cidr"] = parts[3]
    return rule


def _rules(rules) -> list[dict]:
    return [parse_rule(r) for r in rules]


def _show_group(g: dict, as_json: bool) -> None:
    if as_json:
        click.echo(jsonlib.dumps(g, indent=2))
        return
    click.echo(f"{g['name']}: {len(g['rules'])} rules; instances: {', '.join(g['instances']) or '-'}")
    for r in g["rules"]:
        remote = r.get("remote_cidr") or ("@" + r["remote_group"] if r.get("remote_group") else "anywhere")
        ports = "" if r.get("port_min") is None else f" {r['port_min']}" + (
            f"-{r['port_max']}" if r.get("port_max") not in (None, r["port_min"]) else "")
        click.echo(f"  {r['direction']} {r.get('protocol', 'any')}{ports} {remote}")


@main.group()
def secgroup():
    """Security groups: which traffic reaches and leaves instances on the bridge."""


RULE_HELP = "DIRECTION[:PROTOCOL[:PORTS[:REMOTE]]], e.g. ingress:tcp:80 or ingress:any::@web (repeat)"


@secgroup.command("create")
@click.argument("name")
@click.option("--rule", "rules", multiple=True, help=RULE_HELP)
@click.option("--description", default="")
@click.option("--json", "as_json", is_flag=True)
def secgroup_create(name, rules, description, as_json):
    body = {"name": name, "description": description, "rules": _rules(rules)}
    _show_group(_call(_client().post, "/v1/security-groups", body), as_json)


@secgroup.command("list")
@click.option("--json", "as_json", is_flag=True)
def secgroup_list(as_json):
    data = _call(_client().get, "/v1/security-groups")
    for g in data["security_groups"]:
        g["rules_n"], g["members"] = len(g["rules"]), ",".join(g["instances"])
    _out(data, as_json, ["name", "rules_n", "members", "description"], "security_groups")


@secgroup.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def secgroup_show(name, as_json):
    _show_group(_call(_client().get, f"/v1/security-groups/{name}"), as_json)


@secgroup.command("set")
@click.argument("name")
@click.option("--rule", "rules", multiple=True, help=RULE_HELP + "; none: no rules")
@click.option("--json", "as_json", is_flag=True)
def secgroup_set(name, rules, as_json):
    """Replace NAME's rules (live on its members)."""
    _show_group(_call(_client().put, f"/v1/security-groups/{name}", {"rules": _rules(rules)}), as_json)


@secgroup.command("delete")
@click.argument("name")
def secgroup_delete(name):
    _call(_client().delete, f"/v1/security-groups/{name}")
    click.echo(f"deleted {name}")


# -- volumes --

def _volume_mount(text: str) -> dict:
    """VOLUME[:PATH|:TARGET][:ro] -> {volume, path (containers) | target (VMs), readonly}."""
    ro = text.endswith(":ro")
    name, _, where = (text[:-3] if ro else text).partition(":")
    if not name or (where and not where.startswith("/") and not re.fullmatch(r"vd[b-y]", where)):
        raise click.BadParameter(f"{text!r}: use VOLUME:PATH[:ro] for a container (e.g. data:/data), "
                                 "VOLUME[:TARGET][:ro] for a VM (e.g. data or data:vdc)")
    out: dict = {"volume": name, "readonly": ro}
    if where:
        out["path" if where.startswith("/") else "target"] = where
    return out


def _size(text: str) -> dict:
    """10G, 512M or a bare number of GiB -> {size_gib} or {size_mib}."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t.endswith("M"):
            return {"size_mib": int(t[:-1])}
        return {"size_gib": int(t[:-1] if t.endswith("G") else t)}
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a size like 10G or 512M") from None


def _show_volume(v: dict, as_json: bool) -> None:
    if as_json:
        click.echo(jsonlib.dumps(v, indent=2))
        return
    att = v.get("attachment") or {}
    where = att.get("target") or att.get("path") or ""
    click.echo(f"{v['name']} {v['id'][:12]} {v['size_bytes'] // (1024 * 1024)} MiB pool {v['pool']} {v['state']}"
               + (f" to {att['instance_name']} at {where}" if att else ""))


@main.group()
def volume():
    """Volumes: disks made on their own, attached to VMs (hot-plug) and containers (a mount path)."""


@volume.command("create")
@click.argument("name")
@click.option("--size", required=True, help="10G, 512M (a bare number: GiB)")
@click.option("--pool", help="a local or block pool (default: the default pool)")
@click.option("--json", "as_json", is_flag=True)
def volume_create(name, size, pool, as_json):
    body = {"name": name, **_size(size), **({"pool": pool} if pool else {})}
    _show_volume(_call(_client().post, "/v1/volumes", body), as_json)


@volume.command("list")
@click.option("--json", "as_json", is_flag=True)
def volume_list(as_json):
    data = _call(_client().get, "/v1/volumes")
    for v in data["volumes"]:
        att = v.get("attachment") or {}
        v["size_mib"] = v["size_bytes"] // (1024 * 1024)
        v["instance"] = att.get("instance_name")
        v["at"] = att.get("target") or att.get("path")
    _out(data, as_json, ["name", "id", "pool", "size_mib", "state", "instance", "at"], "volumes")


@volume.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def volume_show(ref, as_json):
    _show_volume(_call(_client().get, f"/v1/volumes/{ref}"), as_json)


@volume.command("resize")
@click.argument("ref")
@click.option("--size", required=True, help="the new size (grow only): 20G, 1024M")
@click.option("--json", "as_json", is_flag=True)
def volume_resize(ref, size, as_json):
    """Grow REF (online for a running VM: the guest sees it at once)."""
    _show_volume(_call(_client().patch, f"/v1/volumes/{ref}", _size(size)), as_json)


@volume.command("delete")
@click.argument("ref")
def volume_delete(ref):
    _call(_client().delete, f"/v1/volumes/{ref}")
    click.echo(f"deleted {ref}")


@volume.command("attach")
@click.argument("ref")
@click.argument("instance_ref")
@click.option("--target", help="VMs: vdb..vdy (default: the first free)")
@click.option("--path", help="containers: where to mount it (running: at once)")
@click.option("--readonly", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def volume_attach(ref, instance_ref, target, path, readonly, as_json):
    """Attach volume REF to INSTANCE_REF (a running VM: hot-plug; a running container: mounted live at --path)."""
    body = {"volume": ref, **({"target": target} if target else {}), **({"path": path} if path else {}),
            **({"readonly": True} if readonly else {})}
    _show_volume(_call(_client().post, f"/v1/instances/{instance_ref}/volumes", body), as_json)


@volume.command("detach")
@click.argument("ref")
@click.argument("instance_ref")
@click.option("--json", "as_json", is_flag=True)
def volume_detach(ref, instance_ref, as_json):
    """Detach volume REF from INSTANCE_REF."""
    _show_volume(_call(_client().delete, f"/v1/instances/{instance_ref}/volumes/{ref}"), as_json)


# -- NBD exports --

def _show_export(e: dict, as_json: bool) -> None:
    if as_json:
        click.echo(jsonlib.dumps(e, indent=2))
        return
    what = f"volume {e['volume']}" if e.get("volume") else f"image {e.get('image')}"
    click.echo(f"{e['name']} {e['uri']} {'read-only' if e['readonly'] else 'read-write'} tls {e['tls']} ({what})")


@main.group()
def export():
    """NBD exports of volumes and VM images (TLS; admin only): read them with qemu-img or QEMU."""


@export.command("create")
@click.option("--volume", help="the volume to export (name or id)")
@click.option("--image", help="a VM image to export (read-only)")
@click.option("--readonly", is_flag=True)
@click.option("--name", help="the export's name (default: the volume's name, or image-<id12>)")
@click.option("--psk-dir", type=click.Path(file_okay=False),
              help="write the export's key here as keys.psk (0600), for QEMU's tls-creds-psk")
@click.option("--json", "as_json", is_flag=True)
def export_create(volume, image, readonly, name, psk_dir, as_json):
    """Export a volume or image. The PSK is shown once (with --json) or written to --psk-dir."""
    if (volume is None) == (image is None):
        raise click.BadParameter("give exactly one of --volume and --image")
    body = {**({"volume": volume} if volume else {"image": image}), "readonly": bool(readonly or image),
            **({"name": name} if name else {})}
    e = _call(_client().post, "/v1/exports", body)
    psk = e.get("psk")
    if psk_dir and psk:
        os.makedirs(psk_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(psk_dir, "keys.psk"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{psk['identity']}:{psk['key']}\n")
    _show_export(e, as_json)
    if psk and not as_json:
        click.echo(f"psk identity {psk['identity']}" + (f", key in {psk_dir}/keys.psk" if psk_dir else
                                                         f" key {psk['key']} (shown only now)"))


@export.command("list")
@click.option("--json", "as_json", is_flag=True)
def export_list(as_json):
    _out(_call(_client().get, "/v1/exports"), as_json,
         ["name", "uri", "readonly", "tls", "volume", "image"], "exports")


@export.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def export_show(name, as_json):
    _show_export(_call(_client().get, f"/v1/exports/{name}"), as_json)


@export.command("delete")
@click.argument("name")
def export_delete(name):
    _call(_client().delete, f"/v1/exports/{name}")
    click.echo(f"deleted {name}")
