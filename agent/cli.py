"""The ``nodeagent`` command: ``serve`` runs the daemon, ``token`` edits the state DB
directly (no server needed); the other verbs talk to the API (NODEAGENT_URL,
NODEAGENT_TOKEN or the client config file). Read verbs take ``--json``.
"""
from __future__ import annotations

import json as jsonlib
import sys

import click

from agent import config as config_mod
from agent import log
from agent.errors import AgentError


@click.group()
@click.option("--config", "config_path", envvar="NODEAGENT_CONFIG", default=None,
              help="agent.toml (default /etc/nodeagent/agent.toml, else embedded defaults)")
@click.pass_context
def main(ctx, config_path):
    """nodeagent: per-host IaaS node agent."""
    ctx.obj = {"config_path": config_path}


def _load(ctx):
    try:
        return config_mod.load(ctx.obj["config_path"])
    except AgentError as e:
        raise click.ClickException(e.message) from None


@main.command()
@click.pass_context
def serve(ctx):
    """Run the agent in the foreground (one process; asyncio HTTP/1.1 in front of the app)."""
    from agent.app import create_app
    from agent.server import AgentServer

    cfg = _load(ctx)
    log.setup(cfg.log_level, cfg.log_format)
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


# -- tokens: straight to the state DB --

def _tokens(ctx):
    from agent.auth import Tokens
    from agent.state import Database
    return Tokens(Database(_load(ctx).db_path))


@main.group()
def token():
    """Bearer tokens (work without a running server)."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "reader", "peer"]), required=True,
              help="admin: everything; reader: GET only; peer: another host's, the peer routes only")
@click.pass_context
def token_create(ctx, name, role):
    """Create a token and print ONLY the secret (shown once)."""
    try:
        click.echo(_tokens(ctx).create(name, role))
    except AgentError as e:
        raise click.ClickException(e.message) from None


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def token_list(ctx, as_json):
    """List tokens (names and roles; secrets are never stored)."""
    rows = _tokens(ctx).list()
    if as_json:
        click.echo(jsonlib.dumps(rows, indent=2))
        return
    _table(["name", "role", "id", "created_at"], rows)


@token.command("revoke")
@click.argument("name")
@click.pass_context
def token_revoke(ctx, name):
    """Revoke a token by name (exit 0 even if it is already gone)."""
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


@main.command()
@click.option("--json", "as_json", is_flag=True)
def host(as_json):
    """Host facts: hypervisor, cpus, memory, pools, versions."""
    _out(_call(_client().get, "/v1/host"), as_json)


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
@click.option("--disk", "disk_gib", type=int, help="GiB (VMs)")
@click.option("--pool")
@click.option("--env", multiple=True, help="KEY=VALUE (containers)")
@click.option("--user-data", type=click.File("r"), help="cloud-init user-data file (VMs)")
@click.option("--no-start", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.argument("command", nargs=-1)
def instance_create(name, kind, image_ref, cpus, memory_mib, disk_gib, pool, env, user_data, no_start,
                    as_json, command):
    """Create NAME from an image; for containers, COMMAND after `--` overrides the image's."""
    body = {"name": name, "kind": kind, "image": image_ref, "cpus": cpus, "memory_mib": memory_mib,
            "start": not no_start}
    if disk_gib:
        body["disk_gib"] = disk_gib
    if pool:
        body["pool"] = pool
    if env:
        body["env"] = dict(e.partition("=")[::2] for e in env)
    if command:
        body["command"] = list(command)
    if user_data:
        body["user_data"] = user_data.read()
    c = _client()
    op = _call(c.post, "/v1/instances", body)
    op = _finish(_wait_with_progress(c, op, f"creating {name}", as_json), as_json)
    if not as_json:
        i = op["result"]["instance"]
        click.echo(f"{i['name']} {i['id'][:12]} {i['state']}" + (f" ip {i['ip']}" if i.get("ip") else ""))


@instance.command("list")
@click.option("--json", "as_json", is_flag=True)
def instance_list(as_json):
    _out(_call(_client().get, "/v1/instances"), as_json,
         ["name", "kind", "state", "cpus", "memory_mib", "ip", "pool"], "instances")


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


@instance.command("logs")
@click.argument("ref")
@click.option("--tail", type=int)
@click.option("--json", "as_json", is_flag=True)
def instance_logs(ref, tail, as_json):
    res = _call(_client().get, f"/v1/instances/{ref}/logs", params={"tail": tail} if tail else None)
    click.echo(jsonlib.dumps(res, indent=2) if as_json else res["logs"], nl=False)


@main.command()
@click.argument("ref")
@click.argument("destination", required=False)
@click.option("--to", "to", help="the destination: a peer name from the agent's [peers] config")
@click.option("--mode", type=click.Choice(["live", "cold", "refresh"]), default="live",
              help="live: VMs (running); cold: stop, copy, start there; refresh: containers, copy while "
                   "running, then a short stop (a stopped VM always moves offline)")
@click.option("--json", "as_json", is_flag=True)
def migrate(ref, destination, to, mode, as_json):
    """Move instance REF to a configured peer: `nodeagent migrate REF --to PEER`."""
    destination = to or destination
    if not destination:
        raise click.UsageError("name the destination peer with --to PEER")
    c = _client()
    op = _call(c.post, "/v1/migrations", {"instance": ref, "destination": destination, "mode": mode})
    op = _finish(_wait_with_progress(c, op, f"migrating {ref} to {destination}", as_json), as_json)
    if not as_json:
        res = op.get("result") or {}
        if (res.get("instance") or {}).get("state") == "stopped":
            click.echo(f"{ref} now lives on {destination}, stopped (moved offline in {res.get('total_ms')} ms)")
        else:
            click.echo(f"{ref} now runs on {destination} (total {res.get('total_ms')} ms, "
                       f"downtime {res.get('downtime_ms')} ms)")
