"""What each run-config key means, and the files generated from the schema (``config.SECTIONS``):
the run-config reference (docs/run-config.md) and pyproject.toml's ``[tool.flwr.app.config]``
table, which Flower reads. ``python -m fedsplitkd.config_docs`` writes both; tests keep them in step."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

MEANING: dict[str, str] = {
    'method': 'see [Methods](benchmarks.md)',
    'proximal-mu': "FedProx's proximal weight",
    'distill-steps': "FedDF's server-side distillation steps per round",
    'server-epochs': "FedGKT's server epochs over the devices' features per round",
    'dataset': 'see [Datasets](datasets.md)',
    'data-path': "the dataset's file or directory (`''` = its default source)",
    'label-column': 'the label column of a CSV',
    'seq-len': 'Shakespeare: characters per window, and between window starts',
    'grad-clip': 'every method: scale each step\'s gradient (of a split part, or of a whole model) down to this L2 norm; 0 = no clipping. Bounds the step that KD towards a confident teacher can take',
    'text-stride': 'Shakespeare: characters per window, and between window starts',
    'train-samples': 'use a fixed random subset of this many training samples (the same for every run and seed; drawn before the public, holdout and device splits); 0 = all',
    'partition': "`iid`, `dirichlet`, `pathological` (k classes per device) or `natural` (the dataset's own ids)",
    'dirichlet-alpha': 'label skew of the Dirichlet partition',
    'classes-per-device': 'k of the pathological partition',
    'public-fraction': 'training data held by the server for the teacher, removed from the devices',
    'holdout-fraction': 'training data the server holds out for model selection (`holdout_accuracy` in metrics.csv); no device and no teacher sees it',
    'val-fraction': "each device's local validation split",
    'seed': 'seeds partitions, batch order, initialisation and sampling',
    'num-rounds': 'rounds',
    'fraction-train': 'fraction of nodes sampled per round',
    'fraction-evaluate': 'fraction of nodes doing split evaluation on their validation split each round (0 = off; the server always evaluates on the test split)',
    'virtual-devices': '`0`: one node per device (its `partition-id`); N: a fleet of N devices, the devices sampled each round dealt round-robin to the connected nodes, each node serving its share in one message per exchange: cohorts far larger than the nodes, and far fewer messages than devices (all methods but `local`, `fd`, `fedgkt`)',
    'min-nodes': 'nodes that must be connected before a round starts; `0` waits once (up to `round-timeout`) for every device the nodes declare (`num-partitions`)',
    'evaluate-every': "test and holdout accuracy every N-th round, round 0 and the last (the other rounds' rows read NaN there); training is the same. For the methods with a model per device (`local`, `fd`, `fedgkt`), where every device tests its own model, that is most of a round's time on a large test set",
    'batch-size': 'device minibatch',
    'local-epochs': 'passes over the local data per round',
    'exchange-batches': 'minibatches whose activations travel in one message (see below)',
    'server-batching': '`per-device`: one server step per device minibatch, device after device; `joint`: one step over minibatch j of all devices (CPSL); `interleaved`: one step per device minibatch, minibatch j of every device before minibatch j + 1 of any (waits for the exchange, as joint does)',
    'learning-rate': 'SGD learning rate, device and server parts (the default learns on every built-in dataset; tune it per dataset)',
    'lr-schedule': "`cosine`: round r trains at `learning-rate` × (1 + cos(π (r − 1) / num-rounds)) / 2, on devices and server (every method's SGD), so the last rounds settle; a resumed cosine run keeps its `num-rounds`",
    'momentum': 'SGD momentum, device and server parts',
    'kd-alpha': 'α of the loss `α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE`; α = 0 is plain split learning (default tuned on digits)',
    'kd-temperature': 'T of that loss (default tuned on digits)',
    'kd-feature-weight': "β of a feature term added to that loss: β·‖P s / ‖P s‖ − t / ‖t‖‖², s the student's features and t the frozen teacher's (each the input of its last `nn.Linear`, averaged over positions), P a linear map the server trains with its part and never sends; 0 = off. Split-KD with kd-mode standard; see docs/protocol.md",
    'kd-mode': "`mutual`: deep mutual learning, the server's teacher also trains each step (split-KD with `teacher-input = embedding`)",
    'teacher-input': "`embedding`: the device runs the teacher's frozen first block and uploads its output every round (as in the paper); `cached`: that output is uploaded once per sample, the server caches the teacher's logits by sample id (the same training, far fewer bytes and teacher passes); `auto`: `cached` where it can serve (no `virtual-devices`, `kd-mode` standard, no checkpoints: a checkpoint does not keep the server's cache), else `embedding`",
    'teacher-cut': "the teacher's blocks up to this one run on the device and its output goes up (`default`: the first block, its embedding); a deeper cut costs the device compute and, past a downsampling block, uploads fewer bytes a sample (the ResNets: `layer2_0` halves the stem's 16 x 32 x 32, `layer3_0` quarters it); both priced by the cost model. See docs/protocol.md for what each reveals",
    'teacher-path': 'load the teacher from this file instead of training it: our state dict, or a published CIFAR ResNet checkpoint (`{"state_dict"}` with `module.` keys) for `teacher-model`; a file that does not fit is refused naming it',
    'teacher-model': 'a published pre-trained CIFAR ResNet as the frozen teacher (its stem is the devices\' embedding; never trained further); `auto` = `resnet56` for `cifar10`, else the zoo\'s larger model trained on the public split. Weights from `teacher-path`, else downloaded from the release (sha256-checked, cached)',
    'teacher-cache-dir': 'where trained teachers are cached, keyed by architecture, public data and training settings (default `~/.cache/fedsplitkd/teachers`, or `$FEDSPLITKD_CACHE/teachers`)',
    'teacher-epochs': 'teacher training on the public split: epochs of Adam with a cosine rate, on augmented batches (images only: 1-pixel shift and noise)',
    'teacher-augment': 'teacher training on the public split: epochs of Adam with a cosine rate, on augmented batches (images only: 1-pixel shift and noise)',
    'student-model': '`mlp`, `cnn1d`, `cnn2d`, `lenet` (LeNet-5), `gpt`; `auto` picks from the feature shape (flat, (C, L), (C, H, W): LeNet-5 from 28x28, else the small 2-D CNN), a char CNN for token windows, `gpt` for a label per position',
    'student-width': 'multiplies the built-in student\'s channels and units (LeNet-5 at 2: 245 k parameters on CIFAR-10, 4x its FLOPs after the first block); not the GPT (`gpt-student`) or `hf-student`',
    'gpt-student': 'GPT sizes, layers x width x heads',
    'gpt-teacher': 'GPT sizes, layers x width x heads',
    'torch-device': "the server's torch device (student, teacher, evaluation): `cpu`, `cuda` or `auto`; devices and payloads stay on the CPU",
    'precision': "`fp32`, or `bf16`: the server's forward passes (student upper part, teacher) under bf16 autocast on its torch device; weights, optimizer, loss and payloads stay float32",
    'compile': "`torch.compile` the server's student part and teacher (the first steps at each cut compile; worth it on a GPU over many rounds)",
    'hf-student': 'a local Hugging Face checkpoint directory instead of the built-in GPT (extra `hf`); the teacher is used as trained',
    'hf-teacher': 'a local Hugging Face checkpoint directory instead of the built-in GPT (extra `hf`); the teacher is used as trained',
    'cut': "cut point: a block name of the student (`default` = after its first block), or `adaptive` (per cluster, from the cost model), or `per-device` (ASL: each device its own cut from its own cost at an equal share of the band; a cluster's devices then train in parallel at their cuts, and a block some hold and the server trains for others is the sample-weighted average of their copies and the server's)",
    'clusters': "`'1'` (no clustering), `'auto'` (k-means, k by silhouette) or a number of clusters",
    'cluster-features': 'profile features k-means sees (standardised)',
    'recluster-every': 're-cluster (and re-choose cuts) every R rounds, so drifting profiles move devices (0 = once)',
    'energy-weight': "seconds one joule is worth in the adaptive cut's objective `delay + w * energy`",
    'power-allocation': "`max` (every device transmits at its profile's `tx_power_w`) or `least-energy` (a device that would finish before the round's slowest device transmits at the least power that has it done then, no later than `deadline-s`, and min-max bandwidth counts the energy that saves; needs `bandwidth-allocation` `equal` or `minmax`)",
    'server-allocation': "`after-all` (the server starts once the slowest device of a group is ready, then serves them all) or `pipelined` (it steps each device as soon as that device is ready, as the edge server does): the cost model's round delay",
    'energy-control': "adaptive cut and devices' per-round energy budgets: `budget` (a cut that exceeds a device's budget in a round is infeasible) or `lyapunov` (ASL's energy-deficit queue: a device may exceed its budget in a round, the cut minimises `lyapunov-v` × delay + Σ queue × energy each round, min-max bandwidth keeps each device the band for its budget less its queue spread over the rounds left that it is expected to train in (`fraction-train` of them), and the queues keep each device within budget on average)",
    'lyapunov-v': "with `energy-control = lyapunov`: the weight of delay (in units of the best cut's) against the queues (budgets owed × budgets spent): larger, faster rounds and a longer way back to the budget",
    'bandwidth-allocation': "`dedicated` (each device its own link), `equal` (the edge's spectrum split evenly among the devices served at once) or `minmax` (split to minimise the slowest device's time, each device keeping the band its per-round energy budget needs; with `energy-control = lyapunov` its budget less its energy deficit spread over the rounds left that it is expected to train in)",
    'device-classes': "YAML of device classes and the edge server (`''` = the bundled `fedsplitkd/fleet/device_classes.yaml`)",
    'class-mix': "e.g. `'mcu:1,raspberry_pi:2'` (`''` = every class alike)",
    'profile-jitter': "each device's compute, energy per FLOP, bandwidths and distance scaled by U(1 − j, 1 + j)",
    'profile-file': 'a CSV with one profile per device (partition order) instead of sampling',
    'fading': 'Rayleigh fading on every link, redrawn each round',
    'deadline-s': 'simulated-time deadline per round (0 = none)',
    'straggler-policy': "past the deadline: `wait`, or `drop` the device's part from the average",
    'device-threads': "torch threads of a ClientApp process (0 = torch's default)",
    'round-timeout': "seconds to wait for a device's reply",
    'dropout-rate': 'inject device failures: that fraction of the devices (drawn per round from the seed) fails at `forward` (before its forward pass), `backward` (after uploading activations, before applying gradients) or `evaluate`',
    'dropout-stage': 'inject device failures: that fraction of the devices (drawn per round from the seed) fails at `forward` (before its forward pass), `backward` (after uploading activations, before applying gradients) or `evaluate`',
    'checkpoint-every': 'write `checkpoint.pt` every N rounds and after the last (0 = never; split methods)',
    'resume': 'a run directory: continue that run from its checkpoint, writing into it',
    'output-dir': 'the directory that holds the run directories',
    'run-name': "this run's directory under `output-dir` (`''` = a timestamp)",
}


def _sections() -> list[tuple[str, type, list[str]]]:
    """Each section of the schema: its name, its dataclass and its run-config keys, in order."""
    from fedsplitkd.config import SECTIONS, WHERE

    return [(section, cls, [name for name, (s, _) in WHERE.items() if s == section])
            for section, cls in SECTIONS.items()]


def reference() -> str:
    """The run-config reference: a table per section, every key with its default, what it accepts and means."""
    from fedsplitkd.config import SCHEMA

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    parts = []
    for section, cls, names in _sections():
        rows = [f"### `{section}`: {cls.__doc__.strip()}", "", "| key | default | accepts | meaning |",
                "|---|---|---|---|"]
        rows += [f"| `{name}` | `{SCHEMA[name].default!r}` | {cell(SCHEMA[name].accepts)} | {cell(MEANING[name])} |"
                 for name in names]
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"


def flwr_table() -> str:
    """pyproject.toml's ``[tool.flwr.app.config]``: every key at its default, by section."""
    import json

    from fedsplitkd.config import SCHEMA

    lines = ["[tool.flwr.app.config]",
             "# Generated from fedsplitkd/config.py by `python -m fedsplitkd.config_docs`; do not edit here."]
    for section, _, names in _sections():
        lines.append(f"# {section}")
        for name in names:
            value = SCHEMA[name].default
            text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
            lines.append(f"{name} = {text}")
    return "\n".join(lines) + "\n"


def write_flwr_table(path: Path) -> None:
    """Replace pyproject.toml's ``[tool.flwr.app.config]`` table (its last) with the generated one."""
    text = path.read_text()
    head, marker, _ = text.partition("[tool.flwr.app.config]")
    if not marker:
        raise SystemExit(f"{path}: no [tool.flwr.app.config] table")
    path.write_text(head + flwr_table())


START, END = "<!-- run-config:reference -->", "<!-- /run-config:reference -->"


def write(path: Path) -> None:
    """Replace the table between the markers of ``path`` with the generated one."""
    text = path.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no '{START}' ... '{END}' markers")
    path.write_text(pattern.sub(lambda _: f"{START}\n{reference()}{END}", text))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the run-config reference and pyproject's run-config table")
    parser.add_argument("path", nargs="?", default="docs/run-config.md")
    parser.add_argument("--pyproject", default="pyproject.toml")
    args = parser.parse_args()
    write(Path(args.path))
    write_flwr_table(Path(args.pyproject))
