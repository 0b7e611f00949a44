"""The chart, the exports and the HTML report of a night recorded by the real loop."""

from __future__ import annotations

import base64
import dataclasses
import json
import re

import pytest

from runner import report
from runner.gpus import Gpu
from runner.ledger import Ledger
from tests.test_loop import change
from tests.test_morning import NIGHT_SCRIPT, invoke, night, project, record_night  # noqa: F401 (fixtures)

PNG = b"\x89PNG\r\n\x1a\n"


def open_ledger(recorded) -> Ledger:
    return Ledger(recorded.run_dir / "ledger.sqlite")


def test_the_chart_shows_kept_discarded_and_the_running_best(night):  # noqa: F811
    ledger = open_ledger(night)
    series = report.progress_series(ledger)
    ledger.close()
    assert series.baseline == [(1, 0.9), (2, 0.901), (3, 0.899)]
    assert series.kept == [(4, 0.8, "set {'LR': 0.2}"), (8, 0.7, "set {'LR': 0.3}")]
    assert [seq for seq, _ in series.discarded] == [5, 10]  # failures have no val_bpb to draw
    assert series.best == [(1, pytest.approx(0.9)), (4, 0.8), (8, 0.7), (10, 0.7)]

    result = invoke(night.runs, "plot")
    assert result.exit_code == 0 and result.output == f"wrote {night.run_dir / 'progress.png'}\n"
    assert (night.run_dir / "progress.png").read_bytes().startswith(PNG)
    chosen = night.runs.parent / "chart.png"
    assert invoke(night.runs, "plot", "--out", str(chosen)).exit_code == 0 and chosen.read_bytes().startswith(PNG)


def test_tsv_export_is_the_reference_format(night):  # noqa: F811
    lines = invoke(night.runs, "export", "--tsv").stdout.splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert lines[4:] == [
        "e0004\t0.800000\t0.0\tkeep\tset {'LR': 0.2}",
        "e0005\t0.799000\t0.0\tdiscard\tset {'LR': 0.201}",
        "e0006\t0.000000\t0.0\tcrash\tset {'BEHAVIOUR': 'crash'}",
        "e0008\t0.700000\t0.0\tkeep\tset {'LR': 0.3}",
        "e0009\t0.000000\t0.0\tcrash\tset {'BEHAVIOUR': 'no_export'}",
        lines[9],
    ]
    assert re.fullmatch(r"e0010\t0\.7[0-9]{5}\t0\.0\tdiscard\tset \{'LR': 0\.25, 'BEHAVIOUR': 'noisy'\}", lines[9])


def test_json_export_holds_every_column_and_the_settings(night):  # noqa: F811
    out = night.runs.parent / "night.json"
    assert invoke(night.runs, "export", "--json", "--out", str(out)).output == f"wrote {out}\n"
    data = json.loads(out.read_text())
    assert data["tag"] == "t" and data["nights"][0]["settings"]["rule"] == {"k": 2.0, "min_delta": 0.001,
                                                                           "confirm": False}
    assert data["nights"][0]["sigma"] == pytest.approx(0.001)
    rows = {r["id"]: r for r in data["experiments"]}
    assert len(rows) == 10 and rows["e0008"]["parent_id"] == "e0004" and "+LR = 0.3" in rows["e0008"]["diff"]
    assert rows["e0007"]["reject_reason"] and "RuntimeError: shape mismatch" in rows["e0006"]["log_tail"]


def test_the_html_report_is_self_contained_and_complete(night):  # noqa: F811
    assert invoke(night.runs, "report").exit_code == 0
    page = (night.run_dir / "report.html").read_text()
    chart = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert chart and base64.b64decode(chart[1]).startswith(PNG)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    # figures: noise, thresholds, throughput
    for text in ("noise σ", "0.001000", "keep threshold", "0.002000", "experiments / hour", "duty cycle", "MFU"):
        assert text in page, text
    # kept changes with their coloured diffs
    assert '<span class="add">+LR = 0.3</span>' in page and '<span class="del">-LR = 0.2</span>' in page
    assert "<td>e0008</td><td class=n>0.700000</td><td class=n>-0.100000</td><td class=n>-0.200000</td>" in page
    # failures grouped by status, with their log tails
    assert "<h3>crash (1)</h3>" in page and "<h3>export_failed (1)</h3>" in page
    assert "RuntimeError: shape mismatch in attention" in page


def test_the_report_escapes_what_the_agent_wrote(project):  # noqa: F811
    def sly(context):
        return dataclasses.replace(change(LR=0.2)(context), description='<script>alert("x")</script> & more')

    recorded = record_night(project, script=(sly,))
    assert invoke(recorded.runs, "report").exit_code == 0
    page = (recorded.run_dir / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page


def test_duty_cycle_counts_every_gpu_of_the_night(project):  # noqa: F811
    gpus = [Gpu(0, "GPU-a", "Fake H100", "580.1"), Gpu(1, "GPU-b", "Fake H100", "580.1")]
    recorded = record_night(project, script=NIGHT_SCRIPT[:2], gpus=gpus)
    ledger = open_ledger(recorded)
    fig = report.figures(ledger, recorded.run_dir)
    ledger.close()
    assert (fig.slots, fig.training_seconds) == (2, 5.0)  # three baselines and two experiments
    assert fig.duty_cycle == pytest.approx(5.0 / (fig.wall_seconds * 2))
