"""The batch inference stage: tables (input with row ids, output parts), prompts and the vLLM
engine, and the run. Imports jobs.config and cluster only."""
