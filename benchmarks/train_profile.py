"""Where a training step's time goes: one profiled research-1b step, device time summed by category.

    PYTHONPATH=. python3 benchmarks/train_profile.py [--preset research-1b] [--batch-size 4] [--seq-len 8192]
        [--remat none] [--lm-head float32] [--moe-kernels default] [--flags-variant default] [--xla-flags "..."]
        [--smoke]

The step is benchmarks/train.py's (`setup`: bf16 compute, float32 master weights and AdamW, random tokens), compiled
ahead of time; 2 warm steps, --steps untraced steps (median ms/step and MFU, as train.py measures them), then
--trace-steps steps back to back inside `jax.profiler.trace(dir, create_perfetto_trace=True)`.

The perfetto trace (gzipped JSON) is parsed here. Device kernels are the "X" events on the GPU's stream lines (on
the CPU: the thunk events that carry an `hlo_op` arg). Each kernel is mapped to the HLO instruction that launched
it (the `hlo_op` arg, else the kernel name) and that instruction -- with the instructions of the fusion it calls --
to its op_name metadata (jax/flax name scopes: `groups/layer_3/attn/lightning_attention/...`, `moe_dispatch`,
`lm_head`, `transpose(jvp(...))` for the backward) and its innermost Python frame (the compiled HLO's StackFrames
table), read from `compiled.as_text()`. Categories, first match wins:
  lightning attention   a Pallas lightning kernel (its name) or the `lightning_attention` scope
  softmax attention     the `softmax_attention` scope, cuDNN/flash attention kernels
  MoE grouped matmul    the Pallas grouped_matmul kernels, or a dot in the `moe_experts` scope
  MoE routing/dispatch  the rest of the `moe` scope: router, sort, gathers/scatters, combine
  lm_head matmul        a dot in the `lm_head` scope (forward and both gradients)
  lm_head/loss          the rest of `lm_head`, the loss outside the model (logsumexp, take_along_axis)
  optimizer             optax's code (innermost Python frame) and the step's work after the gradient loop
  matmul (layers)       any other dot / cuBLAS / Triton gemm (q/k/v/o, gate and output projections)
  other                 norms, elementwise, embedding, copies
  idle                  wall time per step minus the union of all kernel intervals
When an instruction is not found, the kernel name decides (gemm/cublas/cutlass/nvjet/xmma -> matmul; lightning;
grouped_matmul; sort/scatter/gather -> MoE dispatch; adam -> optimizer). The CPU trace carries `hlo_op` on every
thunk, so --smoke exercises the same mapping (its thunks run on several threads at once: sums exceed busy time).

Command buffers: kernels that XLA replays from a CUDA graph (command buffers, on by default) carry no per-HLO
annotation in the trace, so on the GPU the profiled executable is compiled with xla_gpu_enable_command_buffer=''
(a per-compile option; the untraced ms/step are of that same executable); --keep-command-buffers keeps the default,
and the kernel-name fallback then does what it can.

XLA flags: --flags-variant NAME adds a named set (see VARIANTS), --xla-flags adds raw flags; both are appended to
$XLA_FLAGS before jax is imported. A flag XLA refuses aborts the process (XLA's own check): run one variant per call.

Writes $OUT/train_profile.jsonl (setup, timings, categories, top ops, a sample of raw trace events) and, when under
15 MB, $OUT/train_profile_trace.json.gz (open in ui.perfetto.dev). Prints the category table last.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

VARIANTS = {  # named XLA flag sets (all parse in jax 0.11.2's XLA; checked on the CPU, where parsing is the same)
    "default": "",
    "no-triton-gemm": "--xla_gpu_enable_triton_gemm=false",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
    "latency-hiding": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "no-command-buffer": "--xla_gpu_enable_command_buffer=",
    "autotune-4": "--xla_gpu_autotune_level=4",
    "exhaustive-tiling": "--xla_gpu_exhaustive_tiling_search=true",
}
CATEGORIES = ("matmul (layers)", "lm_head matmul", "MoE grouped matmul", "MoE routing/dispatch", "lightning attention",
              "softmax attention", "lm_head/loss", "optimizer", "other")
MATMUL_KERNEL_WORDS = ("gemm", "cublas", "cutlass", "nvjet", "xmma", "wgmma", "matmul", "dot_fusion")
OUT = os.environ.get("OUT", ".")
LOG_PATH = os.path.join(OUT, "train_profile.jsonl")


def log(**record):
    line = json.dumps(record, default=str)
    print(line[:2000] + (" ..." if len(line) > 2000 else ""), flush=True)
    with open(LOG_PATH, "a") as f:
        f.write(line + "\n")


# ----- the compiled HLO: instruction name -> what it is and where it came from -----
_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_TAG_WORDS = ("lightning", "grouped_matmul", "gemm", "cublas", "cudnn", "fmha", "flash", "triton")


class HloIndex:
    """Parsed `compiled.as_text()`: per instruction its opcode, op_name, stack frame, called computations, tags."""

    def __init__(self, text: str):
        self.instrs: dict[str, dict] = {}
        self.comps: dict[str, list[str]] = collections.defaultdict(list)
        tables = {s: {} for s in _SECTIONS}
        section, current = None, None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.strip() in _SECTIONS:
                section = line.strip()
                continue
            if section and re.match(r"^\d+ ", line):
                key, _, value = line.partition(" ")
                tables[section][int(key)] = value.strip()
                continue
            section = None
            if not line[0].isspace():
                header = _HEADER.match(line)
                current = header.group(1) if header else None
                continue
            m = _INSTR.match(line)
            if not m or current is None:
                continue
            name, rest = m.groups()
            opcode = _OPCODE.search(rest)
            meta = re.search(r'op_name="([^"]*)"', rest)
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            target = re.search(r'custom_call_target="([^"]*)"', rest)
            lowered = rest.lower()
            self.instrs[name] = {
                "opcode": opcode.group(1) if opcode else "?", "op_name": meta.group(1) if meta else "",
                "frame": int(frame.group(1)) if frame else 0, "calls": re.findall(r"calls=%?([\w.\-]+)", rest),
                "target": target.group(1) if target else "", "tags": {w for w in _TAG_WORDS if w in lowered}}
            self.comps[current].append(name)
        self.caller = {comp: name for name, info in self.instrs.items() for comp in info["calls"]}
        self.files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
        self.funcs = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
        fields = lambda v: {a: int(b) for a, b in re.findall(r"(\w+)=(\d+)", v)}  # noqa: E731
        self.locs = {k: fields(v) for k, v in tables["FileLocations"].items()}
        self.frames = {k: fields(v) for k, v in tables["StackFrames"].items()}
        self._cache: dict[str, dict] = {}

    def stack(self, frame_id: int) -> list[str]:
        """['file:function'] of the innermost frame. Only that one: the parent links of the printed StackFrames
        table did not form plausible call chains in jax 0.11.2 (a frame its own parent, two lines of one function
        as parent and child), while the innermost location always matched the op (Dense.__call__ for a dot, optax's
        files for the optimizer)."""
        frame = self.frames.get(frame_id)
        if not frame:
            return []
        loc = self.locs.get(frame.get("file_location_id", 0), {})
        return [f"{self.files.get(loc.get('file_name_id'), '?')}:{self.funcs.get(loc.get('function_name_id'), '?')}"]

    def describe(self, name: str) -> dict | None:
        """The instruction with what its fusion calls folded in: is_matmul, the op_name that represents it (a dot's
        when it holds one), all op_names, opcodes, tags and Python stack entries."""
        if name in self._cache:
            return self._cache[name]
        top = self.instrs.get(name)
        if top is None:
            return None
        members, todo, seen = [top], list(top["calls"]), set()
        while todo and len(members) < 2000:
            comp = todo.pop()
            if comp in seen:
                continue
            seen.add(comp)
            for inner in self.comps.get(comp, ()):
                info = self.instrs[inner]
                members.append(info)
                todo.extend(info["calls"])
        opcodes = {m["opcode"] for m in members}
        tags = set().union(*(m["tags"] for m in members))
        target = top["target"].lower()
        dots = [m for m in members if m["opcode"] in ("dot", "convolution") and m["op_name"]]
        is_matmul = bool(dots) or any(w in target for w in ("gemm", "cublas", "matmul"))
        named = [m["op_name"] for m in members if m["op_name"].count("/") >= 1]
        if dots:
            primary = dots[0]["op_name"]
        elif top["op_name"].count("/") >= 2 or not named:
            primary = top["op_name"]
        else:
            primary = collections.Counter(named).most_common(1)[0][0]
        frames = {top["frame"]} | {m["frame"] for m in members[1:50]}
        stacks = sorted({entry for f in frames if f for entry in self.stack(f)})
        described = {"opcode": top["opcode"], "target": top["target"], "op_name": primary, "is_matmul": is_matmul,
                     "all_ops": " ".join(sorted(set(named))[:50]), "opcodes": sorted(opcodes), "tags": sorted(tags),
                     "stack": stacks}
        self._cache[name] = described
        return described


def categorize(info: dict | None, kernel: str) -> str:
    """One category per kernel (see the module docstring); info from HloIndex.describe, or None."""
    k = kernel.lower()
    if info is None:  # no instruction found: the kernel name decides
        if "lightning" in k:
            return "lightning attention"
        if "grouped_matmul" in k:
            return "MoE grouped matmul"
        if any(w in k for w in ("fmha", "flash", "sdpa")):
            return "softmax attention"
        if any(w in k for w in MATMUL_KERNEL_WORDS):
            return "matmul (layers)"
        if any(w in k for w in ("sort", "scatter", "gather")):
            return "MoE routing/dispatch"
        if "adam" in k:
            return "optimizer"
        return "other"
    op, tags, stack = info["op_name"], set(info["tags"]), " ".join(info["stack"])
    everything = op + " " + info["all_ops"]
    if "lightning" in tags or "lightning" in k or "/lightning_attention" in op:
        return "lightning attention"
    if "/softmax_attention" in op or "fmha" in tags or any(w in k for w in ("fmha", "flash", "sdpa")):
        return "softmax attention"
    if "grouped_matmul" in tags or "grouped_matmul" in k or ("moe_experts" in op and (
            info["is_matmul"] or "pallas_call" in op or "ragged_dot" in op)):
        return "MoE grouped matmul"
    if "/moe/" in op or "/moe_" in op:
        return "MoE routing/dispatch"
    if "/lm_head/" in op:
        return "lm_head matmul" if info["is_matmul"] else "lm_head/loss"
    if any(w in everything for w in ("jvp()/", "transpose(jvp())", "take_along_axis", "log_softmax", "logsumexp")):
        return "lm_head/loss"
    outside_model = op.startswith("jit(") and op.count("/") >= 1 and "/while/" not in op and not any(
        w in op for w in ("groups/", "lm_head", "embed", "final_norm", "M1ForCausalLM", "jvp("))
    if "optax" in stack or "apply_gradients" in stack or "tree_bias_correction" in op or outside_model:
        return "optimizer"  # optax's code, or the step's own work after the gradient loop (norms, metrics)
    if info["is_matmul"] or any(w in k for w in MATMUL_KERNEL_WORDS):
        return "matmul (layers)"
    return "other"


# ----- the perfetto trace -----
def _hlo_op_of(event: dict, index: "HloIndex") -> tuple[str | None, str]:
    """(instruction name, how it was found) from an event's args, else from its (kernel) name."""
    args = event.get("args") or {}
    for key in ("hlo_op", "hlo_op_name"):
        if isinstance(args.get(key), str):
            return args[key], "args.hlo_op"
    for value in args.values():
        if isinstance(value, str) and "hlo_op=" in value:
            return re.search(r"hlo_op=([^,#\s]+)", value).group(1), "args annotation"
    name = event.get("name", "")
    if "hlo_op=" in name:
        return re.search(r"hlo_op=([^,#\s]+)", name).group(1), "name annotation"
    # Without an annotation (e.g. a kernel replayed from a command buffer) XLA GPU kernels still carry the name of
    # their fusion (dots as underscores) or of its fused computation.
    for candidate in (name, re.sub(r"_(\d+)$", r".\1", name)):
        if candidate in index.instrs:
            return candidate, "kernel name"
        if candidate in index.caller:
            return index.caller[candidate], "kernel name (computation)"
    return None, "unmatched"


def _args_op_name(event: dict) -> str:
    """The op_name XLA's kernel annotation puts in the event args ("name"), if any."""
    value = (event.get("args") or {}).get("name")
    return value if isinstance(value, str) and "/" in value else ""


def device_events(trace: dict) -> tuple[list[dict], str]:
    """The kernel events (ph X) that are device work, and which lines they came from."""
    events = trace.get("traceEvents", [])
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = str((e.get("args") or {}).get("name", ""))
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = str((e.get("args") or {}).get("name", ""))
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = {pid for pid, name in procs.items() if "/device:GPU" in name or "/device:TPU" in name}
    if gpu:
        lines = {key for key, name in threads.items() if key[0] in gpu and "stream" in name.lower()}
        chosen = [e for e in xs if (e.get("pid"), e.get("tid")) in lines]
        if chosen:
            return chosen, "device stream lines: " + ", ".join(sorted({threads[k] for k in lines}))[:300]
        lines = {key for key, name in threads.items() if key[0] in gpu and name == "XLA Ops"}
        chosen = [e for e in xs if (e.get("pid"), e.get("tid")) in lines]
        if chosen:
            return chosen, "device 'XLA Ops' line"
        chosen = [e for e in xs if e.get("pid") in gpu]
        return chosen, "every device event (no stream lines found)"
    chosen = [e for e in xs if isinstance((e.get("args") or {}).get("hlo_op"), str)
              and not e.get("name", "").startswith("end: ")]
    return chosen, "host thunk events with an hlo_op arg (CPU)"


def leaves_only(events: list[dict]) -> list[dict]:
    """Drop events that enclose another event of the same line (CPU while/call thunks): no double counting."""
    by_line = collections.defaultdict(list)
    for e in events:
        by_line[(e.get("pid"), e.get("tid"))].append(e)
    kept = []
    for line in by_line.values():
        line.sort(key=lambda e: (e["ts"], -e["dur"]))
        for i, e in enumerate(line):
            nxt = line[i + 1] if i + 1 < len(line) else None
            if nxt is not None and nxt["ts"] < e["ts"] + e["dur"] and nxt["ts"] + nxt["dur"] <= e["ts"] + e["dur"]:
                continue  # e contains the next event: a parent
            kept.append(e)
    return kept


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def analyse(trace: dict, index: HloIndex, steps: int, wall_per_step_ms: float) -> dict:
    events, source = device_events(trace)
    events = leaves_only(events)
    per_cat = collections.Counter()
    count_cat = collections.Counter()
    per_op = collections.Counter()
    op_cat, op_name, how = {}, {}, collections.Counter()
    for e in events:
        hlo_op, found = _hlo_op_of(e, index)
        how[found] += 1
        info = index.describe(hlo_op) if hlo_op else None
        if info is None and _args_op_name(e):  # not in the compiled text, but the annotation names its scopes
            info = {"op_name": _args_op_name(e), "all_ops": "", "tags": [], "stack": [],
                    "is_matmul": any(w in e.get("name", "").lower() for w in MATMUL_KERNEL_WORDS)}
        cat = categorize(info, e.get("name", ""))
        ms = e["dur"] / 1e3  # trace times are microseconds
        per_cat[cat] += ms
        count_cat[cat] += 1
        key = hlo_op or e.get("name", "?")
        per_op[key] += ms
        op_cat[key] = cat
        op_name[key] = (info or {}).get("op_name", "") or e.get("name", "")
    busy_ms = union_length([(e["ts"], e["ts"] + e["dur"]) for e in events]) / 1e3
    span_ms = ((max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e3) if events else 0.0
    return {"source": source, "num_events": len(events), "matched_by": dict(how),
            "per_step_ms": {c: per_cat[c] / steps for c in per_cat}, "kernels_per_step": {c: count_cat[c] / steps
                                                                                        for c in count_cat},
            "busy_ms": busy_ms / steps, "kernel_sum_ms": sum(per_cat.values()) / steps, "span_ms": span_ms / steps,
            "wall_ms": wall_per_step_ms,
            "top_ops": [{"hlo_op": k, "category": op_cat[k], "ms_per_step": v / steps, "op_name": op_name[k][-160:]}
                        for k, v in per_op.most_common(300)]}  # the log keeps them; the console prints the top


def event_sample(trace: dict, limit: int = 25) -> list[dict]:
    """A few raw events of the device lines (or thunks), to show the metadata format."""
    events, source = device_events(trace)
    out = []
    for e in events[:limit]:
        args = {k: (v[:200] if isinstance(v, str) else v) for k, v in (e.get("args") or {}).items()}
        out.append({"name": e.get("name", "")[:200], "dur_us": e.get("dur"), "args": args})
    return out


# ----- the run -----
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="research-1b")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--remat", default="none", help="none, dots or full (M1ForCausalLM's remat policies)")
    parser.add_argument("--lm-head", default="float32", choices=("float32", "bfloat16"),
                        help="the vocabulary head's precision (benchmarks/train.py --lm-head)")
    parser.add_argument("--steps", type=int, default=5, help="untraced timed steps (median)")
    parser.add_argument("--trace-steps", type=int, default=3)
    parser.add_argument("--flags-variant", default="default", choices=sorted(VARIANTS))
    parser.add_argument("--xla-flags", default="", help="raw XLA flags appended to $XLA_FLAGS")
    parser.add_argument("--keep-command-buffers", action="store_true",
                        help="profile with XLA's command buffers (CUDA graphs) as configured; by default the profiled "
                             "executable is compiled without them so that every kernel keeps its HLO annotation")
    parser.add_argument("--no-save-trace", action="store_true", help="do not copy the perfetto trace to $OUT")
    parser.add_argument("--dump-hlo", action="store_true", help="also write the compiled HLO text to $OUT")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU (a minute)")
    parser.add_argument("--softmax-impl", default="auto", choices=("auto", "cudnn", "dense", "blocked"),
                        help="force the softmax layers' attention path (default: the model's own choice)")
    parser.add_argument("--moe-kernels", choices=("default", "mosaic"), default="default",
                        help="the grouped matmul's kernels (benchmarks/train.py --moe-kernels)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.batch_size, args.seq_len, args.steps, args.trace_steps = "tiny", 2, 64, 2, 2
    extra = " ".join(x for x in (VARIANTS[args.flags_variant], args.xla_flags) if x)
    if extra:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()
    os.makedirs(OUT, exist_ok=True)

    import jax  # after XLA_FLAGS is final

    from benchmarks.train import setup
    from pallas_kernels.grouped_matmul import ops as grouped_ops
    from m1jax.flops import peak_flops_per_device, train_flops

    if args.softmax_impl != "auto":
        import m1jax.layers.softmax_attention as softmax_attention
        softmax_attention.attention_impl = lambda *a, **k: args.softmax_impl
    grouped_ops.MOSAIC_BY_DEFAULT = args.moe_kernels == "mosaic"  # read when the step is traced
    device = jax.devices()[0]
    log(what="setup", softmax_impl=args.softmax_impl, preset=args.preset, batch=args.batch_size, seq_len=args.seq_len,
        remat=args.remat, lm_head=args.lm_head, moe_kernels=args.moe_kernels,
        device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""), variant=args.flags_variant, date=time.strftime("%Y-%m-%d %H:%M"))
    cfg, step, state, batch = setup(args.preset, args.batch_size, args.seq_len, args.remat, args.lm_head)
    options = {}
    if (jax.default_backend() == "gpu" and not args.keep_command_buffers
            and "command_buffer" not in os.environ.get("XLA_FLAGS", "")):
        # Kernels replayed from a CUDA graph lose their per-HLO annotation: compile this executable without them.
        options["xla_gpu_enable_command_buffer"] = ""
    begin = time.perf_counter()
    compiled = step.lower(state, batch).compile(compiler_options=options or None)
    compile_s = time.perf_counter() - begin
    text = compiled.as_text()
    index = HloIndex(text)
    if args.dump_hlo:
        with open(os.path.join(OUT, "train_profile_hlo.txt"), "w") as f:
            f.write(text)
    log(what="compiled", compile_s=compile_s, compiler_options=options, hlo_instructions=len(index.instrs),
        stack_frames=len(index.frames), command_buffer_computations=len(re.findall(r"^%?command_buffer", text, re.M)))
    del text

    for _ in range(2):  # warm
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_ms = 1e3 * statistics.median(times)
    flops = train_flops(cfg, args.seq_len, args.batch_size)
    peak = peak_flops_per_device(device.device_kind)
    mfu = flops / (step_ms / 1e3) / peak if peak else None
    stats = device.memory_stats() or {}
    log(what="timing", step_ms=step_ms, steps_ms=[1e3 * t for t in times], tokens_per_s=args.batch_size * args.seq_len
        / (step_ms / 1e3), tflops=flops / (step_ms / 1e3) / 1e12, mfu=mfu, loss=float(metrics["loss"]),
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)

    result, trace_wall_ms = None, None
    trace_dir = tempfile.mkdtemp(prefix="m1jax_trace_")
    try:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(args.trace_steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            trace_wall_ms = 1e3 * (time.perf_counter() - start) / args.trace_steps
        paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True))
        if not paths:
            raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: "
                                    f"{glob.glob(os.path.join(trace_dir, '**'), recursive=True)[:20]}")
        with gzip.open(paths[-1], "rt") as f:
            trace = json.load(f)
        log(what="trace events sample", events=event_sample(trace))
        result = analyse(trace, index, args.trace_steps, trace_wall_ms)
        log(what="profile", **result)
        size = os.path.getsize(paths[-1])
        if not args.no_save_trace and size < 15 * 2**20:
            shutil.copy(paths[-1], os.path.join(OUT, "train_profile_trace.json.gz"))
    except Exception as err:  # the untraced timing above still stands
        log(what="profile failed", error=f"{type(err).__name__}: {str(err)[:800]}")
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)

    # ----- tables (the category table last) -----
    print()
    if result:
        print("top HLO ops (ms/step, category, op_name tail):")
        for row in result["top_ops"][:15]:
            print(f"  {row['ms_per_step']:8.3f}  {row['category']:22s} {row['hlo_op'][:28]:28s} {row['op_name'][-90:]}")
        print(f"\nkernels from: {result['source']}; {result['num_events']} events; matched by {result['matched_by']}")
    print(f"\n== train step profile: {args.preset}, {args.batch_size} x {args.seq_len}, remat {args.remat}, "
          f"lm_head {args.lm_head}, moe kernels {args.moe_kernels}, {device.device_kind}, "
          f"XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'")
    mfu_text = f"{100 * mfu:.1f}%" if mfu else "n/a"
    if options:
        print("(this executable was compiled with xla_gpu_enable_command_buffer='' for per-kernel attribution; "
              "--keep-command-buffers profiles the default)")
    print(f"untraced: {step_ms:.1f} ms/step, {flops / (step_ms / 1e3) / 1e12:.1f} TFLOP/s, MFU {mfu_text}; "
          f"compile {compile_s:.0f} s")
    if not result:
        print("(no profile: see the 'profile failed' record)")
        return 1
    wall = result["wall_ms"]
    trace_mfu = f"{100 * flops / (wall / 1e3) / peak:.1f}%" if peak else "n/a"
    print(f"traced: {wall:.1f} ms/step wall ({args.trace_steps} steps back to back), device busy "
          f"{result['busy_ms']:.1f} ms (kernel sum {result['kernel_sum_ms']:.1f}), MFU at traced wall {trace_mfu}")
    print(f"{'category':24s} {'ms/step':>9s} {'% step':>7s} {'kernels':>8s}")
    cats = list(CATEGORIES) + sorted(set(result["per_step_ms"]) - set(CATEGORIES))
    for cat in cats:
        ms = result["per_step_ms"].get(cat, 0.0)
        print(f"{cat:24s} {ms:9.2f} {100 * ms / wall:6.1f}% {result['kernels_per_step'].get(cat, 0):8.0f}")
    idle = wall - result["busy_ms"]
    print(f"{'idle (wall - busy)':24s} {idle:9.2f} {100 * idle / wall:6.1f}%")
    overlap = result["kernel_sum_ms"] - result["busy_ms"]
    if overlap > 0.01 * wall:
        print(f"(kernels overlapped on several streams for {overlap:.2f} ms/step: category sums exceed busy time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
