"""Every method through the command-line tools, as a user runs them (tiny random model): `finetune --method M`
writes a head, `calibrate --method M --head DIR` fits thresholds for exactly that method and head, and
`evaluate --bag --method M --head DIR --thresholds F` applies them; the same thresholds are refused for another
method. The flags reach the scorer through the tools' one path (tools.common.scorer_from_args)."""
import json

import pytest

from runa_ood_node.tools import make_bag
from runa_ood_node.tools.cli import main

TINY = ["--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights", "--no-progress",
        "--id-set", "voc"]


@pytest.fixture(scope="module")
def photo_bag(tmp_path_factory):
    path = tmp_path_factory.mktemp("methods_cli") / "bag"
    frames = make_bag.skimage_frames("voc", names=["astronaut", "chelsea", "coffee", "rocket"])
    make_bag.write_bag(frames, path, fps=5.0, progress=False)
    return path


@pytest.mark.parametrize("method", ["uni-ood", "tagood"])
def test_finetune_calibrate_evaluate_bag_for_a_method(tmp_path, ood_pack, photo_bag, method):
    from runa_ood_node.core.methods.heads import load_head
    from runa_ood_node.core.thresholds import Thresholds

    ann = ["--annotations", str(ood_pack / "annotations.json")]
    head = tmp_path / "head"
    assert main(["finetune", *TINY, *ann, "--method", method, "--max-images", "20", "--shots", "1", "--epochs", "2",
                 "--out", str(head)]) == 0
    sha = load_head(head).sha256

    thr_path = tmp_path / "cal" / "thresholds.yaml"
    assert main(["calibrate", *TINY, *ann, "--method", method, "--head", str(head), "--max-images", "16",
                 "--split", "0.75", "--min-per-class", "10", "--out", str(thr_path)]) == 0
    thr = Thresholds.load(thr_path)
    assert thr.fitted_for["method"] == method and sha in str(thr.fitted_for["head"])

    out = tmp_path / "eval"
    assert main(["evaluate", "--bag", str(photo_bag), *TINY, "--method", method, "--head", str(head),
                 "--thresholds", str(thr_path), "--out", str(out)]) == 0
    rep = json.loads((out / "bag_report_offline.json").read_text())
    assert rep["status_counts"] == {"OK": 10}
    thresholds = {r["threshold"] for r in rep["records"]}
    assert thresholds <= {thr.global_threshold, *thr.per_class.values()}
    assert all(r["is_ood"] == (r["uncertainty"] > r["threshold"]) for r in rep["records"])

    # thresholds fitted for this method and head are refused for another method (the node's check_fit)
    assert main(["evaluate", "--bag", str(photo_bag), *TINY, "--thresholds", str(thr_path),
                 "--out", str(tmp_path / "other")]) == 2


def test_evaluate_method_all_compares_the_methods_in_one_run(tmp_path, ood_pack, photo_bag):
    ann = ["--annotations", str(ood_pack / "annotations.json")]
    heads = {}
    for method in ("uni-ood", "tagood"):
        heads[method] = tmp_path / method
        assert main(["finetune", *TINY, *ann, "--method", method, "--max-images", "20", "--shots", "1",
                     "--epochs", "1", "--out", str(heads[method])]) == 0
    out = tmp_path / "all"
    assert main(["evaluate", *TINY, *ann, "--max-images", "8", "--method", "all", "--scorer", "all",
                 "--head", f"uni-ood={heads['uni-ood']}", "--head", f"tagood={heads['tagood']}",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["methods"] == ["runa", "uni-ood", "tagood"]
    runs = {(r["method"], r["scorer"]) for r in rep["runs"]}
    assert runs == {(m, s) for m in rep["methods"] for s in ("max_cosine", "mcm", "energy", "sum")}
    n_boxes = {m: rep["encoding"][m]["boxes"] for m in rep["methods"]}
    assert len(set(n_boxes.values())) == 1 and n_boxes["runa"] > 0  # the same boxes for every method
    for r in rep["runs"]:
        assert sum(r["status_counts"].values()) == n_boxes["runa"]
        assert (out / r["histogram"]).is_file() and r["histogram"].startswith(f"hist_{r['method']}_")
    assert (out / "roc.png").is_file()

    # refusals: a bare head with several methods, a head for a method not compared, --method all on a bag
    assert main(["evaluate", *TINY, *ann, "--max-images", "2", "--method", "all", "--head", str(heads["tagood"]),
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["evaluate", *TINY, *ann, "--max-images", "2", "--method", "runa",
                 "--head", f"tagood={heads['tagood']}", "--out", str(tmp_path / "y")]) == 2
    assert main(["evaluate", "--bag", str(photo_bag), *TINY, "--method", "all", "--out", str(tmp_path / "z")]) == 2
