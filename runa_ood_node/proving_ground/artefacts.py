"""Where the proving ground's committed artefacts live: the CLIP trained there, the label set, one
few-shot head and one calibrated thresholds file per method (``calibration/proving_ground/``).

``scripts/proving_ground.sh`` remakes them (world -> optional CLIP training -> ``runa-ood finetune``
per method -> ``runa-ood calibrate`` -> ``runa-ood evaluate --method all --baselines``); the demo and
the CI gate (``tests/test_proving_ground*.py``) read them from here. No ROS, no torch.
"""
from __future__ import annotations

import dataclasses
import pathlib

from .world import LABELS_PATH

#: calibration/proving_ground/ (beside the label set)
ROOT = LABELS_PATH.parent
#: the open_clip config and the registered name of its committed checkpoint
MODEL = "runa-pg-vit"
PRETRAINED = "proving-ground"
CHECKPOINT = ROOT / f"{MODEL}.pt"
REMAKE = "bash scripts/proving_ground.sh"


def head_dir(method: str) -> pathlib.Path:
    """The committed few-shot head of ``method`` (``runa-ood finetune --method M --out``)."""
    return ROOT / "heads" / method


def thresholds_path(method: str) -> pathlib.Path:
    """The thresholds of ``method`` with its committed head, calibrated at 95 % ID TPR."""
    return ROOT / "thresholds" / method / "thresholds.yaml"


@dataclasses.dataclass(frozen=True)
class Artefacts:
    """What a scorer needs to run ``method`` on the proving ground (node parameters by name:
    ``model``, ``pretrained``, ``label_set``, ``head``, ``thresholds_file``)."""

    method: str
    model: str
    pretrained: str
    labels: pathlib.Path
    head: pathlib.Path
    thresholds: pathlib.Path

    def node_parameters(self) -> dict:
        return {"model": self.model, "pretrained": self.pretrained, "label_set": str(self.labels),
                "method": self.method, "head": str(self.head), "thresholds_file": str(self.thresholds)}


def for_method(method: str) -> Artefacts:
    """The committed artefacts of ``method``.

    Raises:
        FileNotFoundError: one is missing; the message names it and the command that remakes them."""
    art = Artefacts(method, MODEL, PRETRAINED, LABELS_PATH, head_dir(method), thresholds_path(method))
    for what, path in (("CLIP checkpoint", CHECKPOINT), ("label set", art.labels), (f"{method} head", art.head),
                       (f"{method} thresholds", art.thresholds)):
        if not path.exists():
            raise FileNotFoundError(f"the proving ground's {what} is missing: {path} (remake with `{REMAKE}`)")
    return art
