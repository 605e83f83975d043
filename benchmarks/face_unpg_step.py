"""Time one training step with the UNPG loss against the plain margin head, side by side.

Both losses share one backbone configuration and one batch. The steps alternate (plain,
UNPG, plain, UNPG, ...) so that load from other processes hits both alike, and the
reported figure is the ratio of the median step times.

Usage::

    python benchmarks/face_unpg_step.py --backbone small_cnn --batch-size 64
    python benchmarks/face_unpg_step.py --backbone iresnet18 --input-size 112 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zoo.face.backbones import build_backbone
from zoo.face.heads import build_head
from zoo.face.unpg import UNPGLoss


def make_step(backbone_name: str, input_size: int, unpg: bool, num_classes: int, seed: int):
    """Build a backbone, a loss and an SGD optimizer, and return a closure running one step."""
    torch.manual_seed(seed)
    backbone = build_backbone(backbone_name, in_channels=1, input_size=input_size)
    head = build_head("arcface", backbone.embedding_size, num_classes, scale=32.0, margin=0.5)
    loss_fn = UNPGLoss(head, wisk=1.5, use_negative_pairs=unpg)
    parameters = list(backbone.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(backbone(images), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def measure(args: argparse.Namespace) -> dict[str, float | int | str]:
    """Run the alternating measurement and return the timings and their ratio."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 1, args.input_size, args.input_size, generator=generator)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
    steps = {
        "plain": make_step(args.backbone, args.input_size, False, args.num_classes, 0),
        "unpg": make_step(args.backbone, args.input_size, True, args.num_classes, 0),
    }
    times: dict[str, list[float]] = {"plain": [], "unpg": []}
    for repeat in range(args.warmup + args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(images, labels)
            elapsed = time.perf_counter() - start
            if repeat >= args.warmup:
                times[name].append(elapsed)
    plain = statistics.median(times["plain"])
    unpg = statistics.median(times["unpg"])
    return {
        "backbone": args.backbone,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "num_classes": args.num_classes,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "plain_step_s": plain,
        "unpg_step_s": unpg,
        "ratio": unpg / plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="small_cnn", help="backbone name")
    parser.add_argument("--input-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--num-classes", type=int, default=30, help="training identities")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per loss")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loss")
    result = measure(parser.parse_args())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
