"""Training: a data-parallel genre classifier with Ray Train (V2) on the dataset's Parquet shards.

One module per place the code runs:

* :mod:`~genrecls.jobs.training.plan`: driver-side checks and planning, no Ray, no TensorFlow
  (:func:`check_dataset`, :class:`TrainPlan`, :func:`plan_training`, loss weights);
* :mod:`~genrecls.jobs.training.data`: the input as Ray Datasets, built on the driver;
* :mod:`~genrecls.jobs.training.worker`: what each Ray Train worker runs (:func:`train_func`,
  its input pipeline, the model built from the plan);
* :mod:`~genrecls.jobs.training.checkpoints`: the run's checkpoint folders;
* :mod:`~genrecls.jobs.training.driver`: :func:`train` (the trainer, export, evaluation) and
  :mod:`~genrecls.jobs.training.report` (``report.md``).
"""

from .checkpoints import find_checkpoints
from .data import make_ray_dataset, normalisation_stats, prepare_datasets
from .driver import resume_inputs, train
from .plan import (
                   FOLDER_GROUP,
                   REQUIRED_COLUMNS,
                   DatasetCheck,
                   TrainingError,
                   TrainPlan,
                   WorkerPlan,
                   check_dataset,
                   learning_rate_at,
                   plan_training,
                   segment_weights,
)
from .worker import build_model_for, train_func

__all__ = ["TrainingError", "REQUIRED_COLUMNS", "FOLDER_GROUP", "DatasetCheck", "check_dataset", "TrainPlan",
           "WorkerPlan", "plan_training", "segment_weights", "learning_rate_at", "make_ray_dataset",
           "prepare_datasets", "normalisation_stats", "train_func", "build_model_for", "train", "resume_inputs",
           "find_checkpoints"]
