"""The proving-ground quality gate (issue 22): meaning, not only shapes.

On a fixed split of the synthetic world (``world.SPLIT_SEEDS["gate"]``, generated here, seeded) and
the committed CLIP trained there (``calibration/proving_ground/runa-pg-vit.pt``) with each method's
committed few-shot head, every method stays above its floors (overall, near-OOD and far-OOD AUROC,
nearest-label accuracy), set from the values measured at commit time minus a stated margin. Bugs
injected here (monkeypatched: a transposed token grid, crops from mirrored coordinates, the global
view's blur skipped, prompts for the wrong labels, attention normalised over the wrong axis, class
centres that never leave their random start) must each push at least one figure below its floor:
a gate that no such bug can fail would check nothing. Random weights of the same architecture
score near chance on the same split, so the world cannot be solved without semantics.

Synthetic world, model trained here: evidence that the pipeline works, not real-world quality.
Every figure goes through the package's own tools (`runa-ood evaluate`, `runa-ood finetune`).
"""
import json
import sys

import pytest
import torch

from runa_ood_node.proving_ground import artefacts, world
from runa_ood_node.tools.cli import main

#: frames of the gate split (about 6 objects each: ~45 % ID, ~35 % near-OOD, ~20 % far-OOD)
GATE_FRAMES = 60
#: floors = measured at commit time (comment) minus MARGIN, rounded down
MARGIN = 0.05
FLOORS = {
    # method: {figure: floor}; measured on the gate split at commit time in the comments
    "runa": {"auroc": 0.88, "near": 0.85, "far": 0.91, "label_acc": 0.92},  # 0.931 0.905 0.967 0.978
    "uni-ood": {"auroc": 0.81, "near": 0.74, "far": 0.90, "label_acc": 0.90},  # 0.860 0.796 0.950 0.957
    # TagOOD's head reads every token in the box of a 672 px frame pass; its OOD figures sit near chance
    # (near-OOD 0.561: no floor) but its tokens read the ID class (chance 0.167), which guards the token grid
    "tagood": {"auroc": 0.53, "near": None, "far": 0.57, "label_acc": 0.42},  # 0.587 0.561 0.623 0.478
}
#: RUNA's two views on their own (the same encoding: --ablation all costs no extra pass). The global
#: view scores at chance here (0.52): see GAP_BLUR
VIEW_FLOORS = {"regional": 0.93, "global": None}  # 0.981

MODEL = ["--model", artefacts.MODEL, "--pretrained", artefacts.PRETRAINED]

#: why a bug escapes the gate on this world (measured; the README's proving-ground section)
GAP_ATTENTION = ("no committed head reads the CLS attention to its profit on this world: TagOOD's proving-ground "
                 "head keeps every token in the box (selection 'attn' 0.487 against 'all' 0.579 AUROC on the "
                 "calibration split at 672 px; with an 'attn' head the bug moves ID label accuracy 0.386 -> 0.391 "
                 "on the gate split) and UNI-OOD's combiners do better with uniform attention (0.886 against 0.860)")
GAP_BLUR = ("RUNA's global view scores at chance on this world whatever its blur (AUROC 0.52 at R = 1, 0.51 at "
            "R = 4, 0.52 at R = 12): a box of 12-300 px in a 1280x720 frame squashed to 224 px is 2-50 px, so "
            "the blur around it changes nothing measurable")


@pytest.fixture(scope="module")
def gate_split(tmp_path_factory):
    if not artefacts.CHECKPOINT.is_file():
        pytest.fail(f"the proving ground's CLIP is missing: {artefacts.CHECKPOINT} (remake: {artefacts.REMAKE})")
    out = tmp_path_factory.mktemp("gate")
    return world.write_split(out, "gate", GATE_FRAMES, progress=False)


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    """The world's train split (the committed heads' shots), for bugs injected into fitting."""
    from runa_ood_node.tools.proving_ground import DEFAULT_FRAMES, parse_frames

    n = parse_frames(DEFAULT_FRAMES)["train"]  # as scripts/proving_ground.sh writes it
    return world.write_split(tmp_path_factory.mktemp("train"), "train", n, progress=False)


def refit(ann, out, method):
    """`runa-ood finetune` of TagOOD as ``scripts/proving_ground.sh`` fits its committed head (10 shots,
    seed 0, the head settings the committed head records) -> the new head's folder. Without a bug this
    remakes the committed head (measured: the same loss curve and gate figures)."""
    from runa_ood_node.core.methods.heads import load_head
    from runa_ood_node.core.methods.tagood import SETTINGS

    if method != "tagood":
        raise ValueError(f"refit knows TagOOD's head settings only, not {method!r}'s")
    hyper = load_head(artefacts.head_dir(method), method=method).hyper
    options = [a for k in SETTINGS if hyper.get(k) is not None for a in ("--method-option", f"{k}={hyper[k]}")]
    argv = ["finetune", *MODEL, "--id-set", str(world.LABELS_PATH), "--method", method, "--annotations", str(ann),
            "--shots", "10", "--seed", "0", "--eval-images", "0", "--no-progress", "--out", str(out), *options]
    assert main(argv) == 0
    return out


def evaluate(ann, out, methods=("runa", "uni-ood", "tagood"), extra=(), heads=None):
    """`runa-ood evaluate` in this process (monkeypatches apply) -> {run/scorer/ablation: figures}."""
    if len(methods) not in (1, 3):
        raise ValueError("evaluate one method or all three")
    heads = heads or {m: str(artefacts.head_dir(m)) for m in methods}
    argv = ["evaluate", *MODEL, "--id-set", str(world.LABELS_PATH), "--annotations", str(ann), "--no-progress",
            "--out", str(out), "--method", methods[0] if len(methods) == 1 else "all", "--ablation", "all",
            *[a for m in methods for a in ("--head", f"{m}={heads[m]}" if len(methods) > 1 else heads[m])], *extra]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    figures = {}
    for r in rep["runs"]:
        bd = r["breakdown"]["by_group"]
        figures[f"{r['run']}/{r['ablation']}"] = {
            "auroc": r["metrics"]["auroc"], "fpr95": r["metrics"]["fpr95"],
            "near": bd.get("near", {}).get("auroc"), "far": bd.get("far", {}).get("auroc"),
            "label_acc": r["nearest_label_accuracy_on_id"],
            "small_near": r["breakdown"]["by_size"].get("<32", {}).get("near", {}).get("auroc")}
    return figures


def below_floors(figures):
    """The figures below their floors: ``["runa/dual near 0.61 < 0.80", ...]``."""
    low = []
    for method, floors in FLOORS.items():
        f = figures.get(f"{method}/dual")
        if f is None:
            continue
        for k, floor in floors.items():
            if floor is not None and not (f[k] >= floor):
                low.append(f"{method}/dual {k} {f[k]:.3f} < {floor}")
    for view, floor in VIEW_FLOORS.items():
        f = figures.get(f"runa/{view}")
        if f is not None and floor is not None and not (f["auroc"] >= floor):
            low.append(f"runa/{view} auroc {f['auroc']:.3f} < {floor}")
    return low


@pytest.fixture(scope="module")
def clean_figures(gate_split, tmp_path_factory):
    return evaluate(gate_split, tmp_path_factory.mktemp("clean"))


def test_every_method_stays_above_its_floors(clean_figures):
    print(json.dumps(clean_figures, indent=1))
    assert not below_floors(clean_figures), below_floors(clean_figures)
    # the world is not saturated: a gate on a solved world would be blind (issue 22's bar: <= 0.97)
    assert max(clean_figures[f"{m}/dual"]["near"] for m in FLOORS) <= 0.97


def test_random_weights_score_near_chance(gate_split, tmp_path):
    argv = ["evaluate", "--model", artefacts.MODEL, "--pretrained", "none", "--allow-random-weights",
            "--id-set", str(world.LABELS_PATH), "--annotations", str(gate_split), "--no-progress",
            "--out", str(tmp_path), "--ablation", "all", "--scorer", "all"]
    assert main(argv) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert len(rep["runs"]) == 12 and rep["random_weights"] is True
    for r in rep["runs"]:
        assert 0.4 <= r["metrics"]["auroc"] <= 0.6, (r["scorer"], r["ablation"], r["metrics"]["auroc"])


# --------------------------------------------------------------------------- injected bugs
def _replace_everywhere(monkeypatch, original, replacement):
    """Monkeypatch every module attribute of the package bound to ``original`` (a function imported by
    name elsewhere keeps its own binding)."""
    n = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("runa_ood_node") or mod is None:
            continue
        for attr, val in list(vars(mod).items()):
            if val is original:
                monkeypatch.setattr(mod, attr, replacement)
                n += 1
    assert n, f"{original.__name__} is bound nowhere: the injected bug would change nothing"


def _transpose_grid(t, offset=1):
    """Patch tokens (after ``offset`` leading tokens) of a row-major G x G grid, transposed."""
    T = t.shape[1] - offset
    g = int(round(T ** 0.5))
    head, grid = t[:, :offset], t[:, offset:]
    shape = grid.shape
    grid = grid.reshape(shape[0], g, g, *shape[2:]).transpose(1, 2).reshape(shape)
    return torch.cat([head, grid], dim=1)


def bug_token_grid_transposed(monkeypatch):
    """The patch tokens (and their attention) of a row-major grid read column-major."""
    from runa_ood_node.core import backbone

    orig = backbone.backbone_forward

    def wrong(*a, **k):
        out = orig(*a, **k)
        for key in ("tokens", "attn_cls"):
            if key in out:
                out[key] = _transpose_grid(out[key])
        return out
    _replace_everywhere(monkeypatch, orig, wrong)
    return ("tagood",)


def bug_crop_mirrored(monkeypatch):
    """The regional crop taken from the box mirrored left-right."""
    from runa_ood_node.core.views import ViewMaker

    orig = ViewMaker.crop

    def wrong(self, image_rgb, box_xyxy):
        W = image_rgb.shape[1]
        x0, y0, x1, y1 = [float(v) for v in box_xyxy]
        return orig(self, image_rgb, (W - x1, y0, W - x0, y1))
    monkeypatch.setattr(ViewMaker, "crop", wrong)
    return ("runa",)


def bug_blur_skipped(monkeypatch):
    """RUNA's global view without its blur."""
    from runa_ood_node.core.views import ViewMaker

    monkeypatch.setattr(ViewMaker, "_blur", lambda self, img: img)
    return ("runa",)


def bug_prompts_for_wrong_labels(monkeypatch):
    """Each ID label compared with the next label's prompts."""
    from runa_ood_node.core.encoder import DualEncoder

    orig = DualEncoder.text_embeddings

    def wrong(self, label_set):  # label k gets label k+1's prompts
        return torch.roll(orig(self, label_set), 1, dims=0)
    monkeypatch.setattr(DualEncoder, "text_embeddings", wrong)
    return ("runa",)


def bug_attention_wrong_axis(monkeypatch):
    """The CLS attention's softmax taken over the heads instead of the keys (every token weighs the same)."""
    from runa_ood_node.core import backbone

    orig = backbone.cls_attention

    def wrong(h, wq, bq, wk, bk, heads, want_self=True, pairs=None):
        # the softmax over the heads instead of the keys: every token gets the same weight
        T, E = int(h.shape[1]), int(h.shape[2])
        d = E // heads
        q = torch.nn.functional.linear(h[:, 0], wq, bq).reshape(-1, heads, 1, d) * (float(d) ** -0.5)
        k = torch.nn.functional.linear(h, wk, bk).reshape(-1, T, heads, d).permute(0, 2, 3, 1)
        own = torch.softmax(torch.matmul(q, k).float(), dim=1).mean(dim=1)[:, 0] if want_self else None
        cross = None
        if pairs is not None:
            qp, kp = torch.index_select(q, 0, pairs[:, 0]), torch.index_select(k, 0, pairs[:, 1])
            cross = torch.softmax(torch.matmul(qp, kp).float(), dim=1).mean(dim=1)[:, 0]
        return own, cross
    _replace_everywhere(monkeypatch, orig, wrong)
    return ("tagood",)


def bug_centres_never_updated(monkeypatch):
    """TagOOD's class centres never leave their random start (no class-mean start, no EMA update): a bug
    in fitting, so the head is re-fitted under it."""
    from runa_ood_node.core.methods import tagood_ops

    monkeypatch.setattr(tagood_ops.ClassCentres, "update", lambda self, feat, labels, momentum=0.999: None)
    monkeypatch.setattr(tagood_ops.ClassCentres, "init_from", lambda self, feat, labels: None)
    return ("tagood",)


#: bugs in fitting: the test re-fits these methods' heads under the bug (``refit``) before evaluating
REFIT = {bug_centres_never_updated}

#: bugs the gate catches, and those it cannot catch on this world, with the measured reason (strict
#: xfail: once a change makes the gate catch one, the test says so and it moves to the caught list)
CAUGHT = [bug_crop_mirrored, bug_prompts_for_wrong_labels, bug_token_grid_transposed, bug_centres_never_updated]
NOT_CAUGHT = {
    bug_attention_wrong_axis: GAP_ATTENTION,
    bug_blur_skipped: GAP_BLUR,
}


@pytest.mark.parametrize("bug", CAUGHT + [pytest.param(b, marks=pytest.mark.xfail(strict=True, reason=why))
                                          for b, why in NOT_CAUGHT.items()], ids=lambda b: b.__name__[4:])
def test_an_injected_bug_breaks_the_gate(bug, gate_split, clean_figures, tmp_path, monkeypatch, request):
    methods = bug(monkeypatch)
    heads = None
    if bug in REFIT:
        train = request.getfixturevalue("train_split")
        heads = {m: str(refit(train, tmp_path / f"head_{m}", m)) for m in methods}
    figures = evaluate(gate_split, tmp_path, methods=methods, heads=heads)
    low = below_floors(figures)
    assert low, f"{bug.__name__} left every figure above its floor: {figures}"
