"""The promotion gate: a new version is deployable only when the lower end of its paired bootstrap
interval against the current version clears the configured improvement."""

from __future__ import annotations

def promotion_gate(bootstrap: dict, metric: str, min_improvement: float) -> dict:
    """Deployable only if the fine-tuned model beats the current version (or, before the first
    version, the base model zero-shot) by more than `min_improvement` at the interval's lower end."""
    reference = "previous_version" if "previous_version" in bootstrap["systems"] else "base_zero_shot"
    low, high = bootstrap["differences"][f"fine_tuned - {reference}"][metric]
    deployable = low > min_improvement
    verdict = "beats" if deployable else "does not beat"
    return {
        "metric": metric, "reference": reference, "min_improvement": min_improvement,
        "difference_interval": [low, high], "level": bootstrap["level"], "deployable": deployable,
        "reason": f"fine_tuned {verdict} {reference} on {metric}: {bootstrap['level']:.0%} paired interval of the "
                  f"difference [{low:+.3f}, {high:+.3f}], lower end {'>' if deployable else '<='} {min_improvement:+.3f}",
    }
