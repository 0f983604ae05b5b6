"""The results contract: ``<output-dir>/<run-name>/`` with metrics.csv, summary.json,
config.yaml and the final student (device part, server part, merged).

Columns are only ever added; ``round, method, test_accuracy, test_loss, bytes_up,
bytes_down`` always lead.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fedsplitkd.config import resolve
from fedsplitkd.data.datasets import load_dataset
from fedsplitkd.models.zoo import SplitModel, student_for

LEADING_COLUMNS = ["round", "method", "test_accuracy", "test_loss", "bytes_up", "bytes_down"]
# Wall-clock seconds vary from run to run; they go to timings.csv so that metrics.csv is a
# pure function of the config and the seed.
TIMING_COLUMNS = ["wall_s", "transport_s", "server_s"]
ROUND_FILES = ("devices.csv", "dropped.csv")  # per-round detail rows, led by a round column


def run_dir(cfg) -> Path:
    name = cfg.output.run_name or time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.output_dir).expanduser() / name


class ResultsWriter:
    """Writes one run's results as they come, so a crash keeps every finished round."""

    def __init__(self, cfg, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(dict(cfg)), self.dir / "config.yaml")
        self.columns: list[str] | None = None
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        if self.columns is None:
            self.columns = LEADING_COLUMNS + [c for c in row if c not in LEADING_COLUMNS + TIMING_COLUMNS]
            for name, columns in (("metrics.csv", self.columns), ("timings.csv", ["round", *TIMING_COLUMNS])):
                with open(self.dir / name, "w", newline="") as f:
                    csv.writer(f).writerow(columns)
        with open(self.dir / "metrics.csv", "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])
        with open(self.dir / "timings.csv", "a", newline="") as f:
            csv.writer(f).writerow([row["round"], *(row.get(c, "") for c in TIMING_COLUMNS)])
        self.rows.append(row)

    def restart_from(self, rows: list[dict]) -> None:
        """Continue a run from a checkpoint: the files keep only the rounds in ``rows``."""
        last = rows[-1]["round"] if rows else -1
        self.columns, self.rows = None, []
        for row in rows:
            self.append(row)
        for name in ROUND_FILES:
            path = self.dir / name
            if path.exists():
                with open(path, newline="") as f:
                    kept = [r for r in csv.reader(f)]
                kept = kept[:1] + [r for r in kept[1:] if int(r[0]) <= last]
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(kept if len(kept) > 1 else [])

    def write_json(self, name: str, data) -> None:
        (self.dir / name).write_text(json.dumps(data, indent=1))

    def append_round_rows(self, name: str, server_round: int, rows: list[dict]) -> None:
        """Per-device rows of a round (costs to devices.csv, dropouts to dropped.csv)."""
        path = self.dir / name
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            for row in rows:
                writer = csv.DictWriter(f, fieldnames=["round", *row])
                if new:
                    writer.writeheader()
                    new = False
                writer.writerow({"round": server_round, **row})

    def finish(self, student: SplitModel, cut: str, extra: dict | None = None) -> dict:
        """Save the student in its parts and merged, and the summary of the last round."""
        torch.save(student.device_part(cut).state_dict(), self.dir / "student_device.pt")
        torch.save(student.server_part(cut).state_dict(), self.dir / "student_server.pt")
        torch.save(student.state_dict(), self.dir / "student.pt")
        # A self-contained program: torch.export.load(path).module() is a plain nn.Module
        # that runs without fedsplitkd installed.
        program = torch.export.export(student.eval(), (student.example_input(2),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, self.dir / "student.pt2")
        student.train()
        last = self.rows[-1] if self.rows else {}
        best = max((r["test_accuracy"] for r in self.rows if not math.isnan(r["test_accuracy"])), default=float("nan"))
        summary = {**last, "best_test_accuracy": best,
                   "total_bytes_up": sum(r["bytes_up"] for r in self.rows),
                   "total_bytes_down": sum(r["bytes_down"] for r in self.rows), **(extra or {})}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_accuracy(self.rows, self.dir)
        return summary


def plot_accuracy(rows: list[dict], directory: Path) -> None:
    """Test accuracy against simulated time and against cumulative device energy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method = rows[0]["method"] if rows else ""
    rows = [r for r in rows if not math.isnan(r["test_accuracy"])]  # the rounds evaluate-every tested
    for column, label, name in (("sim_time_s", "simulated time (s)", "accuracy_vs_time.png"),
                                ("cum_device_energy_j", "cumulative device energy (J)", "accuracy_vs_energy.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r.get(column, 0) for r in rows], [r["test_accuracy"] for r in rows], marker=".", label=method)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)


def load_student(directory: str | Path) -> SplitModel:
    """Rebuild the merged final student of a finished run, ready for inference."""
    directory = Path(directory)
    cfg = resolve(OmegaConf.to_container(OmegaConf.load(directory / "config.yaml")))
    dataset = load_dataset(cfg)
    student = student_for(cfg, dataset)
    student.load_state_dict(torch.load(directory / "student.pt", weights_only=True))
    return student.eval()
