"""RESULTS.md's performance sections, rendered from the benchmark JSONs under results/.

    .venv/bin/python benchmarks/speed_report.py      # rewrites the text between the markers below

Only the text between ``<!-- performance:start -->`` and ``<!-- performance:end -->`` is
replaced; the quality section (``mtpeft report``) and anything else stay as they are.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mtpeft.storage import atomic_write

ROOT = Path(__file__).resolve().parent.parent
FLAT_MIB = 16  # what the load test's second half may move and still count as flat
START, END = "<!-- performance:start -->", "<!-- performance:end -->"


def _load(name: str) -> dict | None:
    path = ROOT / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _provenance(record: dict) -> str:
    machine = record.get("machine", {})
    cpu = machine.get("cpu") or machine.get("processor") or machine.get("platform", "?")
    return (f"`{record['command']}` → `results/{record['benchmark']}.json`; {record['date']}; "
            f"{machine.get('cores', machine.get('cpus', '?'))} cores of {cpu}.")


def _met(value: float, target: float, higher: bool = True) -> str:
    return "met" if (value >= target if higher else value <= target) else "**missed**"


def training(record: dict) -> list[str]:
    a = record["fixed_shape"]
    peak = record["bf16_matmul_peak"]["tflops"]
    lines = ["### Training speed", "", _provenance(record), "",
             f"Fixed shape: batch {a['batch']} x {a['tokens']} real tokens (IMDb reviews cut at {a['tokens']}), LoRA r=8 "
             f"query/value, MiniLM. Measured bf16 matmul peak in the same run: {peak} TFLOP/s, so the limit is "
             f"{a['limit_examples_per_s']} training examples/s ({a['training_flops_per_example'] / 1e9:.2f} GFLOP each: "
             "forward + activations' gradients). Median of the repeats, round robin.", "",
             "| configuration | examples/s | tokens/s | fraction of bf16 limit | peak RSS (process) |",
             "|---|---:|---:|---:|---:|"]
    names = {"common_recipe": "common recipe (peft + Trainer, fp32, pad to 128)",
             "peft_hand_tuned": "peft hand-tuned (bf16 autocast, dynamic padding, no dropout, fused AdamW)",
             "mtpeft_defaults": "mtpeft defaults", "mtpeft_compiled": "mtpeft compiled (`--compile`)"}
    for key, label in names.items():
        row = a["results"].get(key)
        if row is None:  # a record from before the row existed
            continue
        lines.append(f"| {label} | {row['examples_per_s']} | {row['tokens_per_s']:,.0f} | {row['fraction_of_bf16_limit']:.1%} "
                     f"| {row['peak_rss_mib_process']:,.0f} MiB |")
    ratio = a["ratios"]["mtpeft / peft_hand_tuned"]
    fraction = a["results"]["mtpeft_defaults"]["fraction_of_bf16_limit"]
    lines += ["", f"- mtpeft / peft hand-tuned: **{ratio}x** (target 2x: {_met(ratio, 2.0)}); "
              f"mtpeft / common recipe: {a['ratios']['mtpeft / common_recipe']}x.",
              f"- mtpeft at {fraction:.1%} of the bf16 limit (target 50 %: {_met(fraction, 0.5)})."]
    compiled = a["results"].get("mtpeft_compiled")
    if compiled:
        lines.append(f"- Compiled: {a['ratios']['compiled / mtpeft defaults']}x the defaults' steps, at "
                     f"{compiled['fraction_of_bf16_limit']:.1%} of the limit; its first pass ({a['rows']} rows) took "
                     f"{compiled['first_pass_seconds']} s with the compilation, the defaults' "
                     f"{a['results']['mtpeft_defaults']['first_pass_seconds']} s.")
    epoch = record.get("sst2_epoch")
    if epoch:
        ours, common = epoch["mtpeft_defaults"], epoch["common_recipe"]
        lines += [f"- One epoch of SST-2 ({ours['examples']:,} sentences), mtpeft defaults: **{ours['train_seconds']:.0f} s** "
                  f"({ours['examples_per_s']:.0f} examples/s; target 60 s: {_met(ours['train_seconds'], 60, higher=False)}), "
                  f"dev accuracy {ours['dev_accuracy']:.2f}. The common recipe, {common['note']}: "
                  f"{common['seconds_scaled_to_epoch']:,.0f} s, so mtpeft is **{epoch['speedup_vs_common_recipe']}x** faster "
                  f"(target 10x: {_met(epoch['speedup_vs_common_recipe'], 10)})."]
        if "mtpeft_compiled" in epoch:
            c = epoch["mtpeft_compiled"]
            lines.append(f"- The same epoch compiled: **{c['train_seconds']:.0f} s**, compilation included "
                         f"({c['examples_per_s']:.0f} examples/s; target 60 s: {_met(c['train_seconds'], 60, higher=False)}; "
                         f"{epoch['compiled_speedup_vs_common_recipe']}x the common recipe), dev accuracy {c['dev_accuracy']:.2f}.")
    floor, source = (epoch or {}).get("floor"), ""
    floor_record = _load("train_speed_floor")
    if floor is None and floor_record is not None:  # computed apart, by --floor-only
        floor, source = floor_record["sst2_epoch_floor"], f" ({_provenance(floor_record).rstrip('.')})"
    if floor:
        verdict = ("so no implementation can train the epoch in 60 s on this machine" if floor["seconds_at_peak"] > 60
                   else "so 60 s is within this machine's reach")
        lines.append(f"- The epoch's floor{source}: its {floor['examples']:,} sentences are {floor['real_tokens']:,} "
                     f"tokens, {floor['padded_tokens']:,} in their padded batches; their {floor['training_tflop']} TFLOP "
                     f"of matmuls take **{floor['seconds_at_peak']} s** at the measured peak of {floor['peak_tflops']} "
                     f"TFLOP/s with nothing else costing time, {verdict}.")
    return lines


def precision(record: dict) -> list[str]:
    lines = ["### bf16 against fp32: dev quality", "", _provenance(record), "",
             "Each task's built-in adapter recipe trained twice per seed, in bf16 (mtpeft's default) and in fp32, same "
             "initialisation and batches; the difference is taken per seed (bf16 - fp32). "
             f"SST-2 trains on its first {record['settings']['sst2_subset']:,} sentences, STS-B on all of its training set.", "",
             "| task | train examples | metric | seeds | bf16 mean | fp32 mean | paired differences | mean difference "
             "| bf16 seed-to-seed std | bf16 time | fp32 time |", "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    summary = record["summary"]
    for task, q in summary.items():
        spread = f" ± {q['std_difference']:.2f}" if q["std_difference"] is not None else ""
        bf16 = [record["runs"][task][str(seed)]["bf16"]["metric"] for seed in q["seeds"]]
        seed_std = f"{statistics.stdev(bf16):.2f}" if len(bf16) > 1 else "–"
        lines.append(f"| {task} | {q['train_examples']:,} | {q['metric']} | {len(q['seeds'])} | {q['bf16_mean']:.2f} "
                     f"| {q['fp32_mean']:.2f} | {', '.join(f'{d:+.2f}' for d in q['paired_differences'])} "
                     f"| {q['mean_difference']:+.2f}{spread} | {seed_std} | {q['bf16_seconds_median']:.0f} s "
                     f"| {q['fp32_seconds_median']:.0f} s |")
    worst = max(abs(q["mean_difference"]) for q in summary.values())
    lines += ["", f"Largest mean difference {worst:.2f} points (target within {record['target_points']}: "
              f"{_met(worst, record['target_points'], higher=False)})."]
    return lines


def inference(record: dict) -> list[str]:
    lines = ["### Inference speed", "", _provenance(record), "",
             f"One task, batch {record['setup']['batch']}, {record['setup']['tokens']} tokens per text, tokenisation "
             f"included; adapter: {record['setup']['adapter']}. Measured bf16 matmul peak "
             f"{record['bf16_matmul_peak']['tflops']} TFLOP/s → limit {record['limit_examples_per_s']} examples/s.", "",
             "| configuration | examples/s | fraction of bf16 limit | peak RSS (process) | quality |", "|---|---:|---:|---:|---|"]
    names = {"common_recipe": "common recipe (peft, fp32, pad to 128)",
             "peft_hand_tuned": "peft hand-tuned (merged, bf16 autocast, dynamic padding)", "mtpeft_defaults": "mtpeft defaults"}
    for key, label in names.items():
        row = record["results"][key]
        quality = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in record["quality"].get(key, {}).items())
        lines.append(f"| {label} | {row['examples_per_s']} | {row['fraction_of_bf16_limit']:.1%} | "
                     f"{row['peak_rss_mib_process']:,.0f} MiB | {quality} |")
    fraction = record["results"]["mtpeft_defaults"]["fraction_of_bf16_limit"]
    lines += ["", f"mtpeft / peft hand-tuned {record['ratios']['mtpeft / peft_hand_tuned']}x, / common recipe "
              f"{record['ratios']['mtpeft / common_recipe']}x; mtpeft at {fraction:.1%} of the bf16 limit "
              f"(target 50 %: {_met(fraction, 0.5)})."]
    return lines


def mixed(record: dict) -> list[str]:
    s = record["setup"]
    lines = ["### Mixed-task batches", "", _provenance(record), "",
             f"{len(s['tasks'])} tasks with different heads, LoRA r={s['rank']} on query/value, batch {s['batch']} x "
             f"{s['tokens']} tokens ({s['rows_per_task']} rows per task, shuffled), backbone forward pass (mtpeft also with "
             f"its heads). Before timing, mtpeft's and peft's mixed rows agree to {s['check_fp32_max_abs_difference_vs_peft']:.1e} "
             "(fp32).", "", "| precision | configuration | examples/s |", "|---|---|---:|"]
    for precision, rows in record["results"].items():
        for name, row in rows.items():
            lines.append(f"| {precision} | {name.replace('_', ' ')} | {row['examples_per_s']} |")
    lines += ["", "| ratio | value | target |", "|---|---:|---|"]
    for name, value in record["ratios"].items():
        target = 2.0 if "/ peft_mixed" in name else 1.3 if "/ peft_merged_single" in name else None
        verdict = f"{target}x: {_met(value, target)}" if target else "none (context)"
        lines.append(f"| {name.replace('_', ' ')} | {value}x | {verdict} |")
    return lines


def serving(record: dict) -> list[str]:
    o = record["offline"]
    lines = ["### Serving latency", "", _provenance(record), "",
             f"Task `{record['setup']['task']}`, {record['setup']['texts']}; offline `MultiTaskModel.run` in batches of 64: "
             f"{o['examples_per_s']} texts/s; one text alone in-process: {o['single_text_ms_p50']} ms (p50). Load from "
             f"{record['setup'].get('load_generator', 'httpx')}, {record['setup'].get('per_level', '')} per level.", "",
             "| concurrent clients | p50 | p99 | requests/s | fraction of offline | errors |", "|---:|---:|---:|---:|---:|---:|"]
    for level in record["server"]:
        lines.append(f"| {level['concurrency']} | {level['p50_ms']} ms | {level['p99_ms']} ms | {level['requests_per_s']} | "
                     f"{level['fraction_of_offline_throughput']:.0%} | {level['errors']} |")
    single = record["server"][0]["p50_ms"]
    best = max(level["fraction_of_offline_throughput"] for level in record["server"])
    lines += ["", f"Single-request p50 {single} ms (target 10 ms: {_met(single, 10, higher=False)}); best throughput under load "
              f"{best:.0%} of offline (target 80 %: {_met(best, 0.8)})."]
    return lines


def load_test(record: dict) -> list[str]:
    curve = record["memory_rss_mib"]
    points = ", ".join(f"{c['requests']:,}: {c['rss_mib']:,.0f}" for c in curve[:: max(1, len(curve) // 8)])
    latency = record["latency_ms"]
    return ["### Load test", "", _provenance(record), "",
            f"{record['requests']:,} mixed requests (every task, some routed, ~5 % `/v1/support`) from "
            f"{record['concurrency']} concurrent clients on loopback, a task reloaded every {record['reload_every']:,} "
            f"requests ({record['reloads']['done']} reloads, {record['reloads']['failed']} failed): **{record['errors']} errors**, {record['throughput_rps']} requests/s, "
            f"latency p50 {latency['p50']:.0f} ms, p99 {latency['p99']:.0f} ms; graceful shutdown: "
            f"{record['server']['graceful_shutdown']}.", "",
            f"Server resident memory (MiB) by requests served: {points}. Growth after the first sample: "
            f"{record['rss_growth_mib_after_warmup']:,.0f} MiB; range over the second half of the run: "
            f"**{record['rss_range_mib_second_half']:,.1f} MiB** "
            f"({'flat' if record['rss_range_mib_second_half'] <= FLAT_MIB else 'not flat'}: "
            f"target ≤ {FLAT_MIB} MiB)."]


def fuzz(record: dict) -> list[str]:
    return ["### API fuzzing", "", _provenance(record), "",
            f"schemathesis {record['versions']['schemathesis']} from the OpenAPI schema, {record['examples_per_operation_and_mode']} "
            f"examples per operation and mode (valid and invalid requests): **{record['cases']:,} cases, "
            f"{record['server_errors']} server errors (5xx)**, {record['failures']} other check failures"
            + (" (all `/v1/support` accepting `top_k: true` as 1, since fixed: `top_k` is strict, "
               "`tests/test_serve.py::test_support_top_k_must_be_a_real_count`)." if record["failures"] else ".")]


def adapter_cache(record: dict) -> list[str]:
    m, c, t = record["memory"], record["cold_load"], record["throughput"]
    checks = record["checks"]
    lines = ["### Many adapters", "", _provenance(record), "",
             f"{m['tasks']:,} registered LoRA r=8 tasks (classification heads), at most {m['capacity']} active, packaged MiniLM.", "",
             "| measure | value | target |", "|---|---:|---|",
             f"| memory per registered task (weights in CPU memory) | {m['rss_mb_per_task_in_cpu_memory']:.2f} MB | ≤ 1 MB: "
             f"{'met' if checks['mb_per_registered_task_in_cpu_memory']['met'] else '**missed**'} |",
             f"| memory per active task | {m['rss_mb_per_active_task']:.2f} MB | |",
             f"| all tasks over the backbone | {m['rss_gb_over_backbone_all_tasks_in_memory_and_capacity_active']:.2f} GB | ≤ 1 GB: "
             f"{'met' if checks['gb_over_backbone_all_tasks']['met'] else '**missed**'} |",
             f"| cold load from disk, p50 / p95 | {c['from_disk_ms']['p50']} / {c['from_disk_ms']['p95']} ms | ≤ 50 ms: "
             f"{'met' if checks['cold_load_p95_ms']['met'] else '**missed**'} |"]
    for n, row in t.items():
        repeats = f", median of {len(row['repeats_rows_per_second'])}" if "repeats_rows_per_second" in row else ""
        lines.append(f"| Zipf stream over {int(n):,} tasks | {row['rows_per_second']} rows/s{repeats} (hit rate {row['hit_rate']:.0%}, "
                     f"{row['distinct_tasks_per_batch_mean']} tasks per batch) | |")
    ratio = checks["throughput_ratio_1000_vs_10"]
    lines.append(f"| throughput at 1,000 / at 10 tasks | {ratio['value']:.2f} | ≥ 0.70: {'met' if ratio['met'] else '**missed**'} |")
    ten = t["10"]["rows_per_second"]
    for key, rows in record.items():
        if key.startswith("throughput_") and key.endswith("_by_capacity"):
            for capacity, row in rows.items():
                lines.append(f"| same {row['tasks']:,}-task stream, at most {capacity} active | {row['rows_per_second']} rows/s "
                             f"(hit rate {row['hit_rate']:.0%}; {row['rows_per_second'] / ten:.2f} of 10 tasks) | |")
    return lines


def render() -> str:
    parts = [START, "## Performance", "",
             "Generated by `python benchmarks/speed_report.py` from the JSON files named in each part; every figure is "
             "a median of repeats measured side by side in one process on the machine named."]
    for name, fn in (("train_speed", training), ("precision_quality", precision), ("infer_speed", inference), ("mixed_batch", mixed),
                     ("serve_latency", serving), ("load_test", load_test), ("fuzz_api", fuzz),
                     ("adapter_cache", adapter_cache)):
        record = _load(name)
        if record is not None:
            parts += ["", *fn(record)]
    parts.append(END)
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "RESULTS.md"), help="the file whose section to rewrite "
                                                                        "(default: RESULTS.md)")
    out = Path(parser.parse_args().out)  # --help no longer rewrites RESULTS.md
    text = out.read_text() if out.exists() else "# Results\n"
    section = render()
    start, end = text.find(START), text.find(END)
    text = text[:start] + section + text[end + len(END):] if start != -1 and end > start else text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write(out, text.encode())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
