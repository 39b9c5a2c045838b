"""ONNX export of the visual trunk: contract, cache behaviour, fp16 variant."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from runa_ood_node.backends import onnx_export  # noqa: E402
from runa_ood_node.backends.base import describe_model  # noqa: E402
from runa_ood_node.backends.onnx_export import EXPORT_STATS, check_onnx, export_onnx, onnx_cache_path  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(scope="module")
def fp32_path(tiny_encoder, cache):
    return export_onnx(tiny_encoder, cache_dir=cache)


def _cos(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_graph_contract(fp32_path, tiny_encoder, cache):
    assert fp32_path == onnx_cache_path(tiny_encoder.model_id, 17, "fp32", cache)
    assert fp32_path.name == f"{tiny_encoder.model_id}-17-fp32.onnx"
    check_onnx(fp32_path)  # onnx.checker + names + dynamic batch
    m = onnx.load(str(fp32_path))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in m.graph.input] == ["views"]
    assert [o.name for o in m.graph.output] == ["features"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    # the projection stays outside: output width is the pre-projection width, not embed_dim
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == tiny_encoder.width != tiny_encoder.embed_dim
    assert any(n.op_type == "LayerNormalization" for n in m.graph.node)


def test_matches_torch_for_several_batch_sizes(fp32_path, tiny_encoder):
    sess = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for b in (1, 3, 17):
        x = torch.randn((b, 3, 64, 64), generator=gen)
        with torch.no_grad():
            ref = tiny_encoder.visual_trunk(x).numpy()
        (out,) = sess.run(None, {"views": x.numpy()})
        assert out.shape == (b, tiny_encoder.width)
        assert np.abs(out - ref).max() < 1e-4
        assert _cos(out, ref).min() > 0.99999


def test_second_call_is_a_cache_hit(tiny_encoder, cache, fp32_path):
    before = dict(EXPORT_STATS)
    mtime = fp32_path.stat().st_mtime_ns
    again = export_onnx(tiny_encoder, cache_dir=cache)
    assert again == fp32_path
    assert EXPORT_STATS == before
    assert fp32_path.stat().st_mtime_ns == mtime
    side = json.loads(fp32_path.with_suffix(".json").read_text())
    assert side["key"]["model_id"] == tiny_encoder.model_id and side["key"]["opset"] == 17


def test_stale_sidecar_forces_reexport(tiny_encoder, cache, fp32_path):
    side = fp32_path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["key"]["width"] = -1  # as if written for another model/version
    side.write_text(json.dumps(meta))
    n = EXPORT_STATS["exports"]
    export_onnx(tiny_encoder, cache_dir=cache)
    assert EXPORT_STATS["exports"] == n + 1
    assert json.loads(side.read_text())["key"]["width"] == tiny_encoder.width


def test_different_model_gets_a_different_file(tiny_encoder, cache, fp32_path):
    from runa_ood_node.core.encoder import DualEncoder

    other = DualEncoder.load("runa-tiny-vit", pretrained=None, allow_random=True, random_seed=123)
    assert other.model_id != tiny_encoder.model_id
    p = export_onnx(other, cache_dir=cache)
    assert p != fp32_path and p.is_file() and fp32_path.is_file()


def test_bare_trunk_is_accepted(tiny_encoder, tmp_path):
    info = describe_model(tiny_encoder.visual_trunk)
    assert (info.input_size, info.width) == (tiny_encoder.input_size, tiny_encoder.width)
    p = export_onnx(tiny_encoder.visual_trunk, cache_dir=tmp_path)
    check_onnx(p)


def test_fp16_export_keeps_float32_io_and_accuracy(tiny_encoder, cache, fp32_path):
    p16 = export_onnx(tiny_encoder, precision="fp16", cache_dir=cache)
    assert p16.name.endswith("-17-fp16.onnx")
    m = onnx.load(str(p16))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in m.graph.initializer)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    sess = ort.InferenceSession(str(p16), so, providers=["CPUExecutionProvider"])
    x = torch.randn((4, 3, 64, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_encoder.visual_trunk(x).numpy()
    (out,) = sess.run(None, {"views": x.numpy()})
    assert out.dtype == np.float32
    assert _cos(out, ref).min() > 0.9999
    n = EXPORT_STATS["fp16_conversions"]
    assert export_onnx(tiny_encoder, precision="fp16", cache_dir=cache) == p16
    assert EXPORT_STATS["fp16_conversions"] == n


def test_bad_arguments(tiny_encoder, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tiny_encoder, opset=16, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision"):
        export_onnx(tiny_encoder, precision="int8", cache_dir=tmp_path)


def test_cache_dir_defaults_to_env(tiny_encoder, monkeypatch, tmp_path):
    monkeypatch.setenv("RUNA_OOD_CACHE_DIR", str(tmp_path / "envcache"))
    p = onnx_export.onnx_cache_path(tiny_encoder.model_id)
    assert p.parent == tmp_path / "envcache" / "onnx"
