"""The main job: data -> DeepSpeed fine-tuning -> held-out evaluation and promotion gate ->
explanations -> a registered model version with its report -> Serve + vLLM endpoint.

    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/airline_sentiment.yaml

Writes <storage_root>/<name>/summary.json with the headline figures of every stage.
"""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import requests

from cluster.config import load_config_or_exit
from cluster.contracts import EndpointSettings
from cluster.endpoints import deploy, with_local_key
from cluster.prompting import chat_messages
from cluster.ray_cluster import connect
from cluster.registry import ModelFilesChanged, ModelRegistry
from jobs.config import RunConfig
from jobs.data.prepare import MANIFEST, prepare_run_inputs
from jobs.evaluation.explanations import explain
from jobs.evaluation.report import SYSTEMS, task_reports
from jobs.evaluation.run import headline_metrics, run_evaluation
from jobs.lifecycle.register import register_run
from jobs.train.run import run_finetune


def check_endpoint(cfg: RunConfig, endpoint: EndpointSettings, base_url: str, api_key: str, predictions) -> dict:
    """Send test rows through the endpoint with the official openai client (and, for classification,
    `/v1/classify`), and probe bad requests.

    Both are compared with the served model's offline (label-likelihood) predictions. `/v1/classify`
    scores the labels exactly as the evaluation does, so it must agree on every row: a served model
    that silently differs from the evaluated one shows up there. A chat answer is free greedy text,
    which agrees once the model answers with a label word (the demo's model does; a barely trained
    one may not), so its agreement is reported, not required.

    A generative run's served answer is compared with the offline greedy answer (vLLM both), and
    their agreement reported: the endpoint is sent the last user turn alone, which for a chat row
    with earlier turns is a different prompt.
    """
    import openai

    verify = endpoint.ca_bundle()
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, http_client=openai.DefaultHttpxClient(
        verify=ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify))
    # `verify` on every call: a session's own `verify` loses to $REQUESTS_CA_BUNDLE (requests merges the environment over it).
    served_ids = [model.id for model in client.models.list().data]
    generative = cfg.data.task != "classification"
    answers = []
    for row in predictions.head(cfg.serve.check_examples).itertuples():
        reply = client.chat.completions.create(
            model=endpoint.model_id, messages=chat_messages(cfg.data.system_prompt, row.text),
            max_tokens=cfg.eval.max_new_tokens if generative else 4, temperature=0,
        )
        if generative:
            answers.append({"text": row.text, "reference": row.label,
                            "served_answer": (reply.choices[0].message.content or "").strip(),
                            "offline_answer": row.generated})
            continue
        answer = (reply.choices[0].message.content or "").strip().split()
        answer = answer[0].strip(".,!").lower() if answer else ""
        answers.append({
            "text": row.text, "label": row.label, "served_answer": answer,
            "offline_prediction": cfg.data.labels[row.pred_id],
        })
    chat_url, auth = f"{base_url}/v1/chat/completions", {"authorization": f"Bearer {api_key}"}
    if answers and not generative:
        classified = requests.post(f"{base_url}/v1/classify", headers=auth, timeout=300, verify=verify, json={
            "model": endpoint.model_id, "texts": [answer["text"] for answer in answers]})
        classified.raise_for_status()
        for answer, result in zip(answers, classified.json()["results"]):
            answer["classify_label"] = result["label"]
            answer["classify_probabilities"] = result["probabilities"]
    rejects = {
        "no_credentials": requests.post(chat_url, json={"model": endpoint.model_id, "messages": [{"role": "user", "content": "hi"}]}, timeout=60, verify=verify).status_code,
        "unknown_model": requests.post(chat_url, json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, headers=auth, timeout=60, verify=verify).status_code,
        "over_long_prompt": requests.post(chat_url, json={"model": endpoint.model_id, "messages": [{"role": "user", "content": "word " * endpoint.max_model_len}]}, headers=auth, timeout=60, verify=verify).status_code,
        "malformed_body": requests.post(chat_url, data="{not json", headers={"content-type": "application/json", **auth}, timeout=60, verify=verify).status_code,
    }
    checked = {"url": base_url, "model_id": endpoint.model_id, "models_listed": served_ids, "answers": answers,
               "bad_request_status": rejects}
    if generative:
        agree = sum(a["served_answer"] == a["offline_answer"] for a in answers)
        return {**checked, "served_matches_offline": f"{agree}/{len(answers)}"}
    agree = sum(a["served_answer"] == a["offline_prediction"] for a in answers)
    classify_agree = sum(a["classify_label"] == a["offline_prediction"] for a in answers)
    correct = sum(a["served_answer"] == a["label"] for a in answers)
    return {**checked, "served_matches_offline": f"{agree}/{len(answers)}",
            "classify_matches_offline": f"{classify_agree}/{len(answers)}", "served_correct": f"{correct}/{len(answers)}"}


def run_pipeline(cfg: RunConfig) -> dict:
    """Data, training, evaluation, explanations, registration, then the endpoint if the gate allows;
    writes `<run>/summary.json` with every stage's figures and time."""
    started = time.perf_counter()
    stage_seconds = {}

    def stage_done(name: str, since: float) -> float:
        stage_seconds[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    mark = time.perf_counter()
    base_dir, data_dir, manifest = prepare_run_inputs(cfg)
    print(f"[pipeline] data quality report: {manifest['quality_report']['html']}")
    mark = stage_done("model_and_data", mark)
    training = run_finetune(cfg, base_dir, data_dir)
    mark = stage_done("training", mark)
    registry = ModelRegistry(cfg.storage_root, cfg.name)
    current = registry.current()
    report, predictions = run_evaluation(
        cfg, base_dir, data_dir, finetuned_dir=Path(training["model_dir"]),
        previous_dir=Path(current["path"]) if current else None)
    mark = stage_done("evaluation", mark)
    explanations = None
    if cfg.explain.enabled and cfg.data.task != "classification":
        print(f"[pipeline] explanations skipped: they attribute label probabilities, and this is a {cfg.data.task} run")
    elif cfg.explain.enabled:
        explanations = explain(cfg)
    mark = stage_done("explanation", mark)
    version, report_path = register_run(cfg, registry, training, report, explanations,
                                        sources=manifest["identity"]["sources"], manifest_path=data_dir / MANIFEST,
                                        counts=manifest["counts"], parent=current)
    mark = stage_done("report", mark)
    summary = summarize(cfg.name, manifest, training, report, explanations, version, report_path)
    if cfg.serve.enabled:
        summary["serving"] = serve_current(cfg, registry, version, report, predictions, stage_seconds)
    summary["stage_seconds"] = stage_seconds
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["config"] = cfg.model_dump()
    path = cfg.run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"[pipeline] summary written to {path}")
    print(json.dumps(summary["test_split"], indent=2))
    return summary


def summarize(run: str, manifest: dict, training: dict, report: dict, explanations: dict | None, version: dict, report_path: Path) -> dict:
    """The run's figures in one place: data counts, training, every system's held-out scores."""
    summary = {
        "run": run,
        "model_dir": training["model_dir"],
        "version": {key: version[key] for key in ("version", "path", "deployable", "gate")},
        "report": str(report_path),
        "data": {"counts": manifest["counts"], "splits": manifest["splits"], "quality_report": manifest["quality_report"]["html"]},
        "training": {key: training[key] for key in (
            "best_step", "best_val_loss", "wall_seconds", "tokens_per_s", "time_shares", "train_tokens", "examples_seen", "learning_curve",
            "export_max_abs_logit_diff", "mfu", "peak_memory_gib_max_worker", "tracking", "settings")},
        **evaluation_summary(report),
    }
    if explanations is not None:
        summary["explanations"] = {
            "faithfulness": {key: value for key, value in explanations["faithfulness"].items() if key != "per_example"},
            "completeness": explanations["completeness"]}
    return summary


def evaluation_summary(report: dict) -> dict:
    """`test_split`: every system's held-out figures (with intervals) and the paired differences, of the
    primary task; a multi-task run adds `tasks`: the same figures of every task under its name."""

    def figures(task: dict) -> dict:
        return {
            "examples": task["test_examples"],
            **{system: {**headline_metrics(task, system), "interval_95": task["bootstrap"]["systems"][system],
                        **({"expected_calibration_error": task[system]["calibration"]["ece"]}
                           if "calibration" in task[system] else {}),
                        **({"answer_perplexity": task[system]["answer_perplexity"]}
                           if "answer_perplexity" in task[system] else {})}
               for system in SYSTEMS if system in task},
            "paired_differences_95": task["bootstrap"]["differences"],
        }

    summary = {"test_split": figures(report)}
    if "further_tasks" in report:
        summary["tasks"] = {task["task_name"]: {"task": task["task"], "gated": task is report, **figures(task)}
                            for task in task_reports(report)}
    return summary


def serve_current(cfg: RunConfig, registry: ModelRegistry, version: dict, report: dict, predictions: dict,
                  stage_seconds: dict) -> dict:
    """Deploy what the gate allows (the current version: this one if it was promoted) and check it
    through the endpoint; or say why nothing is served."""
    serving = registry.current()
    if serving is None and cfg.serve.deploy_unpromoted:
        serving = version
    if serving is None:
        skipped = "no deployable version: " + report["gate"]["reason"]
        print(f"[pipeline] not serving: {skipped}")
        return {"skipped": skipped}
    try:  # as jobs.deploy does: only files the gate judged are served
        registry.check_files(serving["version"])
    except ModelFilesChanged as error:
        print(f"[pipeline] not serving: {error}")
        return {"skipped": str(error)}
    mark = time.perf_counter()
    # The job's own admin key for its check (fresh, kept in this process); a submitter's key only as
    # its digest record ($LAKEFORGE_API_KEY_RECORD), for calls after the job.
    api_key, endpoint = with_local_key(cfg.serve.endpoint.model_copy(update={"model_dir": serving["path"]}))
    base_url = deploy(cfg.serve.import_path, endpoint)
    registry.record_deployment(serving["version"], url=f"{base_url}/v1", model_id=endpoint.model_id,
                               app_name=endpoint.app_name, forced=not serving["deployable"], by="jobs.pipeline")
    stage_seconds["serving_deploy"] = round(time.perf_counter() - mark, 1)
    mark = time.perf_counter()
    served_is_new = serving["version"] == version["version"]
    served_predictions = predictions["fine_tuned" if served_is_new else "previous_version"]
    checked = {"version": serving["version"], **check_endpoint(cfg, endpoint, base_url, api_key, served_predictions)}
    stage_seconds["serving_check"] = round(time.perf_counter() - mark, 1)
    return checked


def main(argv: list[str] | None = None) -> None:
    cfg = load_config_or_exit(RunConfig, argv)
    connect()
    run_pipeline(cfg)


if __name__ == "__main__":
    main()
