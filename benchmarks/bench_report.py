"""The markdown tables of bench.py's result (what each number means: README.md, "What each number is")."""

GIB = 2**30
REF_NAMES = ("diffusers eager", "diffusers compiled")
REF_LOADS = {"dedicated": "task pipeline, remove_unused_weights()", "dedicated_full": "task pipeline as loaded",
             "all_in_one": "VersatileDiffusionPipeline"}


def ratio(ours, ref) -> float | None:
    return ours / ref if isinstance(ours, (int, float)) and isinstance(ref, (int, float)) and ref else None


def fmt(x, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def scaled(x, scale: float, spec: str = ".3g") -> str:
    return fmt(None if x is None else x * scale, spec)


def header(result: dict) -> list[str]:
    s, env, v = result["settings"], result["env"], result["env"]["versions"]
    peak = f" (dense fp16 peak {env['peak_tflops']} TFLOP/s)" if env["peak_tflops"] else ""
    steps = f"{s['steps']} DDIM steps, " if result["tasks"] else ""
    end = env.get("load_average_at_end", env["load_average_at_start"])
    return [f"### {env['device']}{peak}: {s['dtype']}, {s['size']}x{s['size']}, {steps}CFG {s['guidance']}", "",
            f"{env['date']}; torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
            f"accelerate {v['accelerate']}; load average {env['load_average_at_start'][0]:.1f} at start, "
            f"{end[0]:.1f} at end."
            + (f" cuDNN autotuning tries {s['cudnn_benchmark_limit'] or 'all'} algorithms per convolution."
               if s.get("cudnn_benchmark_limit") is not None else ""), ""]


def impl_table(task: str, r: dict, s: dict) -> list[str]:
    lines = [f"#### {task}", "",
             f"Batch 1, in one process, interleaved, warm-up excluded; UNet step (CFG, batch 2): median of "
             f"{s['step_repeats']}; end to end (encode + {s['steps']} steps + decode): median of {s['e2e_repeats']}; "
             f"VAE decode of one image: median of {s['decode_repeats']}. First calls' extra = what the first two "
             "2-step calls took beyond two warm ones; setup = compile + CUDA-graph capture (NoisePredictor."
             "setup_seconds); held = device memory allocated / reserved after the first calls minus before "
             "(CUDA graphs' pools). Diffs against diffusers eager, in [0, 1].", "",
             "| implementation | UNet step (ms) | end to end (s) | VAE decode (ms) | first calls' extra (s) "
             "| setup (s) | held (GiB) | image diff max (mean) | decode diff max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["impls"].items():
        if "error" in x:
            lines.append(f"| {name} | error: {x['error'][:300]} |")
            continue
        held = (f"{x['held_allocated'] / GIB:.2f} / {x['held_reserved'] / GIB:.2f}"
                if "held_allocated" in x else "—")
        lines.append(f"| {name} | {scaled(x.get('step_s'), 1e3, '.2f')} | {fmt(x.get('e2e_s'))} "
                     f"| {scaled(x.get('decode_s'), 1e3, '.2f')} | {fmt(x.get('first_calls_extra_s'), '.2f')} "
                     f"| {fmt(x.get('setup_s'), '.2f')} | {held} | {fmt(x.get('max_abs_diff'), '.2g')} "
                     f"({fmt(x.get('mean_abs_diff'), '.2g')}) | {fmt(x.get('decode_max_abs_diff'), '.2g')} |")
    return lines + speedup_table(r["impls"]) + notes(r)


def speedup_table(impls: dict) -> list[str]:
    refs = [n for n in REF_NAMES if n in impls]
    ours = [n for n in impls if n.startswith("ours")]
    if not refs or not ours:
        return []
    keys = (("step_s", "step"), ("e2e_s", "end to end"), ("decode_s", "decode"))
    lines = ["", "Speed-up = reference time / ours (above 1: ours is faster).", "",
             "| ours | " + " | ".join(f"{label} vs {ref}" for ref in refs for _, label in keys) + " |",
             "|---|" + "---|" * (len(refs) * len(keys))]
    for name in ours:
        cells = [fmt(ratio(impls[ref].get(k), impls[name].get(k)), ".2f") for ref in refs for k, _ in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def notes(r: dict) -> list[str]:
    lines = []
    for name, x in r["impls"].items():
        c = x.get("decode_candidates")
        if c and "error" in c:
            lines.append(f"- {name}, VAE channels-last candidate: error {c['error']}")
        elif c:
            d = c["direct_decode_s"]
            lines.append(f"- {name}, VAE decode called directly: NCHW {d['NCHW'] * 1e3:.2f} ms, channels-last "
                         f"{d['channels-last'] * 1e3:.2f} ms (relative difference {c['rel_diff']:.1e}).")
    if "reference_compiled" in r:
        rc = r["reference_compiled"]
        failed = "; ".join(f"{k}: {v}" for k, v in rc["failed"].items()) or "none"
        lines.append(f"- diffusers compiled: applied {'; '.join(rc['applied'])}. Failed: {failed}.")
    for name, error in r.get("load_errors", {}).items():
        lines.append(f"- {name} failed to load: {error[:300]}")
    if "loads" in r:
        lines.append("- Loaded in this process: " + "; ".join(
            f"{n} {x['load_s_in_process']:.2f} s" + (f", {x['resident'] / GIB:.2f} GiB" if x["resident"] else "")
            for n, x in r["loads"].items()) + ".")
    return [""] + lines if lines else []


def work_table(result: dict) -> list[str]:
    s, peak = result["settings"], result["env"]["peak_tflops"]
    gpu = s["device"].startswith("cuda")
    unit = "TFLOP/s" if gpu else "GFLOP/s"
    lines = ["", "FLOPs counted (FlopCounterMode) on the implementations that run eagerly; a row that hides its ops "
             "(CUDA graphs, compiled code) takes its side's counted work (ours: cross-attention keys and values "
             "once per call, not per step); achieved = FLOPs / median time; aten ops = ops one UNet step "
             "dispatches (each at least one kernel launch on a GPU), of which dtype casts/copies.", "",
             f"| task | implementation | TFLOP per step | TFLOP per image | {unit} step / e2e | aten ops per step "
             "(casts) |", "|---|---|---|---|---|---|"]
    rows = []
    for task, r in result["tasks"].items():
        counted = {n: x for n, x in r.get("impls", {}).items() if "step_flops" in x}
        if not counted:
            continue
        for name, x in r["impls"].items():
            side = [x] if name in counted else [c for n, c in counted.items() if n.split()[0] == name.split()[0]]
            if not side:  # nothing of its side ran eagerly: no count of its own to show
                rows.append(f"| {task} | {name} | — | — | — | — |")
                continue
            step_flops, e2e_flops = side[0]["step_flops"], side[0]["e2e_flops"]
            rates = [f / x[k] if k in x else None for f, k in ((step_flops, "step_s"), (e2e_flops, "e2e_s"))]
            if gpu:
                rate = " / ".join("—" if q is None else f"{q / 1e12:.3g}"
                                  + (f" ({q / 1e12 / peak:.0%})" if peak else "") for q in rates)
            else:
                rate = " / ".join(scaled(q, 1e-9) for q in rates)
            ops = f"{x['step_aten_ops']} ({x['step_casts']})" if "step_aten_ops" in x else "—"
            rows.append(f"| {task} | {name} | {step_flops / 1e12:.4g} | {e2e_flops / 1e12:.4g} | {rate} | {ops} |")
    return lines + rows if rows else []


def throughput_table(task: str, rows: dict, s: dict) -> list[str]:
    if not rows:
        return []
    names = list(next(iter(rows.values())))
    pairs = [(o, ref) for o in names if o.startswith("ours") for ref in REF_NAMES if ref in names]
    lines = ["", f"Throughput, {task}: images per second of whole calls (num_images_per_prompt = batch, {s['steps']} "
             f"steps), median of {s['throughput_repeats']}, interleaved; in brackets the peak device memory "
             "(weights + the most a call allocates, GiB). Ratios: ours images/s over the reference's.", "",
             "| batch | " + " | ".join(names) + " | " + " | ".join(f"{o} / {ref}" for o, ref in pairs) + " |",
             "|---|" + "---|" * (len(names) + len(pairs))]
    for batch, row in rows.items():
        cells = [("error" if "error" in row.get(n, {}) else fmt(row.get(n, {}).get("images_per_s")))
                 + (f" ({row[n]['peak_bytes'] / GIB:.2f})" if "peak_bytes" in row.get(n, {}) else "") for n in names]
        cells += [fmt(ratio(row.get(o, {}).get("images_per_s"), row.get(ref, {}).get("images_per_s")), ".2f")
                  for o, ref in pairs]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    firsts = "; ".join(f"batch {b}: " + ", ".join(f"{n} {x['first_call_s']:.1f} s" for n, x in row.items()
                                                 if "first_call_s" in x) for b, row in rows.items())
    return lines + ["", f"First (2-step) call at each batch, with its compilation or capture: {firsts}."]


def memory_table(result: dict) -> list[str]:
    s, gpu = result["settings"], result["settings"]["device"].startswith("cuda")
    what, key = ("peak GPU memory", "gpu_peak") if gpu else ("peak RSS of a run", "rss_peak")
    lines = ["", f"Each in a fresh process: {what} over load + one {s['mem_steps']}-step run (ours as loaded by "
             "default); load time = files to ready on the device; peak RSS while loading = VmHWM after loading.", "",
             f"| task | reference | {what} ours (GiB) | reference (GiB) | ours/ref | load ours (s) | reference (s) "
             "| ours/ref | peak RSS while loading ours (GiB) | reference (GiB) | ours/ref |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, runs in result["memory"].items():
        o = runs["ours"]
        for variant, ref in runs.items():
            if variant == "ours":
                continue
            cells = []
            for k, scale in ((key, GIB), ("load_s", 1), ("rss_load", GIB)):
                ov, rv = o.get(k), ref.get(k)
                cells += [fmt(ov and ov / scale), fmt(rv and rv / scale), fmt(ratio(ov, rv), ".2f")]
            errors = "; ".join(f"{n} error: {x['error']}" for n, x in (("ours", o), ("reference", ref)) if "error" in x)
            lines.append(f"| {task} | {REF_LOADS[variant]}{' (' + errors + ')' if errors else ''} | "
                         + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    lines, s = header(result), result["settings"]
    for task, r in result["tasks"].items():
        if "error" in r:
            lines += [f"#### {task}", "", f"error: {r['error']}", ""]
        if r.get("impls"):
            lines += impl_table(task, r, s)
        lines += throughput_table(task, r.get("throughput", {}), s)
    lines += work_table(result) if result["tasks"] else []
    lines += memory_table(result) if result["memory"] else []
    return "\n".join(lines) + "\n"
