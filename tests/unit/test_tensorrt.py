"""TensorRT: real engine build + inference where TensorRT and a CUDA GPU exist; elsewhere only the
"unavailable" behaviour (clear errors, CLI exit status) is tested.

TensorRT cannot be installed on the CI machines (see docs/ENVIRONMENT.md in the shared docs): the
real tests are skipped there with that reason.
"""
import argparse
import json

import pytest

torch = pytest.importorskip("torch")

from runa_ood_node.backends.base import BackendUnavailableError
from runa_ood_node.backends.select import make_backend  # noqa: E402
from runa_ood_node.backends.ort_backend import cosine_rows  # noqa: E402
from runa_ood_node.backends.tensorrt_backend import tensorrt_available  # noqa: E402

TRT_OK, TRT_WHY = tensorrt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT + CUDA not available here: {TRT_WHY}")
no_trt = pytest.mark.skipif(TRT_OK, reason="TensorRT is available: the 'unavailable' path cannot be tested")


# ---------------------------------------------------------------------- without TensorRT (CI)
@no_trt
def test_build_engine_fails_clearly_without_tensorrt(tiny_encoder, tmp_path):
    from runa_ood_node.backends.tensorrt_backend import build_engine

    with pytest.raises(BackendUnavailableError, match="TensorRT not installed|CUDA"):
        build_engine(tiny_encoder, cache_dir=tmp_path)


@no_trt
def test_tensorrt_backend_unavailable_message(tiny_encoder, tmp_path):
    with pytest.raises(BackendUnavailableError) as ei:
        make_backend("tensorrt", tiny_encoder, device="cuda", cache_dir=tmp_path)
    assert "TensorRT" in str(ei.value) or "CUDA" in str(ei.value)


@no_trt
def test_cli_build_engine_without_tensorrt_and_onnx_only(tmp_path, capsys):
    from runa_ood_node.tools import build_engine as tool

    def args(*extra):
        p = argparse.ArgumentParser()
        tool.add_arguments(p)
        return p.parse_args(["--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights",
                             "--cache-dir", str(tmp_path), *extra])

    assert tool.run(args()) == 3
    err = capsys.readouterr()
    assert "TensorRT not installed" in err.err or "CUDA" in err.err
    assert (tmp_path / "onnx").is_dir()  # the ONNX graph was still exported for use elsewhere

    assert tool.run(args("--onnx-only", "--precision", "fp16")) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert set(summary["onnx"]) == {"fp32", "fp16"} and summary["random_weights"] is True
    assert tool.run(args("--profile", "4,2,8")) == 2
    # one graph per output set, named by it
    assert tool.run(args("--onnx-only", "--precision", "fp32", "--fused", "--outputs", "attn_cls,tokens")) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("\n{") + 1:])
    assert summary["outputs"] == ["tokens", "attn_cls"]
    assert summary["onnx"]["fp32"].endswith("-fp32-otokens_attn_cls.onnx")
    assert summary["onnx"]["fused"].endswith("-fp32-otokens_attn_cls-fused.onnx")
    assert tool.run(args("--onnx-only", "--outputs", "patches")) == 2
    # --auto-choice times the cached CPU variants and records what backend: auto uses
    assert tool.run(args("--onnx-only", "--precision", "fp32", "--auto-choice")) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("\n{") + 1:])
    assert summary["auto_choice"]["chosen"] == "plain"  # the only cls variant cached here
    assert json.loads(open(summary["auto_choice"]["record"]).read())["chosen"] == "plain"


# ---------------------------------------------------------------------- with TensorRT (GPU machines)
@pytest.fixture(scope="module")
def trt_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("trt_cache")


@pytest.fixture(scope="module")
def cuda_views(tiny_encoder):
    g = torch.Generator().manual_seed(0)
    return torch.randn((9, 3, tiny_encoder.input_size, tiny_encoder.input_size), generator=g)


@needs_trt
@pytest.mark.parametrize("precision,mode,min_cos", [("fp32", "strongly-typed", 0.9999),
                                                    ("fp16", "strongly-typed", 0.999),
                                                    ("fp16", "builder-flag", 0.999)])
def test_engine_matches_torch(tiny_encoder, trt_cache, cuda_views, precision, mode, min_cos):
    import tensorrt as trt

    from runa_ood_node.backends.tensorrt_backend import TensorRTBackend, build_engine

    if mode == "builder-flag" and not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (11.x)")
    path, meta = build_engine(tiny_encoder, precision=precision, fp16_mode=mode, profile=(1, 4, 8),
                              cache_dir=trt_cache)
    assert path.is_file() and meta.precision == precision and meta.profile == (1, 4, 8)
    be = TensorRTBackend(path, device="cuda")
    assert be.max_batch == 8
    ref = make_backend("torch", tiny_encoder)(cuda_views)
    out_cpu = be(cuda_views)  # 9 views > max 8: split into two engine calls
    assert out_cpu.device.type == "cpu" and out_cpu.shape == ref.shape
    out_gpu = be(cuda_views.cuda())
    assert out_gpu.is_cuda
    P = tiny_encoder.proj_global
    assert float(cosine_rows(ref @ P, out_cpu @ P).min()) >= min_cos
    assert float(cosine_rows(out_cpu, out_gpu.cpu()).min()) >= 0.99999


@needs_trt
def test_engine_cache_hit_and_auto_picks_tensorrt(tiny_encoder, trt_cache, caplog):
    from runa_ood_node.backends.tensorrt_backend import build_engine

    p1, m1 = build_engine(tiny_encoder, precision="fp16", profile=(1, 4, 8), cache_dir=trt_cache)
    mtime = p1.stat().st_mtime_ns
    p2, m2 = build_engine(tiny_encoder, precision="fp16", profile=(1, 4, 8), cache_dir=trt_cache)
    assert p1 == p2 and m1.key == m2.key and p1.stat().st_mtime_ns == mtime
    p3, _ = build_engine(tiny_encoder, precision="fp16", profile=(1, 4, 16), cache_dir=trt_cache)
    assert p3 != p1
    be = make_backend("auto", tiny_encoder, device="cuda", precision="fp16", cache_dir=trt_cache)
    assert be.name == "tensorrt-fp16"
    be2 = make_backend("tensorrt", tiny_encoder.visual_trunk, device="cuda", precision="fp16", cache_dir=trt_cache)
    assert be2.name == "tensorrt-fp16"  # bare trunk finds the encoder's engine by its weights hash


@needs_trt
def test_engine_from_other_trt_version_is_rejected(tiny_encoder, trt_cache):
    from runa_ood_node.backends.engine_cache import EngineMeta, EngineMismatchError
    from runa_ood_node.backends.tensorrt_backend import TensorRTBackend, build_engine

    path, meta = build_engine(tiny_encoder, precision="fp32", profile=(1, 2, 4), cache_dir=trt_cache)
    fake = path.with_name("fake.engine")
    fake.write_bytes(path.read_bytes())
    d = meta.to_dict()
    d["trt_version"] = "0.0.1"
    EngineMeta.from_dict(d).save(fake.with_suffix(".json"))
    with pytest.raises(EngineMismatchError, match="TensorRT 0.0.1"):
        TensorRTBackend(fake, device="cuda")


# ---------------------------------------------------------------------- engine look-up (no TensorRT needed)
def _fake_engine(cache, model_id, weights_hash, outputs=("cls",), precision="fp16"):
    """An engine file + sidecar in the cache, as build_engine writes them (the bytes are never run)."""
    from runa_ood_node.backends.engine_cache import EngineMeta, engine_cache_key, engine_path_for

    key = engine_cache_key("a" * 64, "10.3.0", "8.7", precision, (1, 4, 8), outputs=outputs)
    path = engine_path_for(model_id, precision, (1, 4, 8), key, cache, outputs=outputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an engine")
    EngineMeta(key=key, model_id=model_id, model_hash="a" * 64, trt_version="10.3.0", compute_capability="8.7",
               precision=precision, profile=(1, 4, 8), input_size=64, width=64, weights_hash=weights_hash,
               outputs=tuple(outputs)).save(path.with_suffix(".json"))
    return path


def test_encoder_finds_an_engine_built_from_the_bare_trunk(tiny_encoder, tmp_path, monkeypatch):
    """Issue 18 item 9: the look-up used ``info._weights_hash``, None for an encoder, so an engine
    built from the bare ``visual_trunk`` (model_id = weights hash) was never found for the encoder."""
    from runa_ood_node.backends.base import describe_model, trunk_weights_hash
    from runa_ood_node.backends.tensorrt_backend import TensorRTBackend
    from runa_ood_node.core.encoder import state_dict_sha256

    wh = trunk_weights_hash(tiny_encoder.visual_trunk)
    assert wh == state_dict_sha256(tiny_encoder.visual_trunk)[:16] == describe_model(tiny_encoder.visual_trunk).model_id
    assert describe_model(tiny_encoder)._weights_hash is None  # the encoder's info does not know it up front
    bare = _fake_engine(tmp_path, model_id=wh, weights_hash=wh)
    _fake_engine(tmp_path, model_id=wh, weights_hash=wh, outputs=("tokens", "attn_cls"))
    opened = []

    def fake_init(self, engine_path, **kw):
        opened.append((engine_path, kw))

    monkeypatch.setattr(TensorRTBackend, "__init__", fake_init)
    be = TensorRTBackend.from_cache(tiny_encoder, device="cuda", precision="fp16", cache_dir=tmp_path)
    assert isinstance(be, TensorRTBackend)
    (path, kw), = opened
    assert path == bare and kw["expect_model_id"] == tiny_encoder.model_id and kw["expect_outputs"] == ("cls",)
    # engines are found per output set
    opened.clear()
    TensorRTBackend.from_cache(tiny_encoder, precision="fp16", cache_dir=tmp_path, outputs=("attn_cls", "tokens"))
    assert "-otokens_attn_cls-" in opened[0][0].name and opened[0][1]["num_tokens"] == tiny_encoder.num_tokens
    with pytest.raises(BackendUnavailableError, match="--outputs attn_cls,xattn"):
        TensorRTBackend.from_cache(tiny_encoder, precision="fp16", cache_dir=tmp_path, outputs=("attn_cls", "xattn"))


def test_tensorrt_source_graph_of_every_output_set_runs_on_ort(tiny_encoder, tmp_path):
    """What build_engine parses for an output set (the strongly typed fp16 graph, float32 I/O, int32
    pairs) is a valid graph that ONNX Runtime runs with the engine's I/O names and shapes."""
    import numpy as np
    import onnxruntime as ort

    from runa_ood_node.backends.engine_cache import graph_input_names, graph_output_names
    from runa_ood_node.backends.onnx_export import export_onnx

    names = ("cls", "tokens", "attn_cls", "xattn")
    path = export_onnx(tiny_encoder, precision="fp16", cache_dir=tmp_path, outputs=names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == graph_input_names(names)
    assert [o.name for o in sess.get_outputs()] == graph_output_names(names)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    pairs = torch.tensor([[0, 1], [2, 0]])
    ref = tiny_encoder.visual_outputs(x, names, pairs=pairs)
    outs = dict(zip(names, sess.run(None, {"views": x.numpy(), "pairs": pairs.numpy().astype(np.int32)})))
    P = tiny_encoder.proj_global
    assert float(cosine_rows(ref["cls"] @ P, torch.from_numpy(outs["cls"]) @ P).min()) >= 0.999
    assert float((ref["attn_cls"] - torch.from_numpy(outs["attn_cls"])).abs().max()) <= 1e-3
    assert float((ref["xattn"] - torch.from_numpy(outs["xattn"])).abs().max()) <= 1e-3
