"""Server component states: set-servercomponentstate, get-servercomponentstate."""

from __future__ import annotations

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.directory.directory import COMPONENT_STATES, COMPONENTS, REQUESTERS


@click.command("set-servercomponentstate")
@click.argument("server")
@click.option("--component", required=True, type=click.Choice(COMPONENTS, case_sensitive=False))
@click.option("--state", required=True, type=click.Choice(COMPONENT_STATES, case_sensitive=False))
@click.option("--requester", required=True, type=click.Choice(REQUESTERS, case_sensitive=False))
@pass_app
def set_servercomponentstate(
    app: AppContext, server: str, component: str, state: str, requester: str
) -> None:
    """Set a component's state for one requester; Inactive wins over the others."""
    with app.directory() as directory:
        directory.set_component_state(server, component, state, requester)
        effective = directory.component_state(server, component)
    click.echo(f"{component} on {server}: {requester} says {state}; now {effective}")


@click.command("get-servercomponentstate")
@click.argument("server")
@format_option
@pass_app
def get_servercomponentstate(app: AppContext, server: str, output_format: str) -> None:
    """Show the state of each component of a server and who set it."""
    with app.directory() as directory:
        states = directory.component_states(server)
    render(
        [
            {
                "Server": s.server,
                "Component": s.component,
                "State": s.state,
                "Requesters": s.requesters,
            }
            for s in states
        ],
        output_format,
    )


COMMANDS = [set_servercomponentstate, get_servercomponentstate]
