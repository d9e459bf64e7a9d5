"""genrecls: turn large music collections into a genre classifier, and classify whole libraries with it.

The data flow, one module per step::

    discovery -> audio (decode) -> segments -> features -> dataset (Parquet shards)   [ingest]
    dataset -> split -> models -> training (Ray Train) -> run folder                 [train]
    run folder + library -> classify (Ray Data) -> predictions                        [classify]
    registry + retrain: incremental ingest, challenger vs champion, promotion         [retrain]
"""

__version__ = "0.1.0"
