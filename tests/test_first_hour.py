"""What a newcomer relies on in the first hour: --version, did-you-mean, cards that derive what the data set and
split determine, show-protocol, the device line, a one-run table that fits 100 columns, paper-ready PDFs."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from cilbench import __version__
from cilbench.data.protocol import PROTOCOL_DIR


def _card(tmp_path, drop=(), **changes):
    card = yaml.safe_load((PROTOCOL_DIR / "digits_b0s2.yaml").read_text())
    card["name"] = "digits_custom"
    for key in drop:
        card.pop(key, None)
    card.update(changes)
    path = tmp_path / "digits_custom.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def test_version(cli):
    res = cli("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"cilbench {__version__}"


@pytest.mark.parametrize("args, expected", [
    (["run", "-m", "dr", "-p", "digits_b0s2"], "unknown method 'dr' (did you mean 'der'?)"),
    (["run", "-m", "der", "-p", "digits_b0s3"], "unknown protocol 'digits_b0s3' (did you mean 'digits_b0s2'?)"),
    (["show-protocol", "digits_b0s2", "--set", "memory.totl=3"], "did you mean 'memory.total'?"),
    (["show-protocol", "digits_b0s2", "-m", "der", "--set", "der.aux_wieght=1"], "did you mean 'der.aux_weight'?"),
])
def test_did_you_mean(cli, error_line, args, expected):
    res = cli(*args)
    assert res.exit_code == 2
    assert expected in error_line(res)


def test_num_classes_and_tasks_are_derived(cli, tmp_path):
    res = cli("show-protocol", str(_card(tmp_path, drop=("num_classes", "tasks"))))
    assert res.exit_code == 0, res.output
    card = yaml.safe_load(res.stdout)
    assert card["num_classes"] == 10 and card["tasks"] == 5 and card["task_sizes"] == [2] * 5
    res = cli("show-protocol", str(_card(tmp_path, drop=("tasks",), base=4)))
    assert yaml.safe_load(res.stdout)["tasks"] == 4


@pytest.mark.parametrize("drop, changes, expected", [
    (("step",), {}, "missing key 'step'"),
    (("dataset",), {}, "missing key 'dataset'"),
    (("tasks",), {"step": 3}, "cannot be split"),
    ((), {"dataset": "digit"}, "did you mean 'digits'?"),
])
def test_a_card_that_does_not_determine_a_key_names_it(cli, error_line, tmp_path, drop, changes, expected):
    res = cli("show-protocol", str(_card(tmp_path, drop=drop, **changes)))
    assert res.exit_code == 2
    assert expected in error_line(res)


def test_show_protocol_with_a_method_and_overrides(cli):
    res = cli("show-protocol", "digits_b0s2", "--method", "der", "--set", "memory.total=100",
              "--set", "der.aux_weight=0.5")
    assert res.exit_code == 0, res.output
    card = yaml.safe_load(res.stdout)
    assert card["memory"] == {"policy": "fixed_total", "total": 100, "selection": "herding"}   # per_class, size: no
    assert "online" not in card and "methods" not in card
    assert card["method"] == "der" and card["method_config"]["aux_weight"] == 0.5
    assert sorted(card["class_order"]["classes"]) == list(range(10))
    online = yaml.safe_load(cli("show-protocol", "digits_online_b0s2").stdout)
    assert set(online["memory"]) == {"policy", "size"} and "online" in online


def test_help_has_an_example_and_no_type_noise(cli):
    for command in ("run", "sweep", "report", "show-protocol", "list", "bench", "download"):
        res = cli(command, "--help")
        assert res.exit_code == 0
        assert "Example: cilbench" in res.stdout, command
        assert not re.search(r"<(str|int|bool|float|list\[str\])>", res.stdout), command
        assert "--no-resume" not in res.stdout


def test_one_run_table_fits_100_columns_and_names_the_device(run_cli, tmp_path, capsys):
    from cilbench.report.summary import print_run_summary
    res = run_cli("finetune", "digits_b0s2", tmp_path, "--epochs", "1")
    assert res.exit_code == 0, res.output
    run = tmp_path / "digits_b0s2" / "finetune" / "seed0"
    assert json.loads((run / "manifest.json").read_text())["device_reason"] == "cpu (asked for)"
    capsys.readouterr()
    print_run_summary(run)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "Task" in out and "Seeds" not in out
    first_row = next(line for line in lines if line.startswith("│"))
    assert first_row.split("│")[1].strip() == "1"            # tasks are numbered from 1
    assert "device cpu (asked for)" in out                   # the Source, under the table


def test_pdfs_use_truetype_fonts_at_column_widths_without_titles(tmp_path):
    from cilbench.report import plots
    series = [plots.Series("A", [0, 1, 2], [99.0, 50.0, 1.0], [5.0, 5.0, 5.0], n=2),
              plots.Series("B", [0, 1, 2], [90.0, 60.0, 30.0], [1.0, 1.0, 1.0], n=2)]
    png = plots.plot_per_task(tmp_path / "x_per_task.png", "a title that stays out of the PDF", series)
    double, single = plots.pdf_paths(png)
    for pdf, width in ((double, 6.9), (single, 3.3)):
        data = pdf.read_bytes()
        assert b"/FontFile2" in data and b"/Type3" not in data           # TrueType (Type 42), no Type 3
        box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)", data)
        assert box and float(box.group(1)) == pytest.approx(width * 72)
        assert b"a title that stays out" not in data


def test_error_bars_stay_in_0_100_and_the_params_plot_needs_different_params():
    from cilbench.report import plots
    from cilbench.report.figures import params_differ
    assert plots.clip_err([99.0, 2.0], [5.0, 5.0]) == [[5.0, 2.0], [1.0, 5.0]]
    heads_apart = [plots.Point("a", 0.068, 90.0), plots.Point("b", 0.071, 91.0)]    # totals, one backbone
    assert not params_differ(heads_apart, backbone=False)
    assert params_differ(heads_apart + [plots.Point("c", 0.339, 95.0)], backbone=False)
    shared = [plots.Point("a", 0.064, 90.0), plots.Point("b", 0.064, 91.0)]         # backbone counts
    assert not params_differ(shared, backbone=True)
    assert params_differ(shared + [plots.Point("c", 0.13, 95.0)], backbone=True)
