"""The data stage: from named sources to tokenized Parquet shards, a quarantine and a quality report.

    sources      read files and tables, counting physical records     -> staged rows
    cleaning     validate, repair text, redact PII, filter language
    templating   chat template (or compact), tokenize, mask the loss to the answer, length filters
    dedup        exact and near duplicates
    split        the split by row key; readers of the written splits (decrypting) and the pinned test rows
    shard_encryption  Parquet modular encryption of the shards under the run's data key, no key in Ray tasks
    balance      class rebalancing of the train split; the class-balanced training stream
    mixtures     multi-task training streams
    prepare      the data job, one step per function above, and the accounting
    quality_report  the HTML report of a prepare run

Imports only jobs.config, jobs.base_models, jobs.html and cluster (never training or evaluation)."""
