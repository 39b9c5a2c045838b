"""TensorRT: real engine build + inference where TensorRT and a CUDA GPU exist; elsewhere only the
"unavailable" behaviour (clear errors, CLI exit status) is tested.

TensorRT cannot be installed on the CI machines (see docs/ENVIRONMENT.md in the shared docs): the
real tests are skipped there with that reason.
"""
import argparse
import json

import pytest

torch = pytest.importorskip("torch")

from runa_ood_node.backends.base import BackendUnavailableError, make_backend  # noqa: E402
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
