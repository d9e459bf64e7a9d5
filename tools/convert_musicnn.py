"""Convert a musicnn 0.1.0 TF1 checkpoint into the weights file genrecls ships (run once).

Reads the checkpoint inside the ``musicnn`` wheel (ISC licence) with TensorFlow's checkpoint
reader, keeps the model's variables (the Adam slot variables and step counters are dropped),
renames them to the layers of :func:`genrecls.models.musicnn.build_musicnn`, reshapes the mid-end
kernels (TF1 2-D convolutions spanning all channels -> 1-D convolutions), checks that every
weight of the Keras model gets exactly one checkpoint variable of the right shape, and writes
``genrecls/weights/<variant>.npz`` (float32, keys ``<layer>/<weight>``) and
``genrecls/weights/LICENSE-musicnn`` atomically.

    /work/main/.venv/bin/pip download --no-deps musicnn==0.1.0 -d /tmp/musicnn-wheel
    PYTHONPATH=$PWD python tools/convert_musicnn.py --wheel /tmp/musicnn-wheel/musicnn-0.1.0-py3-none-any.whl
    PYTHONPATH=$PWD python tools/convert_musicnn.py --wheel ... --variant MTT_musicnn   # not shipped
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: Keras layer -> TF1 variable scope, in the order the original models.py creates them
LAYER_MAP = {
    "input_bn": "batch_normalization",
    "timbral_74": "conv2d", "timbral_74_bn": "batch_normalization_1",
    "timbral_77": "conv2d_1", "timbral_77_bn": "batch_normalization_2",
    "temporal_128": "conv2d_2", "temporal_128_bn": "batch_normalization_3",
    "temporal_64": "conv2d_3", "temporal_64_bn": "batch_normalization_4",
    "temporal_32": "conv2d_4", "temporal_32_bn": "batch_normalization_5",
    "midend_1": "conv2d_5", "midend_1_bn": "batch_normalization_6",
    "midend_2": "conv2d_6", "midend_2_bn": "batch_normalization_7",
    "midend_3": "conv2d_7", "midend_3_bn": "batch_normalization_8",
    "pool_bn": "batch_normalization_9",
    "penultimate_dense": "dense", "penultimate": "batch_normalization_10",
    "logits": "dense_1",
}
#: mid-end convolutions: TF1 kernel (7, channels, 1, filters) -> Conv1D kernel (7, channels, filters)
CONV1D = {"midend_1", "midend_2", "midend_3"}

LICENSE_HEADER = """\
The files msd_musicnn.npz (and mtt_musicnn.npz where present) in this folder are the trained
weights of the musicnn models, converted by tools/convert_musicnn.py from the TensorFlow
checkpoints in the musicnn 0.1.0 package (https://github.com/jordipons/musicnn,
https://pypi.org/project/musicnn/0.1.0/), which is distributed under the ISC licence below.
Reference: J. Pons and X. Serra, "musicnn: pre-trained convolutional neural networks for
music audio tagging", ISMIR 2019 late-breaking/demo.

"""


def read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """The model variables of a TF1 checkpoint (no optimizer slots, no counters)."""
    from genrecls.models.networks import import_tensorflow

    tf = import_tensorflow()
    # tf.train.load_checkpoint(dir) follows the folder's 'checkpoint' file, which in the wheel
    # points to the author's machine; the reader it wraps takes the prefix directly.
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    out = {}
    for name in reader.get_variable_to_shape_map():
        if "/Adam" in name or name in ("beta1_power", "beta2_power", "global_step"):
            continue
        out[name] = np.asarray(reader.get_tensor(name), dtype=np.float32)
    return out


def convert(variables: dict[str, np.ndarray], n_tags: int) -> dict[str, np.ndarray]:
    """Rename and reshape checkpoint variables for :func:`genrecls.models.musicnn.build_musicnn`."""
    from genrecls.models.musicnn import build_musicnn

    model = build_musicnn(n_tags=n_tags)
    out, used = {}, set()
    for layer in model.layers:
        for w in layer.weights:
            short = w.name.split("/")[-1].split(":")[0]
            src = f"{LAYER_MAP[layer.name]}/{short}"
            value = variables[src]
            if layer.name in CONV1D and short == "kernel":
                value = value.reshape(value.shape[0], value.shape[1], value.shape[3])
            if tuple(value.shape) != tuple(w.shape):
                raise ValueError(f"{src} -> {layer.name}/{short}: shape {value.shape} != {tuple(w.shape)}")
            out[f"{layer.name}/{short}"] = np.ascontiguousarray(value, dtype=np.float32)
            used.add(src)
    left = sorted(set(variables) - used)
    if left:
        raise ValueError(f"checkpoint variables not mapped: {left}")
    return out


def main(argv=None) -> int:
    from genrecls.models.musicnn import VARIANTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", required=True, help="musicnn-0.1.0-py3-none-any.whl")
    ap.add_argument("--variant", default="MSD_musicnn", choices=sorted(VARIANTS))
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "genrecls", "weights"))
    args = ap.parse_args(argv)

    filename, tags = VARIANTS[args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.wheel) as wheel:
            wheel.extractall(tmp)
            licence = wheel.read("musicnn-0.1.0.dist-info/LICENSE.md").decode()
        variables = read_checkpoint(os.path.join(tmp, "musicnn", args.variant) + "/")
    arrays = convert(variables, len(tags))
    n_params = sum(a.size for a in arrays.values())
    with open(args.wheel, "rb") as f:
        wheel_sha = hashlib.sha256(f.read()).hexdigest()
    arrays["meta/source"] = np.array(f"musicnn 0.1.0 wheel sha256 {wheel_sha}, checkpoint {args.variant}")

    os.makedirs(args.out_dir, exist_ok=True)
    target = os.path.join(args.out_dir, filename)
    with open(target + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(target + ".tmp", target)
    lic = os.path.join(args.out_dir, "LICENSE-musicnn")
    with open(lic + ".tmp", "w") as f:
        f.write(LICENSE_HEADER + licence.strip() + "\n")
    os.replace(lic + ".tmp", lic)
    print(f"{target}: {n_params} parameters, {os.path.getsize(target)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
