"""What each teacher cut costs a device, per sample: the teacher blocks it runs, the bytes it
uploads, and the cost model's energy and time for one device of each bundled class.

    python experiments/teacher_cuts.py                      # ResNet-56, CIFAR-10 images
    python experiments/teacher_cuts.py --teacher resnet20 --all

Rows: `default` (the stem) and every block whose output differs in shape from the block
before (the stage boundaries), or every cut point with ``--all``. The teacher's logits are the
same at every cut; only what the device computes and sends changes (docs/protocol.md).
"""

from __future__ import annotations

import argparse

from fedsplitkd.fleet.costs import DeviceTraffic, SplitFlops, device_cost
from fedsplitkd.fleet.profiles import load_classes
from fedsplitkd.models.resnet import cifar_resnet


def rows(teacher_name: str, every_cut: bool) -> list[dict]:
    teacher = cifar_resnet(teacher_name, (3, 32, 32), 10)
    stats = teacher.block_stats()
    classes, server = load_classes()
    out, flops = [], 0.0
    for i, block in enumerate(stats[:-1]):
        flops += block.forward_flops
        boundary = i == 0 or block.out_shape != stats[i - 1].out_shape or stats[i + 1].out_shape != block.out_shape
        if not (every_cut or boundary):
            continue
        upload = 4 * block.activation_numel  # float32
        split = SplitFlops(device=0.0, server=0.0, teacher_device=flops, teacher_server=0.0)
        traffic = DeviceTraffic(bytes_up=upload, teacher_samples=1)
        costs = {name: device_cost(profile, server, split, traffic) for name, profile in classes.items()}
        out.append({"cut": "default" if i == 0 else block.name, "shape": block.out_shape, "kb": upload / 1024,
                    "mflops": flops / 1e6, **{name: (c.energy_j, c.time_s) for name, c in costs.items()}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--all", action="store_true", help="every cut point, not only the stage boundaries")
    args = parser.parse_args()
    table = rows(args.teacher, args.all)
    names = [k for k in table[0] if k not in ("cut", "shape", "kb", "mflops")]
    print("| teacher-cut | output | KB up | device MFLOPs | "
          + " | ".join(f"{n} mJ / ms" for n in names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for row in table:
        shape = " × ".join(map(str, row["shape"]))
        cells = " | ".join(f"{1e3 * row[n][0]:.3g} / {1e3 * row[n][1]:.3g}" for n in names)
        print(f"| `{row['cut']}` | {shape} | {row['kb']:.0f} | {row['mflops']:.1f} | {cells} |")


if __name__ == "__main__":
    main()
