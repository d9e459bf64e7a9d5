"""``genrecls classify LIBRARY --model musicnn-tags``: the pretrained tagger, with no training at all.

For a library with no labels yet, the MSD musicnn network's own 50 tags (rock, jazz,
electronic, ambient, ...) are a classification already.  :func:`tagger_run` writes the
pretrained network as an ordinary run folder (``PREDICTIONS/tagger/``: SavedModel,
``model.keras``, ``run.json`` with the 50 tags as labels and the ``musicnn`` feature
preset), so classification runs unchanged on it: a track's tags are the mean over its
segments of the per-patch tag probabilities (musicnn's own track-level taggram); the
prediction row's ``genre`` is the top tag, ``confidence`` its probability, ``top_k`` the
``classify.top_k`` best tags and ``prob_<tag>`` every tag's probability.  Tag probabilities
are independent sigmoids: they do not sum to 1.

The run has a fixed model id (:data:`TAGGER_MODEL_ID`), so re-running adds only new tracks.
"""

from __future__ import annotations

from genrecls.core.config import feature_preset
from genrecls.storage.location import Location

__all__ = ["TAGGER_MODEL", "TAGGER_MODEL_ID", "tagger_run"]

#: the --model name that selects the pretrained tagger
TAGGER_MODEL = "musicnn-tags"
#: model id of the tagger run (stable: the shipped weights never change without a new id)
TAGGER_MODEL_ID = "musicnn-tags-msd-1"
_FOLDER = "tagger"


def tagger_run(predictions: Location | str) -> Location:
    """The tagger's run folder inside the predictions folder, written on first use."""
    out = predictions if isinstance(predictions, Location) else Location.parse(predictions)
    loc = out.child(_FOLDER)
    if loc.exists("run.json") and loc.read_json("run.json").get("model_id") == TAGGER_MODEL_ID and loc.exists("model.onnx"):
        return loc  # (a folder written before model.onnx existed is written again, under the same model id)
    from genrecls.models.inference import export_model
    from genrecls.models.musicnn import MSD_TAGS, MUSICNN_FEATURES, load_musicnn
    from genrecls.models.networks import keras
    from genrecls.models.transfer import MAX_BATCH

    k = keras()
    net = load_musicnn()
    inputs = k.Input(shape=(MUSICNN_FEATURES["n_mels"], MUSICNN_FEATURES["patch_frames"]), name="mel")
    tags = net(k.layers.Permute((2, 1), name="time_first")(inputs), training=False)["taggram"]
    model = k.Model(inputs, k.layers.Identity(name="probabilities")(tags), name="musicnn_tags")
    export_model(model, loc, labels=list(MSD_TAGS), features=feature_preset("musicnn"), model_name=TAGGER_MODEL,
                 extra={"model_id": TAGGER_MODEL_ID, "max_batch": MAX_BATCH, "output": {
                     "name": "probabilities", "kind": "independent tag probabilities (sigmoid), not a softmax",
                     "aggregation": "mean of segment probabilities per track"},
                     "source": "MSD_musicnn (Pons and Serra 2019, ISC licence), genrecls/weights"})
    return loc
