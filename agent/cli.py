"""The ``nodeagent`` command: ``serve`` runs the daemon; other verbs talk to its API."""
from __future__ import annotations

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
    """Run the agent in the foreground."""
    from agent.app import create_app
    from agent.server import AgentServer

    cfg = _load(ctx)
    log.setup(cfg.log_level, cfg.log_format)
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    AgentServer(cfg, create_app).run()


@main.command("config")
@click.pass_context
def show_config(ctx):
    """Print the effective configuration as JSON."""
    click.echo(_load(ctx).model_dump_json(indent=2))
