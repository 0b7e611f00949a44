"""`autoresearch overnight`: get everything a night needs, then run it.

Cheap checks that a user can fail come first (flags, GPUs, a resumed night whose limits
are spent, agent, sandbox), so a mistake costs seconds, not a data build; then data and the base image are made
if missing, and the loop runs under a live status line.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import structlog
from rich.console import Console

from dataprep.build import is_built, verify_manifest
from dataprep.errors import PrepareError
from runner import gpus as gpu_inventory
from runner.agents.base import Agent
from runner.agents.config import AnthropicConfig, CommandConfig, SearchConfig
from runner.agents.factory import choose_agent, make_agent
from runner.cluster import Cluster
from runner.console import StatusLine, summary_table
from runner.gpus import Gpu
from runner.ledger import Ledger
from runner.limits import NightLimits
from runner.log_setup import night_log
from runner.loop import Dataset, Night, NightError
from runner.settings import Settings, SettingsError, prepared_data
from runner.verify import hint as verify_hint
from sandbox.backends import DockerConfig, ProcessConfig, choose_backend, make_backend
from sandbox.spec import Backend

log = structlog.get_logger(__name__)


def ensure_data(settings: Settings) -> Dataset:
    """The prepared data of `settings.source`, built with prepare.py when missing, and checked file by
    file against its manifest: a night never measures on damaged or silently changed data."""
    path = prepared_data(settings.source.name)
    if not is_built(path):
        command = [sys.executable, str(settings.root / "prepare.py"), *settings.source.prepare_args()]
        log.info("data.prepare", source=str(settings.source), into=str(path))
        done = subprocess.run(command, cwd=settings.root)
        if done.returncode != 0 or not is_built(path):
            raise NightError(
                f"no prepared data for --source {settings.source} and prepare.py could not build it "
                f"(exit {done.returncode}); see its output above."
            )
    try:
        return Dataset(path, verify_manifest(path))
    except PrepareError as error:
        raise NightError(f"the prepared data does not check out ({error}); rebuild it with "
                         f"`uv run prepare.py {' '.join(settings.source.prepare_args())} --force`.") from None


def run_overnight(settings: Settings, *, inventory: list[Gpu] | None = None, console: Console | None = None) -> str:
    """Run one night; returns why it stopped. User-caused problems raise with one sentence.

    A start that fails before the night begins leaves no run directory behind unless one was there before.
    """
    if settings.cluster is not None:  # the nodes give each run its GPU
        gpus = []
    else:
        gpus = gpu_inventory.select(gpu_inventory.discover() if inventory is None else inventory, settings.gpus)
    console = console or Console(stderr=True)
    run_dir = settings.run_dir
    ledger_path = run_dir / "ledger.sqlite"
    if ledger_path.is_file() and (spent := _limits_spent(settings, ledger_path)):
        console.print(spent, soft_wrap=True, markup=False, highlight=False)
        return "spent"
    fresh = not run_dir.exists()
    night = None
    try:
        with night_log(run_dir / "events.jsonl", console):
            night = _start(settings, gpus)
            return _run(night, settings, console)
    except BaseException:
        if fresh and (night is None or night.night_id is None):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _start(settings: Settings, gpus: list[Gpu]) -> Night:
    """Everything a night needs, the cheap checks first: agent, ledger, sandbox, then data and image.
    A cluster night then asks the cluster's nodes what they are, and learns its profile from them."""
    if not gpus and settings.cluster is None:
        log.info("night.cpu", note="no GPU selected: CPU profile, one worker")
    # Only the search agent's moves depend on the profile, which a cluster's nodes decide: it alone waits for them.
    waits = settings.cluster is not None and choose_agent(settings.agent) == "search"
    agent = None if waits else open_agent(settings, profile="gpu" if gpus else "cpu")
    ledger = Ledger(settings.run_dir / "ledger.sqlite")  # a damaged or locked ledger fails here, in seconds
    try:
        backend = open_backend(settings)
        data = ensure_data(settings)
        backend.ensure_ready()
        cluster = open_cluster(settings, backend, data) if settings.cluster is not None else None
        agent = agent or open_agent(settings, profile=cluster.profile)
        return Night(settings, ledger=ledger, backend=backend, agent=agent, gpus=gpus, data=data, cluster=cluster)
    except BaseException:
        ledger.close()
        raise


def open_cluster(settings: Settings, backend: Backend, data: Dataset) -> Cluster:
    """The Ray cluster of `--cluster`, with the nodes that build from this machine's recipe and hold its data."""
    cluster = Cluster(settings.cluster, sandbox=backend.name, source=data.path.name, data_hash=data.manifest_hash,
                      recipe=backend.recipe(), cpu_profile=settings.gpus == "none")
    cluster.connect()
    cluster.take_inventory()
    return cluster


def open_agent(settings: Settings, profile: str) -> Agent:
    """The agent of `--agent`, configured with the settings it takes."""
    chosen = choose_agent(settings.agent)
    if chosen == "command":
        return make_agent(CommandConfig(command=settings.agent_command))
    if chosen == "search":
        return make_agent(SearchConfig(profile=profile))
    return make_agent(AnthropicConfig())


def open_backend(settings: Settings) -> Backend:
    """The sandbox of `--sandbox`, configured with the settings it takes; one given to the other is an error."""
    if choose_backend(settings.sandbox) == "docker":
        return make_backend(DockerConfig(base_image=settings.base_image))
    if settings.base_image is not None:
        raise SettingsError("--base-image is for the docker sandbox, but no Docker engine answers here; "
                            "start one, or leave --base-image (and AR_BASE_IMAGE) out.")
    return make_backend(ProcessConfig(hide=(settings.run_dir.parent,)))  # other nights and this one's ledger


def _run(night: Night, settings: Settings, console: Console) -> str:
    ledger = night.ledger
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            with StatusLine(console) as line:
                reason = night.run(on_tick=line.show)
        finally:
            signal.signal(signal.SIGTERM, previous)
        console.print(summary_table(ledger.experiments(night_id=night.night_id), night.baseline_mean))
        console.print(f"stopped: {reason}; ledger {ledger.path}; resume with --tag {settings.tag}")
        if ledger.best_kept() is not None:
            console.print(verify_hint(settings.tag))
        return reason
    finally:
        ledger.close()


def _limits_spent(settings: Settings, ledger_path: Path) -> str | None:
    """A resume of a night whose --hours or --max-experiments are spent: why, in one sentence."""
    ledger = Ledger(ledger_path)
    try:
        return NightLimits.of(settings, ledger).spent(ledger, settings.tag)
    finally:
        ledger.close()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops the night like Ctrl-C: running experiments are cancelled and recorded."""
    raise KeyboardInterrupt

