"""Ray Train's TensorFlow set-up (``TF_CONFIG`` on every worker) without TensorFlow in the controller.

Ray's own ``TensorflowConfig`` lives in ``ray.train.tensorflow``, a package whose ``__init__``
imports TensorFlow; the run's controller actor unpickles the backend config, so with Ray's class
every training run paid a TensorFlow import (about 5 s on 2 cores) in a process that never touches
a tensor.  This class does what ``ray.train.tensorflow.config._TensorflowBackend`` does (Ray 2.60):
each worker gets ``TF_CONFIG`` naming every worker's address and its own index, and
``TF_USE_LEGACY_KERAS=1``; it imports nothing but Ray's backend interfaces.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig


def _address() -> str:
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


def _set_tf_config(addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


class _Backend(Backend):
    def on_start(self, worker_group, backend_config) -> None:  # noqa: ANN001 (Ray's interface)
        addresses = worker_group.execute(_address)
        ray.get([worker_group.execute_single_async(i, _set_tf_config, addresses=addresses, index=i)
                 for i in range(len(worker_group))])


@dataclass
class TensorflowWorkers(BackendConfig):
    """The backend config handed to ``TensorflowTrainer(tensorflow_config=...)``."""

    @property
    def backend_cls(self):  # noqa: ANN201 (Ray's interface)
        return _Backend

    @property
    def framework(self):  # noqa: ANN201 (Ray's interface)
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TENSORFLOW

    def to_dict(self) -> dict:
        return {}
