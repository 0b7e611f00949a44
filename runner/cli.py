"""The `autoresearch` command line: a thin dispatcher; the work lives in the modules.

A problem the user can cause or fix (a bad flag, no Docker, no API key, no data)
ends in one sentence on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import structlog

from runner.agents.factory import AGENT_NAMES
from runner.core.decision import Rule
from runner.core.errors import user_errors
from runner.core.inputs import MAX_DIFF_BYTES, MAX_TRAIN_PY_BYTES, read_text
from runner.core.options import runs_dir_option
from runner.core.settings import DEFAULT_GPU_MEMORY_CAP, SANDBOXES, Settings, Source, default_tag
from runner.morning.commands import register as register_morning


@click.group()
@click.pass_context
def main(ctx: click.Context) -> None:
    """autoresearch-sandbox: an agent improves train.py overnight, every experiment sandboxed."""
    # A command prints its own output; only warnings of the modules it uses join it
    # (a night logs to its own files, see runner.core.log_setup).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    ctx.call_on_close(structlog.reset_defaults)


@main.command()
@click.option("--hours", type=float, default=None,
              help="Stop starting experiments once the night has run this many hours, every start under its "
                   "--tag added up (not the time between a stop and a resume). Default: the night's last "
                   "--hours, else until Ctrl-C.")
@click.option("--max-experiments", type=int, default=None,
              help="Stop once the agent has made this many proposals in the night, resumes included: kept, "
                   "discarded, failed, cancelled and rejected (invalid diff) ones all count; baseline and "
                   "confirmation runs do not. Default: the night's last --max-experiments, else no limit.")
@click.option("--max-agent-usd", type=float, default=None,
              help="Stop proposing once the agent has cost this many US dollars in the night, resumes included "
                   "(as its API reports or the anthropic agent estimates; proposals already under way are still "
                   "run). Default: the night's last --max-agent-usd, else no limit.")
@click.option("--agent", type=click.Choice(AGENT_NAMES), default="auto", show_default=True,
              help="auto: anthropic when ANTHROPIC_API_KEY is set, else the offline search.")
@click.option("--agent-command", default=None, help="Shell command for --agent command (prompt on stdin).")
@click.option("--sandbox", type=click.Choice(SANDBOXES), default="auto", show_default=True)
@click.option("--gpus", default="all", show_default=True, help="all, none, or indices such as 0,1.")
@click.option("--tag", default=None, help="Run name (runs/<tag>); an existing tag resumes. Default: date-time.")
@runs_dir_option
@click.option("--budget", type=float, default=None, help="Training seconds per experiment (default: the profile's).")
@click.option("--source", default="offline", show_default=True, help="Data: offline, linux, hf, local or local:PATH.")
@click.option("--baseline-runs", type=int, default=Settings.baseline_runs, show_default=True,
              help="Baseline runs (seeds) that first measure the noise.")
@click.option("--alpha", type=float, default=Rule.alpha, show_default=True,
              help="Chance that an effect-free change is kept (a night of N experiments expects N x alpha).")
@click.option("--max-runs", type=int, default=Rule.max_runs, show_default=True,
              help="Runs (seeds) a candidate may take before it is discarded as unproven.")
@click.option("--min-delta", type=float, default=Rule.min_delta, show_default=True,
              help="Smallest estimated gain (bpb) worth keeping.")
@click.option("--paired-share", type=float, default=Rule.paired_share, show_default=True,
              help="Share of alpha spent on the paired test (changes that keep runs coupled); the rest goes to "
                   "the unpaired one (changes that decouple them).")
@click.option("--max-diff-retries", type=int, default=3, show_default=True,
              help="Tries for the agent to send a valid diff before the proposal is rejected.")
@click.option("--deterministic/--no-deterministic", default=True, show_default=True,
              help="Deterministic kernels, so `rerun --exact` is bit-identical (about 15% slower on a GPU).")
@click.option("--gpu-memory-cap", default=DEFAULT_GPU_MEMORY_CAP, show_default=True,
              help="GPU memory one experiment may hold: a share of the card (0.9), GiB (40GiB) or none.")
@click.option("--base-image", envvar="AR_BASE_IMAGE", default=None,
              help="Upstream image of the docker sandbox's online runtime (env AR_BASE_IMAGE; default: the pinned "
                   "pytorch/pytorch tag); its digest is pinned in images/base.lock.")
@click.option("--prune-images/--keep-images", default=True, show_default=True,
              help="Remove the images of discarded and failed experiments as the night goes; the baseline's, "
                   "kept and undecided ones stay for review, rerun and verify.")
@click.option("--cluster", envvar="AR_CLUSTER", default=None,
              help="Run the experiments on a Ray cluster: its address (ray://HOST:10001, HOST:6379, or auto); "
                   "this machine keeps the ledger. Needs `uv sync --extra ray`.")
@click.option("--notify", "notify", multiple=True, metavar="URL",
              help="POST a JSON message (Slack's `text`, Discord's `content`) to this webhook on a keep, a streak "
                   "of failures, a stall, a full disk and the night's end; repeatable. Failures are logged, "
                   "never stop the night.")
@click.option("--on-event", "on_event", multiple=True, metavar="CMD",
              help="Run CMD with each such event as JSON on its stdin; repeatable.")
@click.option("--stall-minutes", type=float, default=30.0, show_default=True,
              help="No run ending for this many minutes is a stall worth an event.")
@user_errors
def overnight(hours, max_experiments, max_agent_usd, agent, agent_command, sandbox, gpus, tag, runs_dir, budget, source,
              baseline_runs, alpha, max_runs, min_delta, paired_share, max_diff_retries, deterministic, gpu_memory_cap, base_image,
              prune_images, cluster, notify, on_event, stall_minutes) -> None:
    """Run the experiment loop for the night (resume with the same --tag)."""
    from runner.night.overnight import Interrupted, run_overnight

    settings = Settings(
        tag=tag or default_tag(), hours=hours, max_experiments=max_experiments, max_agent_usd=max_agent_usd, agent=agent,
        agent_command=agent_command, sandbox=sandbox, gpus=gpus, budget=budget, source=Source.parse(source),
        baseline_runs=baseline_runs, rule=Rule(alpha=alpha, max_runs=max_runs, min_delta=min_delta,
                                                  paired_share=paired_share),
        max_diff_retries=max_diff_retries, deterministic=deterministic, gpu_memory_cap=gpu_memory_cap,
        runs_dir=runs_dir, base_image=base_image, prune_images=prune_images, cluster=cluster,
        notify=tuple(notify), on_event=tuple(on_event), stall_minutes=stall_minutes,
    )
    try:
        run_overnight(settings)
    except Interrupted as stop:  # Ctrl-C, SIGTERM or SIGHUP (runner.night.overnight.Presses)
        click.echo(str(stop), err=True)
        sys.exit(stop.exit_code)


@main.command("check-diff")
@click.argument("diff_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=Path("train.py"),
              show_default=True, help="The train.py the diff must apply to.")
@user_errors
def check_diff(diff_file: Path, base: Path) -> None:
    """Validate a diff exactly as the night does; exit 1 when it is rejected."""
    from runner.core.diffs import DiffRejected, changed_lines, validate_and_apply

    diff = read_text(diff_file, "the diff", MAX_DIFF_BYTES)
    try:
        validate_and_apply(diff, read_text(base, "the base train.py", MAX_TRAIN_PY_BYTES))
    except DiffRejected as exc:
        click.echo(f"rejected: {exc.reason}")
        sys.exit(1)
    added, removed = changed_lines(diff)
    click.echo(f"ok: +{added} -{removed} lines")


register_morning(main)
