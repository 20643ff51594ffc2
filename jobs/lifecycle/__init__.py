"""What happens to a model version after its run: registration, retraining, and when to retrain.

    register   a run's model registered as a version with its lineage and report (the pipeline's, retraining's)
    rows       labelled rows from production: the feedback joined with the prediction log
    retrain    batch retraining: new rows plus a replayed sample, trained from the current version,
               evaluated and gated against it, registered
    trigger    the decision to retrain (drift, an online macro-F1 drop, new labelled rows), its audit
               record and the Ray job submission

Sits over the training, evaluation, monitoring and data stages, under the entry jobs."""
