"""Greedy continuations from vLLM's offline engine, for comparing exports with the trained model.

Run by tests/test_integration.py (the exports test) in a subprocess (vLLM spawns its engine process: the
`__main__` guard below is required, and its CPU settings are process-wide):

    python -m tests.vllm_outputs SPEC.json OUT.json

SPEC: {"prompts": [[token ids], ...], "max_tokens": N, "models": [{"name", "path", "lora"?}]}; a
model with "lora" serves that adapter folder on the base at "path" through a LoRARequest.
OUT: {name: [{"tokens": [...], "logprobs": [...]} per prompt]}, the logprob of each greedy token.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = json.loads(open(spec_path).read())
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    results = {}
    for model in spec["models"]:
        lora = model.get("lora")
        llm = LLM(model=model["path"], dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                  **({"enable_lora": True, "max_lora_rank": 16} if lora else {}))
        request = LoRARequest(model["name"], 1, lora) if lora else None
        outputs = llm.generate(prompts, params, lora_request=request)
        results[model["name"]] = [
            {"tokens": list(out.outputs[0].token_ids),
             "logprobs": [step[token].logprob for step, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]}
            for out in outputs]
        del llm
        gc.collect()
    open(out_path, "w").write(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
