"""The report as Markdown tables (stdout) from the dictionary that ``--json`` writes."""


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _grid(config: dict) -> str:
    """'2376' for a 1-D grid, '12x22x1=264' otherwise."""
    g = config["grid"]
    return str(config["programs"]) if g[1] == g[2] == 1 else f"{g[0]}x{g[1]}x{g[2]}={config['programs']}"


def _mma(v: dict) -> str:
    """wgmma (HGMMA), mma.sync (HMMA) or tcgen05 (UTC*MMA), and whether it runs inside a loop (the main loop)."""
    for kind, count, in_loop in (("wgmma", v["hgmma"], v["hgmma_in_loop"]), ("mma.sync", v["hmma"], v["hmma_in_loop"]),
                                 ("tcgen05", v["utcmma"], v["utcmma_in_loop"])):
        if count:
            return f"{kind}, {'in loop' if in_loop else 'not in a loop'}"
    return "none"


def markdown(report: dict) -> str:
    s, w = report["summary"], report["workload"]
    dtype = w["dtype"] + (f" ({w['fp32_precision']} dots)" if w.get("fp32_precision") else "")
    g = report["gpu"]
    out = [f"# Kernel inspection: {w['module']}, {dtype}, x {tuple(w['x_shape'])}, target {report['target']}",
           "", f"`{report['command']}` (torch {report['versions']['torch']}, triton {report['versions']['triton']}; "
           f"compiled for {report['ptxas_arch']}, not run; occupancy and floors for an {g['gpu']}: {g['sms']} SMs, "
           f"{report['peak_flops'] / 1e12:.0f} TFLOP/s, {g['hbm'] / 1e12:.2f} TB/s, "
           f"{g['smem_per_sm'] // 1024} KB shared memory per SM, {g['smem_per_block'] // 1024} KB per block)", ""]
    h = report["host"]
    host_rows = [] if h is None else [
        ["bare timm Mlp device launches", "", "", f"{len(h['bare_ops'])} ({', '.join(h['bare_ops'])})"],
        [f"host CPU µs per fwd+bwd, device work stubbed ({h['dtype']} both sides, {h['tokens']} tokens; bare Mlp "
         f"{h['bare_dims'][0]}->{h['bare_dims'][1]}): ASE / bare timm Mlp", "", "",
         f"{h['ase_us']['median']:.0f} / {h['bare_us']['median']:.0f}: **{h['ratio']:.2f}x** (median of "
         f"{h['rounds']} rounds; {h['ratio_low']:.2f}-{h['ratio_high']:.2f}x)"],
    ]
    out += [_table(["measure", "fwd", "bwd", "total"], [
        ["Triton launches", s["triton"]["fwd"], s["triton"]["bwd"], s["triton"]["total"]],
        ["torch device ops", s["torch_ops"]["fwd"], s["torch_ops"]["bwd"], s["torch_ops"]["total"]],
        ["**device launches**", "", "", f"**{s['launches']}**"],
        ["host syncs", s["syncs"]["fwd"], s["syncs"]["bwd"], f"**{s['syncs']['total']}**"],
        ["Triton floors µs", f"{s['triton_floor_us']['fwd']:.1f}", f"{s['triton_floor_us']['bwd']:.1f}",
         f"{s['triton_floor_us']['total']:.1f}"],
        ["torch-op floors µs (inputs only)", f"{s['torch_floor_us']['fwd']:.1f}", f"{s['torch_floor_us']['bwd']:.1f}",
         f"{s['torch_floor_us']['total']:.1f}"],
        ["spilling variants", "", "", f"{s['spilling_variants']} of {len(report['variants'])}"],
        ["max shared memory B (block limit)", "", "", f"{s['max_smem']} ({g['smem_per_block']})"],
        ["launches with a variant of >= 2 programs per SM", "", "",
         f"{s['two_per_sm_launches']} of {len(report['launches'])}"],
        *host_rows,
    ]), ""]

    out += ["## Compiled variants", "", _table(
        ["v", "kernel", "role", "cfg", "tile", "warps", "stages", "regs", "spill st/ld B", "smem B", "progs/SM (limit)",
         "MMA", "TMA loads", "LDL/STL"],
        [[v["id"], v["kernel"], v["role"], v["config"], v["tile"], v["num_warps"], v["num_stages"], v["regs"],
          f"{v['spill_store']}/{v['spill_load']}", v["smem"], f"{v['programs_per_sm']} ({v['limit']})",
          _mma(v),
          v["utmaldg"], f"{v['ldl']}/{v['stl']}"] for v in report["variants"]]), ""]

    out += ["## Launches (one forward+backward)", "", _table(
        ["#", "phase", "kernel", "role", "variants", "grid (waves) per variant", "GFLOP", "min MB", "floor µs"],
        [[i, la["phase"], la["kernel"], la["role"], " ".join(f"v{c['variant']}" for c in la["configs"]),
          " / ".join(f"{_grid(c)} ({c['waves']:.2f})" for c in la["configs"]),
          "?" if la["flops"] is None else f"{la['flops'] / 1e9:.2f}", _mb(la["bytes"]),
          f"{la['floor_us']:.1f} ({la['bound']})"] for i, la in enumerate(report["launches"], 1)]), ""]

    out += ["## Torch device ops", "", _table(
        ["#", "phase", "op", "input shapes", "input MB", "floor µs"],
        [[i, o["phase"], o["op"], " ".join(str(tuple(x)) for x in o["shapes"]), _mb(o["bytes"]),
          f"{o['floor_us']:.1f}"] for i, o in enumerate(report["torch_ops"], 1)]), ""]

    out += ["## Host syncs", "", _table(["phase", "call", "where"],
                                       [[x["phase"], x["what"], x["where"]] for x in report["syncs"]])
            if report["syncs"] else "none", ""]
    return "\n".join(out)
