"""Pure engine-cache logic: keys, paths, compatibility checks, batch splitting, engine I/O dtypes."""
import hashlib
import json
import re

import pytest

from runa_ood_node.backends.engine_cache import (EngineMeta, EngineMismatchError, Profile, check_engine_compat,
                                                 engine_cache_key, engine_io_dtypes, engine_path_for, file_sha256,
                                                 graph_input_names, graph_output_names,
                                                 normalize_compute_capability, split_batches, trt_dtype_to_torch)
from runa_ood_node.core.registry import BACKBONE_OUTPUTS

BASE = dict(model_hash="a" * 64, trt_version="10.3.0", compute_capability=(8, 7), precision="fp16",
            profile=(1, 16, 64))


def key(**over):
    kw = dict(BASE)
    kw.update(over)
    return engine_cache_key(**kw)


def test_key_is_deterministic_and_hex():
    k = key()
    assert k == key()
    assert re.fullmatch(r"[0-9a-f]{64}", k)
    # today's ("cls",) key, field for field: engines built before output sets existed keep their keys
    blob = json.dumps({"model": "a" * 64, "trt": "10.3.0", "cc": "8.7", "precision": "fp16", "profile": [1, 16, 64]},
                      sort_keys=True)
    assert k == hashlib.sha256(blob.encode()).hexdigest() == key(outputs=("cls",)) == key(outputs=["cls"])


def test_key_path_and_meta_per_output_set(tmp_path):
    full = key(outputs=("xattn", "cls", "tokens", "attn_cls"))
    assert full != key() and full != key(outputs=("tokens",)) and full == key(outputs=list(BACKBONE_OUTPUTS))
    p_cls = engine_path_for("m", "fp16", (1, 16, 64), key(), tmp_path)
    p_full = engine_path_for("m", "fp16", (1, 16, 64), full, tmp_path, outputs=BACKBONE_OUTPUTS)
    assert p_full.name == f"m-fp16-b1_16_64-ocls_tokens_attn_cls_xattn-{full[:16]}.engine"
    assert p_cls.name == f"m-fp16-b1_16_64-{key()[:16]}.engine"
    assert graph_input_names(("cls",)) == ["views"] and graph_output_names(("cls",)) == ["features"]
    assert graph_input_names(("tokens", "xattn")) == ["views", "pairs"]
    assert graph_output_names(("xattn", "cls")) == ["features", "xattn"]
    # a sidecar written before output sets existed describes a cls engine
    old = _meta().to_dict()
    del old["outputs"]
    assert EngineMeta.from_dict(old).outputs == ("cls",)
    m = _meta(outputs=("tokens", "attn_cls"))
    m.save(tmp_path / "o.json")
    assert EngineMeta.load(tmp_path / "o.json") == m
    with pytest.raises(EngineMismatchError, match="outputs"):
        check_engine_compat(m, "10.3.0", "8.7", outputs=("cls",))
    assert check_engine_compat(m, "10.3.0", "8.7", outputs=("attn_cls", "tokens")) is None
    with pytest.raises(EngineMismatchError, match="unknown outputs"):
        EngineMeta.from_dict(dict(old, outputs=["patches"]))
    with pytest.raises(ValueError):
        key(outputs=("patches",))


@pytest.mark.parametrize("field,value", [
    ("model_hash", "b" * 64),
    ("trt_version", "10.3.1"),
    ("trt_version", "11.0.0"),
    ("compute_capability", (8, 6)),
    ("compute_capability", (9, 0)),
    ("precision", "fp32"),
    ("profile", (1, 16, 32)),
    ("profile", (2, 16, 64)),
    ("profile", (1, 8, 64)),
])
def test_key_changes_when_any_input_changes(field, value):
    assert key(**{field: value}) != key()


@pytest.mark.parametrize("cc", ["8.7", "sm_87", (8, 7), [8, 7]])
def test_key_ignores_spelling_of_the_same_gpu(cc):
    assert key(compute_capability=cc) == key()


def test_key_same_profile_in_any_form():
    assert key(profile=Profile(1, 16, 64)) == key(profile=[1, 16, 64]) == key(profile={"min": 1, "opt": 16, "max": 64})


@pytest.mark.parametrize("bad", [dict(precision="int4"), dict(model_hash=""), dict(trt_version=""),
                                 dict(profile=(4, 2, 8)), dict(profile=(0, 1, 2)), dict(profile=(1, 2)),
                                 dict(compute_capability="eight")])
def test_key_rejects_bad_inputs(bad):
    with pytest.raises(ValueError):
        key(**bad)


def test_normalize_compute_capability():
    assert normalize_compute_capability((7, 2)) == "7.2"
    assert normalize_compute_capability("sm_120") == "12.0"
    assert normalize_compute_capability(" 8.9 ") == "8.9"


def test_engine_path_layout(tmp_path):
    k = key()
    p = engine_path_for("abc123", "fp16", (1, 16, 64), k, cache_root=tmp_path)
    assert p.parent == tmp_path / "engines"
    assert p.name == f"abc123-fp16-b1_16_64-{k[:16]}.engine"
    assert engine_path_for("abc123", "fp16", (1, 16, 64), key(trt_version="11.0"), tmp_path) != p
    # unsafe characters in a model id never escape the cache folder
    assert engine_path_for("../x/y", "fp32", (1, 1, 1), k, tmp_path).parent == tmp_path / "engines"


def _meta(**over):
    d = dict(key=key(), model_id="m1", model_hash="a" * 64, trt_version="10.3.0", compute_capability="8.7",
             precision="fp16", profile=(1, 16, 64), input_size=224, width=768, weights_hash="w1")
    d.update(over)
    return EngineMeta(**d)


def test_compat_ok():
    assert check_engine_compat(_meta(), "10.3.0", (8, 7), model_id="m1", precision="fp16") is None
    assert check_engine_compat(_meta().to_dict(), "10.3.0", "8.7") is None
    # a bare-trunk model id (weights hash) matches too
    assert check_engine_compat(_meta(), "10.3.0", "8.7", model_id="w1") is None


@pytest.mark.parametrize("kwargs,needle", [
    (dict(trt_version="10.4.0", compute_capability="8.7"), "TensorRT 10.4.0"),
    (dict(trt_version="10.3.0", compute_capability="8.6"), "compute capability 8.7, this GPU is 8.6"),
    (dict(trt_version="10.3.0", compute_capability="8.7", model_id="other"), "model_id"),
    (dict(trt_version="10.3.0", compute_capability="8.7", precision="fp32"), "precision fp16"),
])
def test_compat_mismatch_has_clear_message(kwargs, needle):
    with pytest.raises(EngineMismatchError) as ei:
        check_engine_compat(_meta(), **kwargs)
    msg = str(ei.value)
    assert needle in msg
    assert "runa-ood build-engine" in msg


def test_meta_roundtrip_and_bad_files(tmp_path):
    m = _meta()
    p = tmp_path / "e.json"
    m.save(p)
    assert EngineMeta.load(p) == m
    assert json.loads(p.read_text())["profile"] == [1, 16, 64]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EngineMismatchError):
        EngineMeta.load(tmp_path / "bad.json")
    with pytest.raises(EngineMismatchError):
        EngineMeta.load(tmp_path / "missing.json")
    (tmp_path / "partial.json").write_text(json.dumps({"key": "x"}))
    with pytest.raises(EngineMismatchError, match="lacks"):
        EngineMeta.load(tmp_path / "partial.json")


@pytest.mark.parametrize("n,mb,expected", [
    (0, 8, []),
    (5, None, [(0, 5)]),
    (5, 0, [(0, 5)]),
    (8, 8, [(0, 8)]),
    (10, 4, [(0, 4), (4, 8), (8, 10)]),
    (3, 1, [(0, 1), (1, 2), (2, 3)]),
])
def test_split_batches(n, mb, expected):
    got = split_batches(n, mb)
    assert [(s.start, s.stop) for s in got] == expected
    covered = [i for s in got for i in range(n)[s]]
    assert covered == list(range(n))


def test_split_batches_rejects_negative():
    with pytest.raises(ValueError):
        split_batches(-1, 4)


class FakeTrtDtype:
    """What a ``tensorrt.DataType`` member looks like to the helpers (``.name``)."""

    def __init__(self, name):
        self.name = name


def test_dtype_maps():
    torch = pytest.importorskip("torch")

    assert trt_dtype_to_torch(FakeTrtDtype("HALF")) is torch.float16
    assert trt_dtype_to_torch("FLOAT") is torch.float32
    assert trt_dtype_to_torch("DataType.INT32") is torch.int32
    with pytest.raises(TypeError):
        trt_dtype_to_torch("NOPE")


def test_engine_io_dtypes_as_the_tensorrt_backend_uses_them():
    """TensorRTBackend casts views to the first dtype and allocates its output with the second."""
    torch = pytest.importorskip("torch")

    assert engine_io_dtypes(FakeTrtDtype("FLOAT"), FakeTrtDtype("FLOAT")) == (torch.float32, torch.float32)
    assert engine_io_dtypes(FakeTrtDtype("HALF"), "DataType.FLOAT") == (torch.float16, torch.float32)
    assert engine_io_dtypes("FLOAT", "HALF") == (torch.float32, torch.float16)
    with pytest.raises(EngineMismatchError, match="input 'views' has TensorRT type INT8.*build-engine"):
        engine_io_dtypes(FakeTrtDtype("INT8"), FakeTrtDtype("FLOAT"))
    with pytest.raises(EngineMismatchError, match="output 'features' has TensorRT type BF16"):
        engine_io_dtypes("FLOAT", "BF16")


def test_file_sha256(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"x" * 10)
    b = tmp_path / "b.bin"
    b.write_bytes(b"x" * 9 + b"y")
    assert file_sha256(a) != file_sha256(b)
    assert file_sha256(a) == file_sha256(a) == hashlib.sha256(b"x" * 10).hexdigest()
    # one implementation: the backends' file hash is core's (core never imports backends)
    from runa_ood_node.core import encoder

    assert file_sha256 is encoder.file_sha256
    assert encoder.file_sha256(a, memo=True) == file_sha256(a)
