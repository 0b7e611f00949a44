"""The review queue: best first, accepted into train.py with a git commit of that file only, or rejected."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from runner.ledger import Ledger
from runner.review import queue
from tests.test_morning import cli, invoke, night, one_line_error, project  # noqa: F401 (fixtures)


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
def repo(night, git_env):  # noqa: F811
    """The project as a git work tree: train.py (the night's baseline) committed, plus a staged unrelated edit."""
    root = night.project
    git(root, "init", "--quiet")
    git(root, "add", "train.py", "program.md")
    git(root, "commit", "--quiet", "-m", "start")
    (root / "program.md").write_text("Lower val_bpb, but keep it simple.\n")
    git(root, "add", "program.md")
    return root


def states(night, *ids):  # noqa: F811
    ledger = Ledger(night.run_dir / "ledger.sqlite")
    try:
        return [(ledger.get(i).review_state, ledger.get(i).review_note) for i in ids]
    finally:
        ledger.close()


def review(night, *args, input=None):  # noqa: F811
    return invoke(night.runs, "review", *args, "--train-py", str(night.project / "train.py"), input=input)


def test_the_queue_holds_pending_keeps_best_first(night):  # noqa: F811
    ledger = Ledger(night.run_dir / "ledger.sqlite")
    items = queue(ledger)
    ledger.close()
    assert [(i.row.id, i.value, i.parent.id) for i in items] == [("e0008", 0.7, "e0004"), ("e0004", 0.8, "e0001")]
    assert [round(i.vs_baseline, 6) for i in items] == [-0.2, -0.1]


def test_accepting_the_best_brings_its_kept_parent_and_commits_only_train_py(night, repo):  # noqa: F811
    result = review(night, input="a\n")
    assert result.exit_code == 0, result.output
    assert "set {'LR': 0.3}" in result.output and "+LR = 0.3" in result.output  # the card and its diff
    assert "accepted e0008 (with e0004)" in result.output and "committed" in result.output
    assert result.output.rstrip().endswith("end of the review queue.")  # e0004 went in with e0008
    assert (repo / "train.py").read_text() == (night.run_dir / "e0008" / "train.py").read_text()

    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["train.py"]
    message = git(repo, "log", "-1", "--format=%B")
    assert message.startswith("set {'LR': 0.3} (e0008)\n")
    assert "val_bpb 0.700000, -0.100000 vs parent e0004, -0.200000 vs baseline 0.900000" in message
    assert "e0004: set {'LR': 0.2}" in message and "Accepted from autoresearch night t." in message
    staged = git(repo, "status", "--porcelain", "--untracked-files=no").splitlines()
    assert staged == ["M  program.md"]  # still staged, not committed
    commit = git(repo, "rev-parse", "HEAD").strip()
    assert states(night, "e0008", "e0004") == [("accepted", f"commit {commit}"),
                                               ("accepted", f"commit {commit}; with e0008")]


def test_reject_skip_and_quit(night, repo):  # noqa: F811
    result = review(night, input="x\nr\nworse on my data\ns\n")
    assert result.exit_code == 0, result.output
    assert "rejected e0008" in result.output and "end of the review queue." in result.output
    assert states(night, "e0008", "e0004") == [("rejected", "worse on my data"), ("pending", None)]

    quit_early = review(night, input="q\n")
    assert "e0004" in quit_early.output and "end of the review queue" not in quit_early.output
    assert states(night, "e0004") == [("pending", None)]
    assert git(repo, "rev-list", "--count", "HEAD").strip() == "1"


def test_accept_one_by_one_from_a_script(night, repo):  # noqa: F811
    first = CliRunner().invoke(cli(), ["review", "--runs-dir", str(night.runs), "--train-py", str(repo / "train.py"),
                                       "accept", "e0004"])
    assert first.exit_code == 0 and first.output.startswith("accepted e0004: "), first.output
    second = review(night, "accept", "e0008")
    assert second.output.startswith("accepted e0008: ") and "(with" not in second.output
    assert git(repo, "log", "--format=%s").splitlines() == ["set {'LR': 0.3} (e0008)", "set {'LR': 0.2} (e0004)",
                                                            "start"]
    again = review(night, "accept", "e0008")
    assert again.output.startswith("accepted e0008: ") and "already holds this change" in again.output
    assert json_queue(night) == []


def json_queue(night):  # noqa: F811
    return json.loads(review(night, "--json").output)


def test_a_change_that_no_longer_applies_is_a_conflict(night, repo):  # noqa: F811
    edited = (repo / "train.py").read_text().replace("LR = 0.1", "LR = 0.15")
    (repo / "train.py").write_text(edited)
    error = one_line_error(review(night, "accept", "e0004"))
    assert "e0004 does not apply to" in error and "`autoresearch show e0004`" in error
    assert (repo / "train.py").read_text() == edited
    assert states(night, "e0004") == [("pending", None)]
    interactive = review(night, input="a\nq\n")
    assert "conflict: e0008 does not apply" in interactive.output  # the best one first, then quit


def test_a_change_on_top_of_a_rejected_one_cannot_go_in_alone(night, repo):  # noqa: F811
    assert invoke(night.runs, "review", "reject", "e0004", "--why", "too aggressive").output == "rejected e0004\n"
    error = one_line_error(review(night, "accept", "e0008"))
    assert "e0008 builds on e0004" in error and "you rejected it" in error
    assert states(night, "e0004", "e0008") == [("rejected", "too aggressive"), ("pending", None)]


def test_only_kept_changes_are_reviewed(night):  # noqa: F811
    assert "only kept changes are reviewed" in one_line_error(invoke(night.runs, "review", "reject", "e0005"))
    assert "only kept changes are reviewed" in one_line_error(review(night, "accept", "e0006"))


def test_outside_git_train_py_is_updated_without_a_commit(night):  # noqa: F811
    result = review(night, "accept", "e0004")
    assert result.exit_code == 0 and "not a git work tree, nothing committed" in result.output
    assert "LR = 0.2" in (night.project / "train.py").read_text()
    assert states(night, "e0004") == [("accepted", "")]


def test_a_failing_commit_is_one_line_and_train_py_keeps_the_change(night, repo):  # noqa: F811
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'refused by policy' >&2\nexit 1\n")
    hook.chmod(0o755)
    error = one_line_error(review(night, "accept", "e0004"))
    assert "e0004 was applied to" in error and "git commit failed: refused by policy" in error
    assert "LR = 0.2" in (repo / "train.py").read_text()
    assert states(night, "e0004") == [("accepted", "applied; git commit failed")]


def test_a_missing_train_py_is_one_line(night, tmp_path):  # noqa: F811
    result = invoke(night.runs, "review", "accept", "e0004", "--train-py", str(tmp_path / "none.py"))
    assert "there is no train.py at" in one_line_error(result)
