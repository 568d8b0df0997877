"""A model card (README.md) for each saved task, readable by the Hugging Face tooling.

The YAML front matter carries the fields the Hub and ``huggingface_hub.ModelCard`` read
(library, base model, tags, metrics); the body says what the task is, how it was trained
and where it should not be used.
"""

from __future__ import annotations

import json


def _is_count(metric: str) -> bool:
    """Numbers in a task's metrics that count, not score: ``examples``, and no-answer QA's
    ``has_answer_examples`` / ``no_answer_examples``, which the card listed as metrics."""
    return metric == "examples" or metric.endswith("_examples")


def render_model_card(record: dict, base_model: str) -> str:
    spec = record["spec"]
    adapter = record.get("adapter")
    metrics = {k: v for k, v in record.get("metrics", {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    scores = [k for k in metrics if not _is_count(k)]
    front = [
        "---",
        "library_name: peft" if adapter else "library_name: mtpeft",
        f"base_model: {json.dumps(base_model)}",  # quoted: a local path may hold ": ", " #" or a leading "@"
        "tags:",
        "- mtpeft",
        f"- {spec['type']}",
        *(["- lora"] if adapter else []),
        *(["metrics:", *(f"- {json.dumps(k)}" for k in scores)] if scores else []),
        "---",
    ]
    lines = [f"# {spec['name']}", "", spec.get("description") or f"A {spec['type']} task trained with mtpeft.", ""]
    lines += ["## Task", "", f"- type: `{spec['type']}`"]
    if spec.get("labels"):
        lines.append(f"- labels: {', '.join(f'`{label}`' for label in spec['labels'])}")
    columns = [spec["text_column"], spec.get("text_pair_column"), spec["label_column"]]
    lines.append(f"- input columns: {', '.join(f'`{c}`' for c in columns if c)}")
    lines.append(f"- max length: {spec['max_length']} tokens; primary metric: `{spec['metric']}`")
    lines += ["", "## Parameters", ""]
    if adapter:
        lines.append(f"- LoRA r={adapter['r']}, alpha={adapter['alpha']}, targets {', '.join(adapter['target_modules'])}")
        if adapter.get("shared_with"):
            lines.append(f"- trained jointly: this adapter is shared by {', '.join(adapter['shared_with'])}, "
                         "each with its own head")
    else:
        lines.append("- no adapter: a head trained on the frozen backbone")
    if record.get("init_from"):
        lines.append(f"- warm-started: the adapter started from the one saved in `{record['init_from']}` "
                     "(`init_from`); its README says what it was trained on, and under which licence")
    lines.append(f"- trainable parameters: {record['trainable_parameters']:,} (backbone frozen, not included in this folder)")
    lines += ["", "## Evaluation", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("Not evaluated at training time.")
    lines += ["", "## Use", "", "```python", "from mtpeft import MultiTaskModel", "",
              "model = MultiTaskModel.load(\"path/to/this/folder\")",
              f"model.predict(..., task={json.dumps(spec['name'])})", "```", ""]
    if adapter:  # a head-only folder has no adapter_config.json for PEFT to read
        lines += ["The adapter also loads with `peft.PeftModel.from_pretrained(backbone, folder)` on the same backbone.",
                  ""]
    lines += ["## Limits", "",
              "Trained for the task and data above only; scores hold for data like the evaluation set. "
              f"Inputs longer than {spec['max_length']} tokens are truncated"
              + (" (QA contexts are windowed)" if spec["type"] == "extractive-qa" else "") + ". "
              "Check the predictions on your own data before relying on them.", ""]
    return "\n".join(front + [""] + lines)
