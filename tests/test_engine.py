"""The inference engine (genrecls.models.engine) against TensorFlow, on real encoders' files.

Input: the intact files of ``tests/data/encoders`` (made by real encoders: lame, ffmpeg,
flac, oggenc, opusenc, ...) decoded and featurised by genrecls' own pipeline with the
``musicnn`` preset, rounded to float16 as stored.  Reference: the Keras network of
:mod:`genrecls.models.musicnn` and the embedding model of :mod:`genrecls.models.transfer` on TensorFlow.

"Relative difference" below is ``max |engine - tf| / max |tf|`` per layer (relative to the
layer's scale: element-wise ratios are meaningless next to ReLU zeros).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from genrecls.models import engine as E

DATA = os.path.join(os.path.dirname(__file__), "data", "encoders")
#: fp32 on another runtime: kernels differ in summation order only
FP32_TOL = 1e-5
#: model.onnx against the SavedModel (the issue's target)
ONNX_TOL = 1e-4
HAVE_OV = importlib.util.find_spec("openvino") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
RUNTIMES = [pytest.param("openvino", marks=pytest.mark.skipif(not HAVE_OV, reason="openvino not installed")),
            pytest.param("onnxruntime", marks=pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed"))]

pytestmark = pytest.mark.timeout(180)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def mels():
    """One stored segment per intact real-encoder fixture: (n, 96, 187) float16."""
    from genrecls.audio import AudioError
    from genrecls.audio.pipeline import track_features
    from genrecls.core.config import feature_preset

    cfg = feature_preset("musicnn")
    with open(os.path.join(DATA, "manifest.json")) as f:
        files = [e["path"] for e in json.load(f)["files"] if e["state"] == "intact"]
    out = []
    for rel_path in files:
        try:
            out.append(track_features(os.path.join(DATA, rel_path), cfg).mels[:1])
        except AudioError:
            continue
    x = np.concatenate(out).astype(np.float16)
    assert x.shape[1:] == (96, 187) and len(x) >= 20
    return x


@pytest.fixture(scope="module")
def reference(mels):
    """TensorFlow's outputs: the musicnn network's layers and the transfer model's 945-d embedding."""
    from genrecls.models.musicnn import load_musicnn, predict
    from genrecls.models.transfer import build_backbone

    x = mels.astype(np.float32)
    ref = predict(load_musicnn(), np.ascontiguousarray(x.transpose(0, 2, 1)), batch_size=16)
    ref["embedding"] = build_backbone()(x, training=False).numpy()
    return ref


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-cache")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fp32_matches_tensorflow(runtime, mels, reference, cache):
    """Reduced precision forced off: every layer equals TensorFlow's within fp32 tolerance."""
    eng = E.BackboneEngine(runtime, "fp32", threads=1, cache=cache)
    d = eng.describe()
    assert (d["engine"], d["precision"], d["device"], d["threads"], d["fallback"]) == (runtime, "fp32", "CPU", 1, None)
    out = eng(mels)
    assert {k: v.shape for k, v in out.items()} == {k: (len(mels), w) for k, w in E.BACKBONE_OUTPUTS.items()}
    for name in E.NETWORK_OUTPUTS:
        assert rel(out[name], reference[name]) < FP32_TOL, name
    assert rel(E.transfer_embedding(out), reference["embedding"]) < FP32_TOL
    assert rel(eng.embed(mels[:4]), reference["embedding"][:4]) < FP32_TOL
    assert all(v.dtype == np.float32 for v in out.values())


def test_auto_precision_agrees_with_tensorflow(mels, reference, cache, record_property):
    """``auto``: the native reduced precision where the CPU has it; the tags' top-1 as TensorFlow's."""
    eng = E.BackboneEngine("auto", "auto", threads=1, cache=cache)
    d = eng.describe()
    assert d["engine"] == ("openvino" if HAVE_OV else "onnxruntime" if HAVE_ORT else "tensorflow")
    assert d["precision"] in ("fp32", "bf16", "fp16")
    out = eng(mels)
    diffs = {name: rel(out[name], reference[name]) for name in E.NETWORK_OUTPUTS}
    record_property("auto_precision", d["precision"])
    record_property("auto_max_rel_diff", diffs)
    print(f"\nauto: {d['engine']} {d['precision']}; max relative difference per layer: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    np.testing.assert_array_equal(out["taggram"].argmax(1), reference["taggram"].argmax(1))
    tol = FP32_TOL if d["precision"] == "fp32" else 5e-2  # bf16 keeps 8 bits of mantissa
    assert max(diffs.values()) < tol, diffs


def test_tensorflow_when_asked(mels, reference):
    eng = E.BackboneEngine("tensorflow", "auto", threads=1)
    d = eng.describe()
    assert (d["engine"], d["precision"], d["fallback"]) == ("tensorflow", "fp32", None)
    out = eng(mels[:5])
    for name in E.NETWORK_OUTPUTS:
        assert rel(out[name], reference[name][:5]) < FP32_TOL, name


def test_falls_back_to_tensorflow_when_runtimes_are_missing_or_fail(mels, reference, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    eng = E.BackboneEngine("auto", threads=1, cache=cache)
    d = eng.describe()
    assert d["engine"] == "tensorflow"
    assert [f.split(":")[0] for f in d["fallback"]] == ["openvino", "onnxruntime"]
    assert rel(eng(mels[:3])["mean_pool"], reference["mean_pool"][:3]) < FP32_TOL
    monkeypatch.undo()

    def broken():
        raise RuntimeError("conversion failed")

    named = E.Engine(broken, lambda: (lambda x: {"y": x.sum(axis=(1, 2))[:, None]}), engine="openvino",
                     threads=1, probe_shape=(2, 3))
    assert named.engine == "tensorflow" and "conversion failed" in named.describe()["fallback"][0]
    with pytest.raises(E.EngineError):
        E.Engine(broken, None, engine="onnxruntime", threads=1)
    with pytest.raises(ValueError):
        E.BackboneEngine("tensorrt")
    with pytest.raises(ValueError):
        E.BackboneEngine(precision="int4")
    with pytest.raises(ValueError):
        E.BackboneEngine(device="tpu")


@pytest.mark.skipif(not HAVE_OV, reason="openvino not installed")
def test_a_visible_gpu_that_tensorflow_cannot_use_leaves_the_cpu_order(cache, monkeypatch):
    """With an NVIDIA GPU visible, ``auto`` tries the GPU runtimes first; none here, so the CPU order follows."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present: the GPU path applies")
    monkeypatch.setattr(E, "_cuda_visible", lambda: True)
    eng = E.BackboneEngine("auto", "fp32", threads=1, cache=cache)
    d = eng.describe()
    assert (d["engine"], d["device"]) == ("openvino", "CPU")
    assert d["fallback"][-1].startswith("tensorflow-gpu: EngineError: TensorFlow sees no GPU")


@pytest.mark.skipif(not HAVE_OV, reason="openvino not installed")
def test_threads_are_set_explicitly(mels, cache):
    """The thread count is read back from the compiled model, not assumed."""
    for threads in (1, 2):
        ov = E.BackboneEngine("openvino", "fp32", threads=threads, cache=cache)
        assert int(ov.engine.runtime.compiled.get_property("INFERENCE_NUM_THREADS")) == threads
        assert ov.describe()["threads"] == threads
        assert ov.engine.runtime.compiled.get_property("ENABLE_CPU_PINNING") is False
    if HAVE_ORT:
        ort = E.BackboneEngine("onnxruntime", threads=2, cache=cache)
        assert ort.engine.runtime.session.get_session_options().intra_op_num_threads == 2
    assert E.BackboneEngine("openvino", threads=0, cache=cache).describe()["threads"] == E.available_threads()
    tp = E.BackboneEngine("openvino", "fp32", threads=2, hint="THROUGHPUT", cache=cache)
    assert tp.describe()["hint"] == "THROUGHPUT"
    assert rel(tp(mels[:4])["taggram"], ov(mels[:4])["taggram"]) < FP32_TOL


def test_threads_follow_ray(ray_local):
    """Inside a Ray task the engine's default thread count is the CPUs Ray gave it."""
    @ray_local.remote(num_cpus=1)
    def threads():
        from genrecls.models.engine import available_threads

        return available_threads()

    assert ray_local.get(threads.remote()) == 1
    assert E.available_threads() >= 1


def test_identity_and_cache(mels, cache):
    bid = E.backbone_id()
    assert bid == E.backbone_id() and bid.startswith("msd_musicnn-") and len(bid.split("-")[1]) == 12
    path = E.backbone_onnx(cache=cache)
    assert path.parent == cache / "engine" and bid in path.name
    mtime = path.stat().st_mtime_ns
    eng = E.BackboneEngine("onnxruntime", threads=1, cache=cache)
    assert path.stat().st_mtime_ns == mtime  # loaded from the cache, not converted again
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert eng.backbone_id() == bid
    d = eng.describe()
    assert {"engine", "precision", "device", "threads", "runtime_version"} <= set(d) and d["model"] == bid
    json.dumps(d)
    assert eng(mels[:0])["taggram"].shape == (0, 50)
    with pytest.raises(ValueError):
        eng(mels[:, :, :100])


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
def test_model_onnx_matches_the_savedmodel(mels, tmp_path):
    """A run's whole classifier as ONNX (stored segments in, probabilities out) equals its SavedModel."""
    import onnxruntime as ort
    import tensorflow as tf

    from genrecls.core.config import feature_preset
    from genrecls.models.inference import export_model
    from genrecls.models.transfer import EMBEDDING_DIM, HEAD_LAYER, build_musicnn_classifier

    rng = np.random.default_rng(0)
    labels = ["ambient", "jazz", "metal"]
    model = build_musicnn_classifier((96, 187), len(labels), mean=rng.normal(size=EMBEDDING_DIM),
                                     std=rng.uniform(0.5, 2, size=EMBEDDING_DIM))
    model.get_layer(HEAD_LAYER).set_weights([rng.normal(size=(EMBEDDING_DIM, 3)).astype(np.float32) * 0.2,
                                             np.array([0.1, -0.2, 0.05], np.float32)])
    run = tmp_path / "run"
    export_model(model, str(run), labels=labels, features=feature_preset("musicnn"), model_name="musicnn")
    info = E.export_onnx(model, run / "model.onnx")
    assert info["inputs"] == [{"name": "mel", "shape": [None, 96, 187]}]
    assert info["outputs"] == [{"name": "probabilities", "shape": [None, 3]}]

    x = mels.astype(np.float32)
    saved = tf.saved_model.load(str(run / "model")).signatures["serving_default"]
    want = saved(mel=tf.constant(x))["probabilities"].numpy()
    sess = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["probabilities"], {"mel": x})[0]
    assert np.abs(got - want).max() < ONNX_TOL
    assert np.abs(got.sum(1) - 1).max() < 1e-5

    fp32 = E.RunEngine(run, input_shape=(96, 187), precision="fp32", threads=1, n_labels=3)
    assert np.abs(fp32.predict(mels) - want).max() < ONNX_TOL
    assert fp32.predict(mels[:0]).shape == (0, 3)
    (run / "model.onnx").unlink()  # a run written before model.onnx existed: its SavedModel on TensorFlow
    old = E.RunEngine(run, input_shape=(96, 187), threads=1)
    assert old.describe()["engine"] == "tensorflow"
    assert np.abs(old.predict(mels) - want).max() < 1e-6


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
@pytest.mark.parametrize("name", ["tutorial", "default", "cnn2d", "linear"])
def test_every_model_exports_to_onnx(name, tmp_path):
    """Every train.model (musicnn above) converts; its ONNX answers as the Keras model does."""
    import onnxruntime as ort

    from genrecls.models import build_model

    shape = (32, 44)
    model = build_model(name, shape, 4, mean=np.linspace(-60, -20, 32), std=np.full(32, 12.0))
    x = np.random.default_rng(1).uniform(-80, 0, size=(6, *shape)).astype(np.float32)
    info = E.export_onnx(model, tmp_path / "model.onnx")
    assert [o["name"] for o in info["outputs"]] == ["probabilities"]
    got = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"mel": x})[0]
    assert np.abs(got - model(x, training=False).numpy()).max() < ONNX_TOL
