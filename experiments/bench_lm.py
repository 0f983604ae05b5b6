"""Language-model split-KD against splitfed and fedavg on Shakespeare's speaking roles.

Same data, devices (natural partition by role), student, rounds and seed for every method;
all in one process (the math of the Flower run, without its messages). Prints, per
method, held-out bits per character after the last round, bytes uploaded per training
token, training tokens/s and model FLOPs utilisation (the model FLOPs the method needs
per second over --peak-tflops; 'n/a' without it). For the split methods it also times the
edge's split-KD step alone (the server part's forward and backward and the teacher's
forward, where ``precision`` and ``compile`` act) and prints its TFLOP/s and MFU.
``--edge-steps N`` times that step alone on random token batches of the joint size
(exchange-batches x batch-size samples, cut-layer payloads as numpy, as the protocol hands
them over), without training a teacher or running devices: the step's FLOPs do not depend
on the weights.

    python experiments/bench_lm.py --data-path ../shared/datasets/tiny_shakespeare.txt
    python experiments/bench_lm.py --data-path ... --device cuda --preset gpu --peak-tflops 989 \
        --methods splitkd --precision bf16 --compile
    python experiments/bench_lm.py --data-path ... --device cuda --preset gpu --peak-tflops 989 \
        --edge-steps 30 --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time

import numpy as np
import torch

from fedsplitkd import config as config_lib
from fedsplitkd.data.datasets import device_data
from fedsplitkd.protocol.device import device_setup
from fedsplitkd.run.experiment import build
from fedsplitkd.models.gpt import train_flops_per_token
from fedsplitkd.training.local import train_whole
from fedsplitkd.protocol.runtime import load_numpy_state, state_to_numpy
from fedsplitkd.protocol.rounds import InProcessTransport, sample_devices
from fedsplitkd.protocol.server import average

PRESETS = {  # sizes that fit ~5 minutes on 2 CPU cores, and a larger case for a GPU
    "cpu": {"seq-len": 32, "text-stride": 512, "gpt-student": "2x64x4", "gpt-teacher": "4x128x4",
            "batch-size": 16, "teacher-epochs": 6, "public-fraction": 0.2},
    "gpu": {"seq-len": 256, "text-stride": 64, "gpt-student": "6x512x8", "gpt-teacher": "12x1024x16",
            "batch-size": 64, "teacher-epochs": 4, "public-fraction": 0.2, "exchange-batches": 8,
            "server-batching": "joint"},
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, seconds: list[float]):
    """``fn``, adding its wall time (the device synchronised) to ``seconds[0]``."""
    def run(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        seconds[0] += time.perf_counter() - start
        return out
    return run


def run_split(cfg: dict, devices: int) -> tuple[list[float], int, int, float, tuple[float, float]]:
    """splitkd / splitfed rounds: held-out losses per round, bytes up, tokens, training seconds,
    and the edge's step alone: its seconds and FLOPs."""
    exp = build(config_lib.resolve(cfg))
    edge, edge_seconds = exp.server.edge, [0.0]
    edge.train_step = timed(edge.train_step, cfg["torch-device"], edge_seconds)
    edge.teacher_logits = timed(edge.teacher_logits, cfg["torch-device"], edge_seconds)
    split = exp.server.flops  # forward FLOPs per sample of the server part and the teacher's rest
    edge_flops = 0.0
    transport = InProcessTransport({i: device_setup(exp.cfg, i, devices) for i in range(devices)})
    exp.scheduler.fleet_size = devices
    rng = np.random.default_rng([exp.cfg["seed"], 0])  # the train-sampling stream of SplitKD
    losses, up, tokens, seconds = [exp.evaluate()[1]], 0, 0, 0.0
    for server_round in range(1, cfg["num-rounds"] + 1):
        sync(cfg["torch-device"])
        start = time.perf_counter()
        stats = exp.scheduler.run_round(transport, sample_devices(list(range(devices)), 1.0, rng), server_round)
        sync(cfg["torch-device"])
        seconds += time.perf_counter() - start
        up, tokens = up + stats.bytes_up, tokens + stats.samples * cfg["seq-len"]
        edge_flops += stats.samples * (3 * split.server + split.teacher_server)  # no teacher: 0
        losses.append(exp.evaluate()[1])
    return losses, up, tokens, seconds, (edge_seconds[0], edge_flops)


def run_fedavg(cfg: dict, devices: int) -> tuple[list[float], int, int, float]:
    """FedAvg rounds on the whole student (every device trains a copy on the server's torch
    device here; a real device would on its own): the arithmetic of Flower's FedAvg."""
    exp = build(config_lib.resolve({**cfg, "kd-alpha": 0.0}))
    data = [device_data(exp.cfg, i, devices) for i in range(devices)]
    weights_bytes = sum(v.nbytes for v in state_to_numpy(exp.student).values())
    losses, up, tokens, seconds = [exp.evaluate()[1]], 0, 0, 0.0
    for server_round in range(1, cfg["num-rounds"] + 1):
        sync(cfg["torch-device"])
        start = time.perf_counter()
        parts = []
        for i, local in enumerate(data):
            model = copy.deepcopy(exp.student)
            samples, _ = train_whole(model, local, exp.cfg, server_round, i)
            parts.append((state_to_numpy(model), samples))
            tokens += samples * cfg["seq-len"]
        load_numpy_state(exp.student, average([w for w, _ in parts], [n for _, n in parts]))
        sync(cfg["torch-device"])
        seconds += time.perf_counter() - start
        up += weights_bytes * devices
        losses.append(exp.evaluate()[1])
    return losses, up, tokens, seconds, (0.0, 0.0)


def run_edge(cfg: dict, steps: int, warmup: int = 3, profile: bool = False) -> tuple[float, float, float, int]:
    """The edge's split-KD step alone on random tokens: seconds per step (median), FLOPs per
    step, the seconds of its payloads' copies alone (activations and teacher embeddings to
    the torch device, gradients back; median) and tokens per step."""
    from fedsplitkd.data.datasets import load_dataset
    from fedsplitkd.models.zoo import student_for, teacher_for
    from fedsplitkd.protocol.runtime import torch_device
    from fedsplitkd.protocol.server import SplitKDServer

    resolved = config_lib.resolve(cfg)
    dataset = load_dataset(resolved)
    torch_dev = torch_device(resolved.model.torch_device)
    student = student_for(resolved, dataset).to(torch_dev)
    teacher = teacher_for(resolved, dataset).to(torch_dev)
    server = SplitKDServer(student, teacher, resolved, dataset.num_classes)
    edge, devices = server.edge, resolved.split.exchange_batches
    batch, context = resolved.train.batch_size, cfg["seq-len"]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, dataset.num_classes, (devices * batch, context), generator=generator)
    with torch.no_grad():  # the payloads: the devices' cut-layer activations and teacher embeddings
        acts = server.device_part(tokens.to(torch_dev)).float().cpu().numpy()
        emb = teacher.device_part(teacher.cut_points[0])(tokens.to(torch_dev)).float().cpu().numpy()
    labels = torch.randint(0, dataset.num_classes, tokens.shape, generator=generator).numpy()
    def step() -> None:  # the teacher on one device's chunk; a minibatch per device, joined
        logits = edge.teacher_logits(emb)
        edge.train_step(np.split(acts, devices), np.split(labels, devices), np.split(logits, devices))
        sync(cfg["torch-device"])

    times, copies = [], []
    for _ in range(warmup + steps):
        sync(cfg["torch-device"])
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        start = time.perf_counter()  # the same bytes over and back, alone
        over = [torch.from_numpy(a).to(torch_dev) for a in (acts, emb)]
        over[0].cpu()
        sync(cfg["torch-device"])
        copies.append(time.perf_counter() - start)
    if profile:  # one more step under torch's profiler: where its time goes, by operator
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if torch_dev.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            step()
        sort = "cuda_time_total" if torch_dev.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25), flush=True)
    flops = len(tokens) * (3 * server.flops.server + server.flops.teacher_server)
    return float(np.median(times[warmup:])), flops, float(np.median(copies[warmup:])), tokens.numel()


def model_flops_per_token(cfg: dict, method: str) -> float:
    """Training FLOPs of the student per token, plus the teacher's forward (a third of its
    training FLOPs) where KD needs it."""
    from fedsplitkd.data.datasets import load_dataset
    from fedsplitkd.models.zoo import student_for, teacher_for

    resolved = config_lib.resolve(cfg)
    dataset = load_dataset(resolved)
    flops = train_flops_per_token(student_for(resolved, dataset), cfg["seq-len"])
    if method == "splitkd":
        flops += train_flops_per_token(teacher_for(resolved, dataset), cfg["seq-len"]) / 3
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="the Tiny Shakespeare text file")
    parser.add_argument("--devices", type=int, default=50, help="devices (speaking roles merged into them)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="the server's torch device")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--methods", nargs="+", default=["splitkd", "splitfed", "fedavg"],
                        choices=["splitkd", "splitfed", "fedavg"])
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the accelerator's peak dense TFLOP/s for the dtype in use (e.g. 989 for an H200's "
                             "BF16, 495 for TF32); 0 = MFU n/a")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the edge's autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the edge's student part and teacher")
    parser.add_argument("--edge-steps", type=int, default=0,
                        help="time the edge's split-KD step alone for this many steps (no teacher training, no devices)")
    parser.add_argument("--profile", action="store_true", help="with --edge-steps: profile one more step")
    parser.add_argument("set", nargs="*", help="extra run-config key=value overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    base = {"dataset": "shakespeare-lm", "data-path": args.data_path, "partition": "natural",
            "num-rounds": args.rounds, "learning-rate": args.learning_rate, "torch-device": device,
            "teacher-cache-dir": tempfile.mkdtemp(prefix="fedsplitkd-lm-teacher-"), **PRESETS[args.preset],
            "precision": args.precision, "compile": args.compile}
    for item in args.set:
        key, _, value = item.partition("=")
        kind = type(config_lib.DEFAULTS.get(key, ""))
        base[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    config_lib.resolve(base)  # a bad key or value stops here, naming it
    if args.edge_steps:
        seconds, flops, copies, tokens = run_edge({**base, "method": "splitkd"}, args.edge_steps,
                                                profile=args.profile)
        rate = flops / seconds / 1e12
        mfu = f"{100 * rate / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a"
        print(f"edge step alone, {tokens} tokens/step, student {base['gpt-student']}, teacher "
              f"{base['gpt-teacher']}, device {device}, precision {args.precision}"
              f"{', compiled' if args.compile else ''}: {1000 * seconds:.1f} ms/step, {tokens / seconds:.0f} "
              f"tokens/s, {rate:.2f} TFLOP/s, MFU {mfu}; its payload copies alone {1000 * copies:.1f} ms"
              + (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""))
        return
    print(f"Shakespeare LM, {args.devices} role devices, {args.rounds} rounds, device {device}, "
          f"student {base['gpt-student']}, teacher {base['gpt-teacher']}, context {base['seq-len']}, "
          f"edge precision {args.precision}{', compiled' if args.compile else ''}")
    header = (f"{'method':>9} {'bpc r0':>7} {'bpc':>7} {'bytes up/token':>14} {'tokens/s':>9} "
              f"{'TFLOP/s':>8} {'MFU':>6} {'train s':>8} {'total s':>8} {'edge s':>7} {'edge TFLOP/s':>12} "
              f"{'edge MFU':>8}")
    results = []
    for method in args.methods:
        cfg = {**base, "method": method}
        started = time.perf_counter()
        runner = run_fedavg if method == "fedavg" else run_split
        losses, up, tokens, seconds, (edge_seconds, edge_flops) = runner(cfg, args.devices)
        total = time.perf_counter() - started
        rate = tokens / seconds
        achieved = rate * model_flops_per_token(cfg, method) / 1e12
        mfu = f"{100 * achieved / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a"
        edge_rate = edge_flops / edge_seconds / 1e12 if edge_seconds else 0.0
        edge_mfu = f"{100 * edge_rate / args.peak_tflops:.1f}%" if args.peak_tflops and edge_seconds else "n/a"
        edge = f"{edge_seconds:>7.1f} {edge_rate:>12.4f} {edge_mfu:>8}" if edge_seconds else f"{'-':>7} {'-':>12} {'-':>8}"
        results.append(f"{method:>9} {losses[0] / math.log(2):>7.3f} {losses[-1] / math.log(2):>7.3f} "
                       f"{up / tokens:>14.1f} {rate:>9.0f} {achieved:>8.4f} {mfu:>6} {seconds:>8.1f} {total:>8.1f} "
                       f"{edge}")
        print(f"{method}: held-out bpc by round {[round(x / math.log(2), 3) for x in losses]}", flush=True)
    print(header)
    print("\n".join(results))


if __name__ == "__main__":
    main()
