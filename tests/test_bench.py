"""The harness on a two-method micro sweep: table, plots, cache and resume."""

from pathlib import Path

import pytest

from fedsplitkd.bench import main

ROOT = Path(__file__).resolve().parents[1]
MICRO = """
devices: 3
target_accuracy: 0.15
run_config: {num-rounds: 2, learning-rate: 0.05, teacher-epochs: 10}
datasets: {digits: {dataset: digits}}
partitions: {iid: {partition: iid}}
methods: {splitkd: {}, fedavg: {}}
seeds: [0]
"""


def test_micro_sweep_writes_table_and_plots_then_resumes(tmp_path, capsys):
    sweep = tmp_path / "micro.yaml"
    sweep.write_text(MICRO)
    out = tmp_path / "out"
    main([str(sweep), "--out", str(out), "--app", str(ROOT)])
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("dataset,partition,method,seeds,final_accuracy")
    assert {line.split(",")[2] for line in lines[1:]} == {"splitkd", "fedavg"}
    table = (out / "summary.md").read_text()
    assert "| digits | iid | splitkd |" in table and "| digits | iid | fedavg |" in table
    assert len(list((out / "plots").glob("digits_iid_accuracy_vs_*.png"))) == 3
    assert "2 runs (0 cached)" in capsys.readouterr().out

    main([str(sweep), "--out", str(out), "--app", str(ROOT)])  # finished runs are not run again
    assert "2 runs (2 cached)" in capsys.readouterr().out
    (summary,) = [p for p in (out / "runs").glob("*/summary.json") if '"fedavg"' in p.read_text()]
    summary.unlink()  # as if the sweep had been interrupted in this run
    main([str(sweep), "--out", str(out), "--app", str(ROOT)])
    assert "2 runs (1 cached)" in capsys.readouterr().out


def test_a_bad_sweep_stops_before_running(tmp_path):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(MICRO.replace("methods: {splitkd: {}, fedavg: {}}", "methods: {splitkd: {kd-alpha: 3}}"))
    with pytest.raises(SystemExit, match="digits/iid/splitkd: run-config 'kd-alpha' = 3"):
        main([str(sweep), "--out", str(tmp_path / "out")])
