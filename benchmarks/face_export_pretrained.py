"""Evaluate a trained face checkpoint on its verification pairs and export it to the hub.

Usage (after ``zoo train face-unpg``)::

    python benchmarks/face_export_pretrained.py \\
        --ckpt runs/face-unpg/checkpoints/last.ckpt --name face-unpg --model face-unpg

The metric written into ``checkpoints/NAME.json`` is the 10-fold pair accuracy on the
held-out identities, computed here without a Trainer exactly as the reproduction test does.
"""

from __future__ import annotations

import argparse
import json

import yaml

from zoo import hub
from zoo.datamodules.faces import FaceDataModule
from zoo.face.evaluate import evaluate_verification
from zoo.face.module import FaceRecognitionModule

ORL_LICENSE = (
    "ORL / AT&T Database of Faces (Olivetti Research Laboratory, 1992-1994): made freely "
    "available for research by its publisher, who asks users to credit the Olivetti Research "
    "Laboratory; no formal licence text exists."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of the trained run")
    parser.add_argument("--name", required=True, help="pretrained checkpoint name to write")
    parser.add_argument("--model", required=True, help="registered config the run used")
    parser.add_argument("--data-dir", default=None, help="data directory (default: ZOO_DATA_DIR)")
    parser.add_argument("--out-dir", default="checkpoints", help="destination folder")
    args = parser.parse_args()

    module = FaceRecognitionModule.load_from_checkpoint(args.ckpt, map_location="cpu")
    config = yaml.safe_load(hub.config_path(args.model).read_text())
    data_args = dict(config["data"]["init_args"])
    data_args["data_dir"] = args.data_dir
    datamodule = FaceDataModule(**data_args)
    datamodule.prepare_data()
    datamodule.setup("validate")
    metrics = evaluate_verification(module, datamodule)
    root = datamodule.resolve_root()
    held_out = datamodule.val_names
    pairs = datamodule.verification_pairs
    genuine = int(pairs[:, 2].sum())
    metric = {
        "name": "verification accuracy (10-fold)",
        "value": round(metrics["accuracy"], 6),
        "data": (
            f"{root.name} faces, held-out identities {held_out[0].split('/')[0]}-"
            f"{held_out[-1].split('/')[0]}: {genuine} genuine and {len(pairs) - genuine} "
            "impostor pairs"
        ),
        "protocol": (
            "cosine of flip-summed embeddings; threshold chosen on 9 folds and applied to "
            "the 10th; pair list seeded as in FaceDataModule"
        ),
    }
    extra = {key: round(value, 6) for key, value in metrics.items()}
    path = hub.export_pretrained(
        module,
        args.name,
        model=args.model,
        metric=metric,
        data_license=ORL_LICENSE,
        extra={"verification": extra},
        out_dir=args.out_dir,
    )
    print(json.dumps({"manifest": str(path), **extra}, indent=2))


if __name__ == "__main__":
    main()
