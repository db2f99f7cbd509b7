"""What the rooms of one health engine share, made once by the engine: the server's
context, the clock, the results store, what runs here, the operators' controls, the
monitor states and each probe's current targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from popguard.directory.directory import Directory, Server
from popguard.health.clock import Clock
from popguard.health.controls import Controls
from popguard.health.results import MonitorState, ResultsStore
from popguard.health.server_plan import ServerPlan
from popguard.services.context import ServerContext

MonitorStates = dict[tuple[str, str], MonitorState]  # (monitor key, resource) -> state


@dataclass
class EngineState:
    context: ServerContext
    clock: Clock
    store: ResultsStore
    plan: ServerPlan
    controls: Controls
    # Written through to the store, which is what a restarted engine starts from.
    states: MonitorStates
    # probe identity -> its targets at its last full run
    resources: dict[str, list[str]] = field(default_factory=dict)

    @property
    def server(self) -> Server:
        return self.context.server

    @property
    def directory(self) -> Directory:
        return self.context.directory

    @property
    def data(self) -> Path:
        return self.context.data
