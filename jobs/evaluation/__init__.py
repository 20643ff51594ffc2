"""The evaluation stage: proof that the fine-tuned model is better, and why it answers as it does.

    run            every system on the same held-out rows, each task of a multi-task run on its
                   own; writes evaluation.json
    scoring        LLM label likelihoods (and a sample of free answers)
    generation     generative runs: LLM answers and reference likelihoods through vLLM
    baseline       TF-IDF + logistic regression; TF-IDF retrieval for generative runs
    metrics        accuracy/precision/recall/F1, calibration, ROUGE-L/chrF/exact match, format
                   checks, perplexity, paired bootstrap
    analysis       worst errors and slices; best and worst answers
    gate           the promotion decision
    explanations   integrated gradients, SHAP, dependence, faithfulness
    report         the HTML report page

Imports the data stage's readers, jobs.config, jobs.html and cluster; never training."""
