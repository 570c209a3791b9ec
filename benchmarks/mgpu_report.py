"""summary.md: the multi-GPU table of results.json, short, for a person (results.json keeps every fact)."""

from __future__ import annotations


def _scaling(arch: str, part: dict) -> list[str]:
    lines = [f"### {arch}: scaling", "", "| N | variant | sigma | ms/step | images/s | CUDA graph | Flat-LoRA path | "
             "written once |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in part["rows"]:
        if "error" in r:
            lines.append(f"| {r['processes']} | {r['variant']} | {r['sigma']} | failed | | | | |")
            continue
        lines.append(f"| {r['processes']} | {r['variant']} | {r['sigma']} | {r['ms_per_step']} | "
                     f"{r['images_per_s']} | {r['cuda_graph_log'] or '-'} | {r['flat_path_log'] or '-'} | "
                     f"{r['written_once']} |")
    lines += ["", "| N | sigma | against 1 GPU | efficiency | >= 0.9 |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {e['processes']} | {e['sigma']} | {e['against_1_gpu']} | {e['efficiency']} | {e['meets_0.9']} |"
              for e in part.get("efficiency", [])]
    return lines + [""]


def _correctness(arch: str, part: dict) -> list[str]:
    lines = [f"### {arch}: correctness (N = {part['processes']}, batch {part['batch_per_process']} per process, "
             f"{part['steps']} steps, sigma {part['sigma']})", ""]
    errors = [name for name, r in part["runs"].items() if "error" in r]
    if errors:
        return lines + [f"runs failed: {', '.join(errors)} (results.json has their logs' tails)", ""]
    ab, ac = part["A_vs_B"], part["A_vs_C"]
    lines += [f"- A (1 process, accumulation {part['processes']}) vs B (shared noise): max abs {ab['max_abs']:.3g}, "
              f"max rel {ab['max_rel']:.3g}, rel Frobenius {ab['rel_fro']:.3g} "
              f"(tolerance {part['tolerance_rel_fro']}): equal = {part['A_equals_B']}",
              f"- A vs C (each process its own noise): rel Frobenius {ac['rel_fro']:.3g}; B much closer than C: "
              f"{part['B_much_closer_than_C']}",
              f"- noise fingerprints: B {part['runs']['B']['noise_fingerprints']} (all equal: "
              f"{part['shared_noise_equal_on_all_processes']}), C {part['runs']['C']['noise_fingerprints']} "
              f"(all differ: {part['own_noise_differs_on_every_process']})",
              "- written once: " + ", ".join(f"{k} {r['written_once']}" for k, r in part["runs"].items()), ""]
    return lines


def _resume(arch: str, part: dict) -> list[str]:
    lines = [f"### {arch}: resume of {part['from']} ({part['saved_by_processes']} processes) from "
             f"checkpoint-{part['checkpoint']}", ""]
    for r in part["runs"]:
        if "error" in r:
            lines.append(f"- on {r['processes']} processes: failed")
            continue
        same = r.get("vs_uninterrupted")
        lines.append(f"- on {r['processes']} processes: resumed {r['resumed_at_checkpoint']}, final step "
                     f"{r['reached_final_step']}, written once {r['written_once']}"
                     + (f", vs uninterrupted rel Frobenius {same['rel_fro']:.3g}"
                        if same and "rel_fro" in same else ""))
    return lines + [""]


def summary(results: dict) -> str:
    lines = ["# Multi-GPU training: benchmarks/multi_gpu.py", "",
             f"device: {results['device']} x {results['gpus_available']}; precision {results['precision']}; "
             f"tiny models: {results['tiny']}", ""]
    for arch, parts in results["archs"].items():
        if "scaling" in parts:
            lines += _scaling(arch, parts["scaling"])
        if "correctness" in parts:
            lines += _correctness(arch, parts["correctness"])
        if "resume" in parts:
            lines += _resume(arch, parts["resume"])
    return "\n".join(lines) + "\n"
