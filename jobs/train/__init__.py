"""The training stage: Ray Train workers running DeepSpeed ZeRO over the data stage's shards.

    run        the run on the driver: training stream, TorchTrainer, export of the best checkpoint
    worker     what each Ray Train worker runs: engine, loop, validation, checkpoints
    engine     precision, the DeepSpeed config, which weights train
    batches    padded or packed micro-batches
    losses     the answer-token loss and the label-word loss
    flops      FLOPs per token, peak FLOP/s and memory (MFU)
    export     the Hugging Face export and its probe check
    tracking   MLflow runs and metrics

Imports the data stage's readers, jobs.config and cluster; never evaluation."""
