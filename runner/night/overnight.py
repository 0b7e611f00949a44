"""`autoresearch overnight`: get everything a night needs, then run it.

Cheap checks that a user can fail come first (flags, GPUs, a night another runner runs, a resumed
night whose limits are spent, agent, sandbox), so a mistake costs seconds, not a data build; then
data and the base image are made if missing, and the loop runs under a live status line. Ctrl-C,
SIGTERM and SIGHUP stop it as a person means them (`Presses`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import structlog
from rich.console import Console

import contract
from dataprep.build import is_built, verify_manifest
from dataprep.errors import PrepareError
from runner.agents.base import Agent
from runner.agents.config import AnthropicConfig, CommandConfig, SearchConfig
from runner.agents.factory import choose_agent, make_agent
from runner.core import gpus as gpu_inventory
from runner.core.errors import UserError
from runner.core.figures import agent_usd, figures, seeing_lines, verify_hint
from runner.core.gpus import Gpu
from runner.core.heartbeat import refuse_if_running, sole_runner
from runner.core.ledger import Experiment, Ledger
from runner.core.log_setup import night_log
from runner.core.settings import Settings, SettingsError, prepared_data
from runner.night.cluster import Cluster
from runner.night.placement import OnCluster
from runner.night.console import StatusLine, summary_table
from runner.night.limits import NightLimits
from runner.night.loop import Dataset, Night, NightError
from sandbox.backends import DockerConfig, ProcessConfig, choose_backend, make_backend
from sandbox.spec import Backend
from sandbox.status import Status
from sandbox.supervision import kill_all_runs

log = structlog.get_logger(__name__)

PRESS_S = 1.0  # signals this soon after a press are that press again: a wrapper's copy (see Presses)
KILL_WAIT_S = 5.0  # how long a stop at once waits for its kills (an engine that hangs): the next start reaps the rest
PRESSES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class Interrupted(UserError):
    """The user stopped the night (Ctrl-C, SIGTERM or SIGHUP): one sentence, and the exit status a shell gives
    a process that signal ended (130, 143, 129), so that a script or a service manager can tell."""

    def __init__(self, sentence: str, signum: int) -> None:
        super().__init__(sentence)
        self.exit_code = 128 + signum


class Presses:
    """Ctrl-C, SIGTERM and SIGHUP as a person presses them: the first stops the night gracefully (what runs
    is cancelled and recorded), a later one at once (what runs is killed, the process exits).

    One press reaches the runner more than once: the terminal sends Ctrl-C to the whole foreground group,
    and wrappers in it pass on what they get (`uv run` some 200 ms later, `make` and `timeout` at once), so
    signals within PRESS_S of a press are that press. They are timed as they arrive (`signal.set_wakeup_fd`),
    not when the main thread gets to its handler, which a long call into C may delay. A thread acts on
    each press: nothing is raised into the night, where a KeyboardInterrupt at an arbitrary line (inside a
    lock, a condition's wait) left experiments unrecorded and containers running. Only the start-up (data,
    images, checks), before anything of the night runs, is stopped with KeyboardInterrupt, as Python would.

    After a press the handlers stay until the process exits, so that a wrapper's late copy never meets
    Python's default handler; without one they are given back at the end of the block.
    """

    def __init__(self, console: Console, tag: str) -> None:
        self._console, self._tag = console, tag
        self.night: Night | None = None
        self.signum: int | None = None  # the first press's signal, once the watching thread has seen it
        self.raised: int | None = None  # the signal the start-up was stopped by (KeyboardInterrupt)
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous: dict[int, object] = {}
        self._previous_fd = -1

    def __enter__(self) -> Presses:
        self._install()
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="presses").start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.signum is None and self.raised is None:
            signal.set_wakeup_fd(self._previous_fd)
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            os.close(self._write)  # the watching thread reads the end, and closes its side

    def attach(self, night: Night) -> None:
        """From now on a press interrupts `night`. The handlers are set again: Ray's init sets a SIGTERM
        handler of its own."""
        self._install()
        self.night = night
        if self.signum is not None:  # pressed while the start-up ended
            night.interrupt()

    def _install(self) -> None:
        for signum in PRESSES:
            self._previous.setdefault(signum, signal.signal(signum, self._on_signal))

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.night is None and self.raised is None:
            self.raised = signum
            raise KeyboardInterrupt

    def _watch(self) -> None:
        pressed_at: float | None = None
        while data := os.read(self._read, 64):
            now = time.monotonic()
            for signum in data:
                if signum not in PRESSES or (pressed_at is not None and now - pressed_at < PRESS_S):
                    continue  # another signal, or the same press again
                pressed_at = now
                if self.signum is None:
                    self.signum = signum
                    self._stop_gracefully(signum)
                else:
                    self._stop_at_once(signum)
        os.close(self._read)

    def _stop_gracefully(self, signum: int) -> None:
        night = self.night
        if night is None:
            return  # the start-up stops (KeyboardInterrupt)
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {PRESSES[signum]} again"
        log.warning("night.interrupted", by=PRESSES[signum], note=f"cancelling what runs; {again} to stop at once")
        night.interrupt()

    def _stop_at_once(self, signum: int) -> None:
        """Kill what runs and exit now, with one sentence: what ran stays owed to a resume."""
        killing = threading.Thread(target=kill_all_runs, args=(f"{PRESSES[signum]} again: stopping at once",),
                                   daemon=True)
        killing.start()
        killing.join(KILL_WAIT_S)
        self._console.show_cursor(True)  # the status line hid it
        print(f"stopped at once by a second {PRESSES[signum]}: whatever ran was killed; resume the night with "
              f"--tag {self._tag}.", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def stopped(self, rows: list[Experiment]) -> Interrupted:
        """The graceful stop of the night, in one sentence."""
        cancelled = [r.id for r in rows if r.status == Status.CANCELLED]
        what = f"{', '.join(cancelled)} cancelled" if cancelled else "nothing was running"
        return Interrupted(f"stopped by {PRESSES[self.signum]} ({what}); resume the night with --tag {self._tag}.",
                           self.signum)

    def before_the_night(self) -> Interrupted:
        """A stop of the start-up, in one sentence."""
        return Interrupted(f"stopped by {PRESSES[self.raised]} before the night began; start it again with "
                           f"--tag {self._tag}.", self.raised)


DATA_BUILDER = (sys.executable, "-m", "dataprep")  # the host's data builder, in a process of its own


def ensure_data(settings: Settings) -> Dataset:
    """The prepared data of `settings.source`, built with the data builder when missing, and checked file by
    file against its manifest: a night never measures on damaged or silently changed data."""
    path = prepared_data(settings.source.name)
    if not is_built(path):
        command = [*DATA_BUILDER, *settings.source.prepare_args()]
        log.info("data.prepare", source=str(settings.source), into=str(path))
        # Its own session: Ctrl-C reaches the runner alone, whose KeyboardInterrupt kills it (subprocess.run
        # does), instead of ending it with a traceback of its own on the runner's console.
        done = subprocess.run(command, cwd=settings.root, start_new_session=True)
        if done.returncode != 0 or not is_built(path):
            raise NightError(
                f"no prepared data for --source {settings.source} and the data builder could not build it "
                f"(exit {done.returncode}); see its output above."
            )
    try:
        return Dataset(path, verify_manifest(path))
    except PrepareError as error:
        raise NightError(f"the prepared data does not check out ({error}); rebuild it with "
                         f"`uv run python -m dataprep {' '.join(settings.source.prepare_args())} --force`.") from None


def run_overnight(settings: Settings, *, inventory: list[Gpu] | None = None, console: Console | None = None) -> str:
    """Run one night; returns why it stopped. User-caused problems raise with one sentence, and so does a
    stop by Ctrl-C, SIGTERM or SIGHUP (Interrupted, with its exit status).

    A night another runner runs is refused before anything is touched (runner.core.heartbeat). A start that
    fails before the night begins leaves no run directory behind unless one was there before.
    """
    if settings.cluster is not None:  # the nodes give each run its GPU
        gpus = []
    else:
        gpus = gpu_inventory.select(gpu_inventory.discover() if inventory is None else inventory, settings.gpus)
    console = console or Console(stderr=True)
    fresh = not settings.run_dir.exists()
    with Presses(console, settings.tag) as presses:
        try:
            with sole_runner(settings.run_dir, settings.tag):
                return _overnight(settings, gpus, console, presses, fresh)
        except KeyboardInterrupt:  # a press before the night began
            raise presses.before_the_night() from None


def _overnight(settings: Settings, gpus: list[Gpu], console: Console, presses: Presses, fresh: bool) -> str:
    """The night, as its sole runner."""
    run_dir = settings.run_dir
    ledger_path = run_dir / "ledger.sqlite"
    if ledger_path.is_file() and (spent := _limits_spent(settings, ledger_path)):
        console.print(spent, soft_wrap=True, markup=False, highlight=False)
        return "spent"
    fresh = fresh and not ledger_path.exists()  # made meanwhile by a runner that has ended since
    night = None
    try:
        with night_log(run_dir / "events.jsonl", console):
            night = _start(settings, gpus)
            presses.attach(night)
            return _run(night, settings, console, presses)
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
    agent = None if waits else open_agent(settings, profile=contract.profile_of(bool(gpus)))
    ledger = Ledger(settings.run_dir / "ledger.sqlite")  # a damaged or locked ledger fails here, in seconds
    try:
        backend = open_backend(settings)
        data = ensure_data(settings)
        backend.ensure_ready()
        placement = OnCluster(open_cluster(settings, backend, data)) if settings.cluster is not None else None
        agent = agent or open_agent(settings, profile=placement.profile)
        return Night(settings, ledger=ledger, backend=backend, agent=agent, gpus=gpus, data=data, placement=placement)
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


def _run(night: Night, settings: Settings, console: Console, presses: Presses) -> str:
    ledger = night.ledger
    try:
        with StatusLine(console) as line:
            reason = night.run(on_tick=line.show)
        rows = ledger.experiments(night_id=night.night_id)
        console.print(summary_table(rows, night.baseline_mean))
        for line in seeing_lines(figures(ledger, settings.run_dir)):
            console.print(line)
        if reason == "interrupted":
            raise presses.stopped(rows)
        if reason == "agent-budget":
            console.print(f"stopped: the agent has cost ${agent_usd(ledger):.2f} of the ${night.limits.max_agent_usd:g} "
                          f"--max-agent-usd allows; ledger {ledger.path}; resume with --tag {settings.tag} and a "
                          "larger --max-agent-usd")
        else:
            console.print(f"stopped: {reason}; ledger {ledger.path}; resume with --tag {settings.tag}")
        if ledger.best_kept() is not None:
            console.print(verify_hint(settings.tag))
        return reason
    finally:
        ledger.close()


def _limits_spent(settings: Settings, ledger_path: Path) -> str | None:
    """A resume of a night whose --hours or --max-experiments are spent: why, in one sentence. Refused
    (NightRunning) while a runner on another machine still beats in it."""
    ledger = Ledger(ledger_path)
    try:
        refuse_if_running(ledger.nights(), settings.tag)
        return NightLimits.of(settings, ledger).spent(ledger, settings.tag)
    finally:
        ledger.close()

