"""The review queue: best first, accepted into train.py with a git commit of that file only, or rejected."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from runner.core.ledger import Ledger
from runner.morning.review import queue
from tests.recorded_night import cli, flat, invoke, one_line_error


@pytest.fixture
def git_env(monkeypatch):
    """git with a known identity and no user or system configuration."""
    identity = {"GIT_AUTHOR_NAME": "Morning", "GIT_AUTHOR_EMAIL": "m@example.org", "GIT_COMMITTER_NAME": "Morning",
                "GIT_COMMITTER_EMAIL": "m@example.org", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    for key, value in identity.items():
        monkeypatch.setenv(key, value)


def git(repo, *args) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(night, git_env):
    """The project as a git work tree: train.py (the night's baseline) committed, plus a staged unrelated edit."""
    root = night.project
    git(root, "init", "--quiet")
    git(root, "add", "train.py", "program.md")
    git(root, "commit", "--quiet", "-m", "start")
    (root / "program.md").write_text("Lower val_bpb, but keep it simple.\n")
    git(root, "add", "program.md")
    return root


def states(night, *ids):
    ledger = Ledger(night.run_dir / "ledger.sqlite")
    try:
        return [(ledger.get(i).review_state, ledger.get(i).review_note) for i in ids]
    finally:
        ledger.close()


def review(night, *args, input=None):
    return invoke(night.runs, "review", *args, "--train-py", str(night.project / "train.py"), input=input)


def test_the_queue_holds_pending_keeps_best_first(night):
    first, best = night.ids["first"], night.ids["best"]
    ledger = Ledger(night.run_dir / "ledger.sqlite")
    items = queue(ledger)
    ledger.close()
    assert [(i.row.id, i.value, i.parent.id) for i in items] == [(best, pytest.approx(0.7005), first),
                                                                 (first, pytest.approx(0.8005), "e0001")]
    assert [round(i.vs_baseline, 6) for i in items] == [-0.199625, -0.099625]


def test_accepting_the_best_brings_its_kept_parent_and_commits_only_train_py(night, repo):
    first, best = night.ids["first"], night.ids["best"]
    result = review(night, input="a\n")
    assert result.exit_code == 0, result.output
    assert "set {'LR': 0.3}" in result.output and "+LR = 0.3" in result.output  # the card and its diff
    card = flat(result.output)
    assert ("gain +0.100000 bpb paired on 2 seeds (95 % interval [+0.100000, +0.100000]); unpaired +0.100000 bpb "
            "(95 % interval [+0.097799, +0.102201]) over the best before it") in card
    assert "2 runs against 2 of the best" in card and "autoresearch verify" in card
    assert f"accepted {best} (with {first})" in result.output and "committed" in result.output
    assert result.output.rstrip().endswith("end of the review queue.")  # the first went in with the best
    assert (repo / "train.py").read_text() == (night.run_dir / best / "train.py").read_text()

    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["train.py"]
    message = git(repo, "log", "-1", "--format=%B")
    assert message.startswith(f"set {{'LR': 0.3}} ({best})\n")
    assert f"val_bpb 0.700500, -0.100000 vs parent {first}, -0.199625 vs baseline 0.900125" in message
    assert f"{first}: set {{'LR': 0.2}}" in message and "Accepted from autoresearch night t." in message
    staged = git(repo, "status", "--porcelain", "--untracked-files=no").splitlines()
    assert staged == ["M  program.md"]  # still staged, not committed
    commit = git(repo, "rev-parse", "HEAD").strip()
    assert states(night, best, first) == [("accepted", f"commit {commit}"), ("accepted", f"commit {commit}; with {best}")]


def test_reject_skip_and_quit(night, repo):
    first, best = night.ids["first"], night.ids["best"]
    result = review(night, input="x\nr\nworse on my data\ns\n")
    assert result.exit_code == 0, result.output
    assert f"rejected {best}" in result.output and "end of the review queue." in result.output
    assert states(night, best, first) == [("rejected", "worse on my data"), ("pending", None)]

    quit_early = review(night, input="q\n")
    assert first in quit_early.output and "end of the review queue" not in quit_early.output
    assert states(night, first) == [("pending", None)]
    assert git(repo, "rev-list", "--count", "HEAD").strip() == "1"


def test_accept_one_by_one_from_a_script(night, repo):
    first, best = night.ids["first"], night.ids["best"]
    one = CliRunner().invoke(cli(), ["review", "--runs-dir", str(night.runs), "--train-py", str(repo / "train.py"),
                                     "accept", first])
    assert one.exit_code == 0 and one.output.startswith(f"accepted {first}: "), one.output
    two = review(night, "accept", best)
    assert two.output.startswith(f"accepted {best}: ") and "(with" not in two.output
    assert git(repo, "log", "--format=%s").splitlines() == [f"set {{'LR': 0.3}} ({best})",
                                                            f"set {{'LR': 0.2}} ({first})", "start"]
    again = review(night, "accept", best)
    assert again.output.startswith(f"accepted {best}: ") and "already holds this change" in again.output
    assert json_queue(night) == []


def json_queue(night):
    return json.loads(review(night, "--json").output)


def test_a_change_that_no_longer_applies_is_a_conflict(night, repo):
    first, best = night.ids["first"], night.ids["best"]
    edited = (repo / "train.py").read_text().replace("LR = 0.1", "LR = 0.15")
    (repo / "train.py").write_text(edited)
    error = one_line_error(review(night, "accept", first))
    assert f"{first} does not apply to" in error and f"`autoresearch show {first}`" in error
    assert (repo / "train.py").read_text() == edited
    assert states(night, first) == [("pending", None)]
    interactive = review(night, input="a\nq\n")
    assert f"conflict: {best} does not apply" in interactive.output  # the best one first, then quit


def test_a_change_on_top_of_a_rejected_one_cannot_go_in_alone(night, repo):
    first, best = night.ids["first"], night.ids["best"]
    assert invoke(night.runs, "review", "reject", first, "--why", "too aggressive").output == f"rejected {first}\n"
    error = one_line_error(review(night, "accept", best))
    assert f"{best} builds on {first}" in error and "you rejected it" in error
    assert states(night, first, best) == [("rejected", "too aggressive"), ("pending", None)]


def test_only_kept_changes_are_reviewed(night):
    unproven, crash = night.ids["unproven"], night.ids["crash"]
    assert "only kept changes are reviewed" in one_line_error(invoke(night.runs, "review", "reject", unproven))
    assert "only kept changes are reviewed" in one_line_error(review(night, "accept", crash))


def test_outside_git_train_py_is_updated_without_a_commit(night):
    first = night.ids["first"]
    result = review(night, "accept", first)
    assert result.exit_code == 0 and "not a git work tree, nothing committed" in result.output
    assert "LR = 0.2" in (night.project / "train.py").read_text()
    assert states(night, first) == [("accepted", "")]


def test_a_failing_commit_is_one_line_and_train_py_keeps_the_change(night, repo):
    first = night.ids["first"]
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'refused by policy' >&2\nexit 1\n")
    hook.chmod(0o755)
    error = one_line_error(review(night, "accept", first))
    assert f"{first} was applied to" in error and "git commit failed: refused by policy" in error
    assert "LR = 0.2" in (repo / "train.py").read_text()
    assert states(night, first) == [("accepted", "applied; git commit failed")]


def test_a_missing_train_py_is_one_line(night, tmp_path):
    first = night.ids["first"]
    result = invoke(night.runs, "review", "accept", first, "--train-py", str(tmp_path / "none.py"))
    assert "there is no train.py at" in one_line_error(result)
