"""The CPU inference engine: the pretrained musicnn backbone and trained runs on OpenVINO or ONNX Runtime.

TensorFlow trains; wherever a network only runs forward (ingest's embeddings, classify,
``musicnn-tags``, evaluation) it runs here instead, on an inference runtime, with TensorFlow
as the fallback.  No Ray in here.

Why these runtimes, and in which order (``engine="auto"``)
----------------------------------------------------------
Measured by ``bench/engine.py`` on the development machine (2 cores with AVX-512 and AMX,
shared: load 2.5-3.3; batches of 16 stored segments, one process, interleaved, medians of 3;
``bench/results/engine.json``), ms per segment at 1 thread / 2 threads: TensorFlow fp32
41.3 / 31.3, ONNX Runtime fp32 37.3 / 32.6, OpenVINO fp32 27.5 / 15.2, OpenVINO at its native
reduced precision (bf16 here) 12.0 / 7.4; its THROUGHPUT hint 8.4 at 2 threads (no gain, so
LATENCY is the default).  So ``auto`` tries OpenVINO, then ONNX Runtime, then TensorFlow: the
first that loads, compiles and answers a warm-up batch with finite numbers is used, and each
failure is recorded (``describe()["fallback"]``).  bf16 against TensorFlow on 59 tracks (330
segments): top tag equal on every track (99.7% of segments), largest difference relative to
the layer's scale 1.1e-2 (taggram), 7.3e-3 (mean_pool, the 945-d embedding), 2.4e-2 (max_pool).

Precision
---------
``precision="auto"`` leaves the runtime's own default, which is reduced precision only
where the processor runs it natively (OpenVINO: bf16 with AVX512-BF16/AMX, fp16 on ARM;
fp32 elsewhere); ``"fp32"`` forces full precision (OpenVINO's ``INFERENCE_PRECISION_HINT``
f32).  ONNX Runtime and TensorFlow always run fp32 here.  The precision actually used is
read back from the compiled model, never assumed.  int8 would need a calibrated quantised
copy of the network (NNCF) and is not offered.

What every output records
-------------------------
:meth:`Engine.describe`: ``engine``, ``precision``, ``device``, ``threads``,
``runtime_version`` (and ``hint``, ``fallback``, the model's id); put it next to every output
(ingest's manifest, ``classify.json``, the run).

Threads
-------
One engine per process (Ray worker or actor), its thread count set explicitly: runtimes
size their pools from the machine's cores and ignore Ray's CPU limits.  ``threads=0`` takes
:func:`available_threads` (the CPUs Ray assigned to this task or actor, else the CPUs this
process may run on).  OpenVINO runs one stream of ``threads`` threads (``PERFORMANCE_HINT``
LATENCY; THROUGHPUT is an option, measured by ``bench/engine.py``) with CPU pinning off, since
Ray's tasks and other actors share the cores.

The converted model, cached
---------------------------
The backbone is converted from tf-keras to ONNX once (a cold start: 7.8 s for the whole
process, TensorFlow's import included, against 5.6 s for TensorFlow alone) and cached under ``$GENRECLS_CACHE`` (else ``$XDG_CACHE_HOME/genrecls``, else
``~/.cache/genrecls``), keyed by :func:`backbone_id` (the weights' hash), the export format
and the ONNX opset; written to a temporary file and renamed, so concurrent workers never read
half a file.  A cached start needs neither TensorFlow nor tf2onnx: 0.6 s for the whole process
with OpenVINO (it reads the ONNX file and compiles it in ~0.1 s each), 0.4 s with ONNX Runtime.  ONNX is the one cached form because every
runtime reads it (OpenVINO IR would serve OpenVINO alone, and reading it is no faster here).

Outputs (:data:`BACKBONE_OUTPUTS`)
----------------------------------
:class:`BackboneEngine` returns, per stored segment, every candidate embedding at once, so
one pass feeds any later choice: ``taggram`` (50 sigmoid tags), ``penultimate`` (200),
``max_pool`` and ``mean_pool`` (753), and ``band_mean``/``band_std`` (96 each, computed in
NumPy as :func:`genrecls.models.networks.time_stats_class` does).  :func:`transfer_embedding` assembles
the 945-d embedding of :mod:`genrecls.models.transfer` (``mean_pool`` + band mean + band std).

The portable model
------------------
:func:`export_onnx` writes a whole tf-keras classifier (stored segments ``mel``
(batch, n_mels, n_frames) float32 in, ``probabilities`` out) as ONNX: ``RUN/model.onnx``.
:class:`RunEngine` scores a run folder's ``model.onnx`` on the chosen runtime (its SavedModel
with TensorFlow as the fallback).

GPUs
----
``device="auto"`` uses OpenVINO's ``GPU`` device (Intel GPUs) when OpenVINO lists one, ONNX
Runtime's CUDA provider when installed (``onnxruntime-gpu``), else TensorFlow when a CUDA GPU
is visible to this process (a Ray actor given ``num_gpus``); otherwise the CPU.  Not measured:
no GPU was available where this was written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from genrecls.core.config import ENGINES, PRECISIONS

__all__ = [
    "BACKBONE_OUTPUTS",
    "ENGINES",
    "NETWORK_OUTPUTS",
    "ONNX_OPSET",
    "PRECISIONS",
    "BackboneEngine",
    "Engine",
    "EngineError",
    "RunEngine",
    "available_threads",
    "backbone_id",
    "backbone_onnx",
    "band_stats",
    "cache_dir",
    "export_onnx",
    "transfer_embedding",
]

log = logging.getLogger("genrecls.models.engine")

#: runtimes, in the order ``auto`` tries them (fastest measured first); tensorflow is the fallback
HINTS = ("LATENCY", "THROUGHPUT")
#: every output of :class:`BackboneEngine` and its width (the musicnn network's, then the band statistics)
BACKBONE_OUTPUTS: dict[str, int] = {"taggram": 50, "penultimate": 200, "max_pool": 753, "mean_pool": 753,
                          "band_mean": 96, "band_std": 96}
#: the outputs the network itself computes (the others are NumPy statistics of the input)
NETWORK_OUTPUTS = ("taggram", "penultimate", "max_pool", "mean_pool")
ONNX_OPSET = 17
#: version of the backbone graph written to the cache (bump when :func:`_backbone_keras` changes)
_BACKBONE_FORMAT = 1
#: segments per runtime call: bounds the activations (TensorFlow needs ~9 MB per segment)
DEFAULT_BATCH = 16
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i8": "int8"}


class EngineError(RuntimeError):
    """No runtime could run the model (not even TensorFlow)."""


# ---------------------------------------------------------------------------- environment

def available_threads() -> int:
    """Threads an engine in this process should use: the CPUs Ray assigned to this task or actor
    (rounded up, at least 1), else the CPUs this process may run on."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to ask
    if ray is not None:
        try:
            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                if ctx.worker.mode != 0:  # not the driver (SCRIPT_MODE is 0)
                    cpus = float(ctx.get_assigned_resources().get("CPU", 0.0))
                    return max(1, math.ceil(cpus))
        except Exception as exc:  # noqa: BLE001  (an old or partial Ray: fall through)
            log.debug("Ray's assigned CPUs unknown: %s", exc)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cache_dir() -> Path:
    """Where converted models are kept: ``$GENRECLS_CACHE``, else ``$XDG_CACHE_HOME/genrecls``, else ``~/.cache/genrecls``."""
    if os.environ.get("GENRECLS_CACHE"):
        return Path(os.environ["GENRECLS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genrecls"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_visible() -> bool:
    """An NVIDIA GPU this process may use (cheap: no CUDA library is loaded to ask).

    In a Ray task or actor: the GPUs Ray assigned to it; elsewhere: the NVIDIA driver's device
    node, unless ``CUDA_VISIBLE_DEVICES`` hides every GPU.
    """
    import sys

    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized() and ray.get_runtime_context().worker.mode != 0:
                return bool(ray.get_gpu_ids())
        except Exception as exc:  # noqa: BLE001
            log.debug("Ray's assigned GPUs unknown: %s", exc)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return False
    return os.path.exists("/dev/nvidiactl")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a run's files are as readable as the rest
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------- the backbone

def backbone_id(variant: str = "MSD_musicnn") -> str:
    """``<variant>-<12 hex of BLAKE2b of its weights file>``: changes exactly when the weights do."""
    from genrecls.models.musicnn import weights_path

    h = hashlib.blake2b(Path(weights_path(variant)).read_bytes(), digest_size=6).hexdigest()
    return f"{variant.lower()}-{h}"


def band_stats(mels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over time of each band of (n, n_mels, n_frames) segments, float32.

    The rule of :func:`genrecls.models.networks.time_stats_class` (``sqrt(max(E[x^2] - E[x]^2, 0) + 1e-6)``).
    """
    x = np.asarray(mels, dtype=np.float32)
    mean = x.mean(axis=2, dtype=np.float32)
    sq = np.square(x).mean(axis=2, dtype=np.float32)
    std = np.sqrt(np.maximum(sq - np.square(mean), np.float32(0)) + np.float32(1e-6))
    return mean, std


def transfer_embedding(out: dict[str, np.ndarray]) -> np.ndarray:
    """The 945-d embedding of :mod:`genrecls.models.transfer` from :class:`BackboneEngine` outputs:
    ``mean_pool`` (753), then ``band_mean`` and ``band_std`` (96 each), float32."""
    return np.concatenate([out["mean_pool"], out["band_mean"], out["band_std"]], axis=1).astype(np.float32, copy=False)


def _backbone_keras(variant: str = "MSD_musicnn"):
    """The pretrained network on stored (batch, 96, 187) segments, outputs :data:`NETWORK_OUTPUTS` by name."""
    from genrecls.models.musicnn import MUSICNN_FEATURES, load_musicnn
    from genrecls.models.networks import keras

    k = keras()
    net = load_musicnn(variant)
    inputs = k.Input(shape=(MUSICNN_FEATURES["n_mels"], MUSICNN_FEATURES["patch_frames"]), name="mel")
    out = net(k.layers.Permute((2, 1), name="time_first")(inputs), training=False)
    return k.Model(inputs, {name: k.layers.Identity(name=name)(out[name]) for name in NETWORK_OUTPUTS},
                   name="musicnn_backbone")


def _backbone_tf(variant: str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The TensorFlow fallback: the Keras backbone in a traced function (float32 in, NumPy dict out)."""
    from genrecls.models.musicnn import MUSICNN_FEATURES
    from genrecls.models.networks import import_tensorflow

    tf = import_tensorflow()
    model = _backbone_keras(variant)
    shape = [None, MUSICNN_FEATURES["n_mels"], MUSICNN_FEATURES["patch_frames"]]
    fn = tf.function(lambda mel: model(mel, training=False), input_signature=[tf.TensorSpec(shape, tf.float32)])
    return lambda x: {name: v.numpy() for name, v in fn(tf.constant(x)).items()}


def backbone_onnx(variant: str = "MSD_musicnn", *, cache: str | os.PathLike | None = None) -> Path:
    """The backbone as ONNX in the cache, converted (once, with TensorFlow and tf2onnx) if missing.

    Input ``mel`` (batch, 96, 187) float32 (stored layout); outputs :data:`NETWORK_OUTPUTS`.
    """
    path = Path(cache or cache_dir()) / "engine" / f"{backbone_id(variant)}.f{_BACKBONE_FORMAT}.opset{ONNX_OPSET}.onnx"
    if path.is_file() and path.stat().st_size > 0:
        return path
    t0 = time.perf_counter()
    export_onnx(_backbone_keras(variant), path, output_name=None)
    log.info("converted the %s backbone to ONNX in %.1f s: %s", variant, time.perf_counter() - t0, path)
    return path


# ---------------------------------------------------------------------------- ONNX export

def export_onnx(model: Any, path: str | os.PathLike, *, input_shape: tuple[int, ...] | None = None,
                input_name: str = "mel", output_name: str | None = "probabilities",
                opset: int = ONNX_OPSET) -> dict[str, Any]:
    """Write a tf-keras model as ONNX (tf2onnx), in inference mode, atomically.

    Parameters
    ----------
    model : a tf-keras model with one input
    path : the ``.onnx`` file to write (local; parent folders are made)
    input_shape : the input's shape without the batch (default: the model's)
    input_name : the ONNX input's name (``mel``: stored segments, float32, dynamic batch)
    output_name : the name of the ONNX output for a single-output model (``probabilities``);
        ``None`` keeps a dict-output model's names
    opset : ONNX opset

    Returns
    -------
    dict: ``path``, ``opset``, ``inputs`` and ``outputs`` (name and shape), ``converter``.
    """
    from genrecls.models.networks import import_tensorflow

    tf = import_tensorflow()
    for name in ("tf2onnx", "tf2onnx.tfonnx", "tf2onnx.shape_inference", "tf2onnx.optimizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import tf2onnx

    shape = list(input_shape) if input_shape is not None else list(model.inputs[0].shape[1:])
    spec = [tf.TensorSpec([None, *shape], tf.float32, name=input_name)]
    # from_keras, not from_function: it freezes the constants a layer captures (a Normalization's mean),
    # which from_function would leave as extra graph inputs; Keras traces in inference mode
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    if output_name is not None:
        if len(proto.graph.output) != 1:
            raise ValueError(f"output_name given for a model with {len(proto.graph.output)} outputs")
        old = proto.graph.output[0].name
        if old != output_name:  # the last layer's name is the model's: expose the fixed name
            from onnx import helper

            proto.graph.node.append(helper.make_node("Identity", [old], [output_name], name=f"{output_name}_out"))
            proto.graph.output[0].name = output_name
    others = [v.name for v in proto.graph.input if v.name != input_name]
    if others:
        raise ValueError(f"the ONNX graph needs inputs besides {input_name!r}: {others}")
    meta = proto.metadata_props.add()
    meta.key, meta.value = "genrecls", f"input {input_name} (batch, {', '.join(map(str, shape))}) float32"
    _write_atomic(Path(path), proto.SerializeToString())

    def dims(v):
        return [d.dim_value or None for d in v.type.tensor_type.shape.dim]

    return {"path": str(path), "opset": opset, "converter": f"tf2onnx {tf2onnx.__version__}",
            "inputs": [{"name": v.name, "shape": dims(v)} for v in proto.graph.input],
            "outputs": [{"name": v.name, "shape": dims(v)} for v in proto.graph.output]}


# ---------------------------------------------------------------------------- runtimes

class _OpenVINO:
    name = "openvino"

    def __init__(self, onnx_path: Path, *, threads: int, precision: str, device: str, hint: str):
        import openvino as ov

        core = ov.Core()
        if device == "auto":
            device = "GPU" if any(d.startswith("GPU") for d in core.available_devices) else "CPU"
        device = device.upper()
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        if device == "CPU":
            config.update({"INFERENCE_NUM_THREADS": int(threads), "ENABLE_CPU_PINNING": False})
            if hint == "LATENCY":
                config["NUM_STREAMS"] = 1
        if precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self.compiled = core.compile_model(core.read_model(str(onnx_path)), device, config)
        self.outputs = [(o.get_any_name(), o) for o in self.compiled.outputs]
        self.device = device
        self.version = ov.__version__.split("-")[0]
        self.hint = hint
        prec = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # what it compiled to, an ov.Type
        prec = prec.get_type_name() if hasattr(prec, "get_type_name") else str(prec)
        self.precision = _PRECISION_NAMES.get(prec, prec)
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS")) if device == "CPU" else int(threads)
        self.streams = int(self.compiled.get_property("NUM_STREAMS")) if device == "CPU" else 1
        self.request = self.compiled.create_infer_request()
        self.queue = None
        if self.streams > 1:  # THROUGHPUT: one request per stream, the batch split among them
            self.queue = ov.AsyncInferQueue(self.compiled, self.streams)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.queue is None or len(x) < 2:
            self.request.infer({0: x})
            return {name: self.request.get_tensor(o).data.copy() for name, o in self.outputs}
        parts = np.array_split(x, min(self.streams, len(x)))
        results: list[dict[str, np.ndarray] | None] = [None] * len(parts)

        def done(req, i):
            results[i] = {name: req.get_tensor(o).data.copy() for name, o in self.outputs}

        self.queue.set_callback(done)
        for i, part in enumerate(parts):
            self.queue.start_async({0: np.ascontiguousarray(part)}, i)
        self.queue.wait_all()
        return {name: np.concatenate([r[name] for r in results]) for name, _ in self.outputs}


class _OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, onnx_path: Path, *, threads: int, precision: str, device: str, hint: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # cores are shared with Ray's tasks
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "gpu", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.names = [o.name for o in self.session.get_outputs()]
        self.device = "GPU" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "CPU"
        self.version = ort.__version__
        self.precision = "fp32"
        self.threads = int(self.session.get_session_options().intra_op_num_threads)
        self.hint = None

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, {self.input: x})))


class _TensorFlow:
    name = "tensorflow"

    def __init__(self, load: Callable[[], Callable[[np.ndarray], dict[str, np.ndarray]]], *, threads: int,
                 precision: str, device: str, hint: str, need_gpu: bool = False):
        from genrecls.models.networks import import_tensorflow, set_tf_threads

        tf = import_tensorflow()
        set_tf_threads(threads)  # only before TensorFlow's first op in this process
        gpus = tf.config.list_physical_devices("GPU")
        if need_gpu and not gpus:
            raise EngineError("TensorFlow sees no GPU (a CPU-only TensorFlow, or no CUDA libraries)")
        self.fn = load()
        self.device = "GPU" if gpus and device != "cpu" else "CPU"
        if self.device == "CPU" and gpus:
            self.fn = _on_cpu(tf, self.fn)
        self.version = tf.__version__
        self.precision = "fp32"
        # 0: TensorFlow's own default (every core), when it ran before this engine could set it
        self.threads = int(tf.config.threading.get_intra_op_parallelism_threads()) or (os.cpu_count() or 1)
        self.hint = None

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.fn(x)


def _on_cpu(tf, fn):
    def run(x):
        with tf.device("/CPU:0"):
            return fn(x)
    return run


_RUNTIMES = {"openvino": _OpenVINO, "onnxruntime": _OnnxRuntime}


class Engine:
    """A model on the chosen inference runtime, TensorFlow as the fallback; one per process.

    Parameters
    ----------
    onnx : the model as ONNX, or a callable returning its path (called only when an ONNX runtime
        is tried; may raise, e.g. when tf2onnx is missing, which is then recorded as a fallback)
    tf_load : a callable returning the TensorFlow fallback, ``f(float32 array) -> dict of arrays``
    engine : ``auto`` (OpenVINO, then ONNX Runtime, then TensorFlow) or one of them; a named
        runtime that fails falls back to TensorFlow, recorded
    precision : ``auto`` (the runtime's native reduced precision where the CPU has it) or ``fp32``
    threads : threads of this engine (0 = :func:`available_threads`)
    device : ``auto`` (a GPU where a runtime sees one), ``cpu``, or a runtime's device name
    hint : OpenVINO's ``PERFORMANCE_HINT``: ``LATENCY`` (one stream of ``threads`` threads) or ``THROUGHPUT``
    batch_size : segments per runtime call
    probe_shape : shape of one input without the batch (a zero batch of one is run to check the runtime)
    model_id : what runs (recorded by :meth:`describe`)
    """

    def __init__(self, onnx: str | os.PathLike | Callable[[], Path] | None,
                 tf_load: Callable[[], Callable[[np.ndarray], dict[str, np.ndarray]]] | None, *,
                 engine: str = "auto", precision: str = "auto", threads: int = 0, device: str = "auto",
                 hint: str = "LATENCY", batch_size: int = DEFAULT_BATCH, probe_shape: tuple[int, ...] | None = None,
                 model_id: str | None = None):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        hint = str(hint).upper()
        if hint not in HINTS:
            raise ValueError(f"hint must be one of {', '.join(HINTS)}, got {hint!r}")
        if int(threads) < 0 or int(batch_size) < 1:
            raise ValueError(f"threads must be >= 0 and batch_size >= 1, got {threads!r}, {batch_size!r}")
        device = str(device).lower()
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
        self.requested = {"engine": engine, "precision": precision, "threads": int(threads), "device": device}
        self.threads_wanted = int(threads) or available_threads()
        self.batch_size = int(batch_size)
        self.model_id = model_id
        self.fallback: list[str] = []
        self.load_seconds = 0.0
        if engine == "auto":
            order = ["openvino", "onnxruntime", "tensorflow"]
            if device == "auto" and _cuda_visible():  # an NVIDIA GPU: OpenVINO cannot use it; ONNX Runtime's
                # CUDA provider (onnxruntime-gpu) or TensorFlow with CUDA can, else the CPU order
                order = list(dict.fromkeys((["onnxruntime"] if _has_ort_cuda() else []) + ["tensorflow-gpu"] + order))
        else:
            order = [engine] if engine == "tensorflow" else [engine, "tensorflow"]
        t0 = time.perf_counter()
        onnx_path: Path | None = None
        self.runtime = None
        for name in order:
            try:
                if name in ("tensorflow", "tensorflow-gpu"):
                    if tf_load is None:
                        raise EngineError("no TensorFlow fallback for this model")
                    rt = _TensorFlow(tf_load, threads=self.threads_wanted, precision=precision, device=device, hint=hint,
                                     need_gpu=name == "tensorflow-gpu")
                else:
                    if onnx_path is None:
                        if onnx is None:
                            raise EngineError("no ONNX model")
                        onnx_path = Path(onnx() if callable(onnx) else onnx)
                    rt = _RUNTIMES[name](onnx_path, threads=self.threads_wanted, precision=precision, device=device,
                                         hint=hint)
                if probe_shape is not None:  # a runtime that compiles but cannot run is a failure too
                    out = rt(np.zeros((1, *probe_shape), np.float32))
                    bad = [k for k, v in out.items() if not np.isfinite(v).all()]
                    if bad:
                        raise EngineError(f"non-finite outputs on a zero input: {', '.join(bad)}")
                self.runtime = rt
                break
            except Exception as exc:  # noqa: BLE001  (an import, conversion or compile error: try the next)
                reason = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                self.fallback.append(reason)
                if engine != "auto" or name != "tensorflow":
                    log.warning("inference engine %s unavailable, falling back: %s", name, reason)
        if self.runtime is None:
            raise EngineError("no inference runtime could run the model: " + "; ".join(self.fallback))
        self.load_seconds = time.perf_counter() - t0

    @property
    def engine(self) -> str:
        return self.runtime.name

    @property
    def precision(self) -> str:
        return self.runtime.precision

    def describe(self) -> dict[str, Any]:
        """What runs, for recording next to every output: engine, precision, device, threads, runtime_version, ...

        ``fallback`` lists the runtimes tried before this one and why each failed (None if the
        first choice runs).
        """
        rt = self.runtime
        return {"engine": rt.name, "precision": rt.precision, "device": rt.device, "threads": rt.threads,
                "runtime_version": rt.version, "hint": rt.hint, "model": self.model_id,
                "requested": dict(self.requested), "fallback": list(self.fallback) or None}

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The model's outputs (float32, keyed by name) for a batch of inputs, ``batch_size`` at a time."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) <= self.batch_size:
            return {k: np.asarray(v, np.float32) for k, v in self.runtime(x).items()}
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(x), self.batch_size):
            for k, v in self.runtime(x[i:i + self.batch_size]).items():
                parts.setdefault(k, []).append(np.asarray(v, np.float32))
        return {k: np.concatenate(v) for k, v in parts.items()}


def _has_ort_cuda() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except Exception:  # noqa: BLE001
        return False


class BackboneEngine:
    """The pretrained musicnn backbone on the chosen runtime: stored segments -> every candidate layer.

    Create one per process (Ray worker or actor) and keep it; see :class:`Engine` for the
    arguments.  Calling it on stored log-mel segments (n, 96, 187), float16 or float32, returns
    a dict of float32 arrays with n rows, keyed as :data:`BACKBONE_OUTPUTS`.

    Examples
    --------
    >>> eng = BackboneEngine(threads=1)                          # doctest: +SKIP
    >>> out = eng(mels)                                          # doctest: +SKIP
    >>> transfer_embedding(out).shape, eng.describe()["engine"]  # doctest: +SKIP
    ((n, 945), 'openvino')
    """

    def __init__(self, engine: str = "auto", precision: str = "auto", threads: int = 0, *, device: str = "auto",
                 hint: str = "LATENCY", batch_size: int = DEFAULT_BATCH, variant: str = "MSD_musicnn",
                 cache: str | os.PathLike | None = None):
        from genrecls.models.musicnn import MUSICNN_FEATURES

        self.variant = variant
        self.input_shape = (MUSICNN_FEATURES["n_mels"], MUSICNN_FEATURES["patch_frames"])
        self._id = backbone_id(variant)
        self.engine = Engine(lambda: backbone_onnx(variant, cache=cache), lambda: _backbone_tf(variant),
                             engine=engine, precision=precision, threads=threads, device=device, hint=hint,
                             batch_size=batch_size, probe_shape=self.input_shape, model_id=self._id)

    def backbone_id(self) -> str:
        return self._id

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    def __call__(self, mels: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(mels)
        if x.ndim != 3 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"segments must have shape (n, {self.input_shape[0]}, {self.input_shape[1]}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 0:
            return {name: np.zeros((0, width), np.float32) for name, width in BACKBONE_OUTPUTS.items()}
        out = {name: v for name, v in self.engine.run(x).items() if name in NETWORK_OUTPUTS}
        out["band_mean"], out["band_std"] = band_stats(x)
        return out

    def embed(self, mels: np.ndarray) -> np.ndarray:
        """The 945-d transfer embedding of each segment (:func:`transfer_embedding`)."""
        return transfer_embedding(self(mels))


class RunEngine:
    """A run folder's classifier on the chosen runtime: ``RUN/model.onnx``, else its SavedModel on TensorFlow.

    ``run_dir`` is a local folder (copy a remote run first).  :meth:`predict` takes stored
    segments (n, n_mels, n_frames) and returns probabilities (n, n_labels) float32.
    """

    def __init__(self, run_dir: str | os.PathLike, *, input_shape: tuple[int, int], engine: str = "auto",
                 precision: str = "auto", threads: int = 0, device: str = "auto", hint: str = "LATENCY",
                 batch_size: int = DEFAULT_BATCH, model_id: str | None = None, n_labels: int | None = None):
        run_dir = Path(run_dir)
        self.n_labels = n_labels
        onnx = run_dir / "model.onnx"
        self.input_shape = tuple(input_shape)

        def tf_load():
            from genrecls.models.networks import import_tensorflow

            tf = import_tensorflow()
            fn = tf.saved_model.load(str(run_dir / "model")).signatures["serving_default"]
            return lambda x: {"probabilities": fn(mel=tf.constant(x))["probabilities"].numpy()}

        self.engine = Engine(onnx if onnx.is_file() else None, tf_load if (run_dir / "model").is_dir() else None,
                             engine=engine, precision=precision, threads=threads, device=device, hint=hint,
                             batch_size=batch_size, probe_shape=self.input_shape, model_id=model_id)

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    def predict(self, mels: np.ndarray) -> np.ndarray:
        x = np.asarray(mels)
        if x.ndim != 3 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"segments must have shape (n, {self.input_shape[0]}, {self.input_shape[1]}), got {x.shape}")
        if len(x) == 0:
            return np.zeros((0, self.n_labels or 0), np.float32)
        out = self.engine.run(x)
        return out["probabilities"] if "probabilities" in out else next(iter(out.values()))
