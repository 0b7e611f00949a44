"""The chart, the exports and the HTML report of a night recorded by the real loop."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
import types

import pytest

from runner.core import figures
from runner.core.gpus import Gpu
from runner.core.ledger import Ledger
from runner.morning import report
from tests.doubles import change
from tests.recorded_night import BASELINES, NIGHT_SCRIPT, NOISE, invoke, record_night, rows_of

PNG = b"\x89PNG\r\n\x1a\n"


def open_ledger(recorded) -> Ledger:
    return Ledger(recorded.run_dir / "ledger.sqlite")


def test_the_chart_shows_kept_discarded_and_the_running_best(night):
    ledger = open_ledger(night)
    series = report.progress_series(ledger)
    ledger.close()
    seq = {name: int(i[1:]) for name, i in night.ids.items()}
    assert series.baseline == [(1, 0.9), (2, 0.901), (3, 0.899), (4, pytest.approx(0.9005))]
    assert series.kept == [(seq["first"], 0.8, "set {'LR': 0.2}"), (seq["best"], 0.7, "set {'LR': 0.3}")]
    assert [s for s, _ in series.discarded] == [seq["unproven"], seq["noisy"]]  # failures have no val_bpb to draw
    assert series.best == [(1, pytest.approx(0.900125)), (seq["first"], pytest.approx(0.8005)),
                           (seq["best"], pytest.approx(0.7005)), (seq["noisy"], pytest.approx(0.7005))]

    result = invoke(night.runs, "plot")
    assert result.exit_code == 0 and result.output == f"wrote {night.run_dir / 'progress.png'}\n"
    assert (night.run_dir / "progress.png").read_bytes().startswith(PNG)
    chosen = night.runs.parent / "chart.png"
    assert invoke(night.runs, "plot", "--out", str(chosen)).exit_code == 0 and chosen.read_bytes().startswith(PNG)


def test_tsv_export_is_the_reference_format(night):
    ids = night.ids
    lines = invoke(night.runs, "export", "--tsv").stdout.splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert lines[5:] == [  # confirmation runs are not experiments of their own: left out
        f"{ids['first']}\t0.800000\t0.0\tkeep\tset {{'LR': 0.2}}",
        f"{ids['unproven']}\t0.798000\t0.0\tdiscard\tset {{'LR': 0.2, 'LUCK': 0.002}}",
        f"{ids['crash']}\t0.000000\t0.0\tcrash\tset {{'BEHAVIOUR': 'crash'}}",
        f"{ids['best']}\t0.700000\t0.0\tkeep\tset {{'LR': 0.3}}",
        f"{ids['no_export']}\t0.000000\t0.0\tcrash\tset {{'BEHAVIOUR': 'no_export'}}",
        lines[10],
    ]
    assert re.fullmatch(rf"{ids['noisy']}\t0\.7[0-9]{{5}}\t0\.0\tdiscard\tset \{{'LR': 0\.25, 'BEHAVIOUR': 'noisy'\}}",
                        lines[10])


def test_json_export_holds_every_column_and_the_settings(night):
    out = night.runs.parent / "night.json"
    assert invoke(night.runs, "export", "--json", "--out", str(out)).output == f"wrote {out}\n"
    data = json.loads(out.read_text())
    ids = night.ids
    assert data["tag"] == "t" and data["nights"][0]["settings"]["rule"] == {"alpha": 0.005, "max_runs": 4,
                                                                           "min_delta": 0.0, "paired_share": 0.8}
    assert (data["nights"][0]["sigma"], data["nights"][0]["noise_df"]) == (pytest.approx(NOISE.sigma), 3)
    rows = {r["id"]: r for r in data["experiments"]}
    assert len(rows) == 22 and rows[ids["best"]]["parent_id"] == ids["first"]
    assert "+LR = 0.3" in rows[ids["best"]]["diff"]
    assert rows[ids["rejected"]]["reject_reason"] and "RuntimeError: shape mismatch" in rows[ids["crash"]]["log_tail"]
    # the kept changes: the estimate each keep rested on, and what it cost
    first, best = data["kept"]
    # against the best of its window: the two reference runs of the baseline beside it
    assert (first["id"], first["runs"], first["best_runs"], first["runs_spent"]) == (ids["first"], 2, 2, 2)
    assert first["gain"] == pytest.approx(0.9005 - 0.8005) and first["low95"] < first["gain"] < first["high95"]
    assert (best["id"], best["val_bpb"], best["best_before"]) == (ids["best"], pytest.approx(0.7005),
                                                                  pytest.approx(0.8005))
    assert (best["low95"], best["high95"]) == (pytest.approx(0.097799, abs=1e-6), pytest.approx(0.102201, abs=1e-6))
    assert "autoresearch verify" in data["kept_note"]


def test_the_html_report_is_self_contained_and_complete(night):
    assert invoke(night.runs, "report").exit_code == 0
    page = (night.run_dir / "report.html").read_text()
    chart = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert chart and base64.b64decode(chart[1]).startswith(PNG)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    # figures: noise, the keep rule, throughput
    for text in ("noise σ", f"{NOISE.sigma:.6f} (df 3", "keep rule", "alpha 0.005", "at most 4 runs",
                 "what the night could see", "smallest gain kept with 80 % power now", "experiments / hour", "duty cycle", "MFU"):
        assert text in page, text
    # kept changes with their gain, interval and runs, the selection note once, and their coloured diffs
    assert '<span class="add">+LR = 0.3</span>' in page and '<span class="del">-LR = 0.2</span>' in page
    assert (f"<td>{night.ids['best']}</td><td class=n>0.700500</td><td class=n>+0.100000</td>"
            "<td class=n>[+0.097799, +0.102201]</td><td>2 runs against 2 of the best</td>"
            "<td class=n>-0.199625</td>") in page
    assert page.count(html.escape(report.SELECTION_NOTE)) == 1
    # failures grouped by status, with their log tails
    assert "<h3>crash (1)</h3>" in page and "<h3>export_failed (1)</h3>" in page
    assert "RuntimeError: shape mismatch in attention" in page


def test_the_report_escapes_what_the_agent_wrote(project):
    def sly(context):
        return dataclasses.replace(change(LR=0.2)(context), description='<script>alert("x")</script> & more')

    recorded = record_night(project, script=(sly,))
    assert invoke(recorded.runs, "report").exit_code == 0
    page = (recorded.run_dir / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page


def test_duty_cycle_counts_every_gpu_of_the_night(project):
    gpus = [Gpu(0, "GPU-a", "Fake H100", "580.1"), Gpu(1, "GPU-b", "Fake H100", "580.1")]
    recorded = record_night(project, script=NIGHT_SCRIPT[:2], gpus=gpus)
    ledger = open_ledger(recorded)
    fig = figures.figures(ledger, recorded.run_dir)
    ledger.close()
    trained = sum(r.training_seconds or 0 for r in rows_of(recorded))  # how many ran depends on the order they ended
    assert (fig.slots, fig.training_seconds) == (2, trained) and trained >= len(BASELINES) + 2
    assert fig.duty_cycle == pytest.approx(trained / (fig.wall_seconds * 2))


def test_a_kept_change_shows_the_runs_it_spent(project):
    recorded = record_night(project, script=(change(LR=0.2, SLOW="1"),))  # its first seed-1 run is disturbed
    assert invoke(recorded.runs, "report").exit_code == 0
    page = (recorded.run_dir / "report.html").read_text()
    assert "<td>2 runs (3 spent) against 2 of the best</td>" in page


def test_a_night_that_kept_nothing_says_what_it_could_have_seen():
    """"kept 0" means something only beside the smallest gain the rule would have kept: the smaller of the
    two figures (coupled, decoupled), with the course from the start of the experiments."""
    start = {"decided": 0, "unpaired": 0.05, "paired": None, "sigma_paired": None}
    now = {"decided": 6, "unpaired": 0.02, "paired": 0.004, "sigma_paired": 0.001}
    fig = types.SimpleNamespace(detectable=(start, now), counts={"kept": 0})
    lines = figures.seeing_lines(fig)
    assert lines[0] == ("smallest gain kept with 80 % power now: 0.004000 for a change that keeps the runs coupled "
                        "(paired spread 0.001000); 0.020000 for a change that decouples them")
    assert "at the start of the experiments 0.050000" in lines[1] and "after 6 decisions" in lines[1]
    assert lines[2].startswith("kept nothing:") and "about 0.004000 bpb at best" in lines[2]
    fig.counts = {"kept": 1}
    assert not any(line.startswith("kept nothing") for line in figures.seeing_lines(fig))
    assert figures.seeing_lines(types.SimpleNamespace(detectable=(), counts={"kept": 0})) == []
