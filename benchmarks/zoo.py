"""The model zoo: does the split model give the unsplit model's outputs and gradients?

    .venv-zoo/bin/python benchmarks/zoo.py [--quick] [--only NAME[,NAME]] [--json /tmp/zoo.json]
    make zoo                                   # creates .venv-zoo (torchvision, timm) first

Every architecture of benchmarks/zoo_models.py (torchvision, timm, Hugging Face from tiny
configs, hand-written traps) is built with random weights (nothing is downloaded) and run in a
subprocess of its own with a timeout. Per model, against an unsplit deep copy:

- ``4dev``: ``ModelSplitter(devices=cpu:0..3, time_limit=5, backward="autograd")`` (chunks
  left to the splitter, as a new user would: 4 one-row micro-batches at batch 4, bigger ones
  where the splitter finds the model needs them, with a warning: [Note: choosing
  micro-batches]) planned on batch 4 (the plan seconds); outputs at batch 4, gradients of
  ``sum(mean(out ** 2))`` over the floating outputs, outputs at batch 3 (the same plan);
- ``4dev-pipelined``: the same plan (``ModelSplitter.from_plan``) with
  ``backward="pipelined"``: outputs and gradients at batch 4;
- ``2dev-pipelined``: planned anew on 2 devices, ``backward="pipelined"``: outputs and
  gradients at batch 4, outputs at batch 3;
- a row refused with "use bigger micro-batches (fewer chunks)" also tries that remedy
  (``4dev`` with ``chunks=2``); its status is shown as ``(chunks=2: ok)`` before the
  row's note and does not change the row's own status.

Each check also compares the model's buffers (BatchNorm statistics, counters) and any input the
model mutates in place with the unsplit model's. A row's status:

- ``ok``: every check within tolerance (max |split - unsplit| / max |unsplit| <= 1e-4);
- ``error``: a clear error: a ``partitioner.ModelSplitError`` (or a ``StageError`` carrying
  one), or a ValueError/TypeError raised by the library's own code;
- ``unclear``: another exception (an error from torch or the model inside the library);
- ``warned``: a difference the library warned about (a UserWarning from its own code);
- ``MISMATCH``: a difference without any exception or warning: the worst outcome;
- ``timeout``, ``crash`` (the subprocess died), ``skipped`` (its library is not installed),
  ``zoo-bug`` (the unsplit model itself failed: the table is wrong, not the library).

Runs under the main venv too (torch 2.13, no torchvision or timm): those entries are skipped.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOL = 1e-4
RANK = {
    "ok": 0,
    "skipped": 0,
    "error": 1,
    "warned": 2,
    "unclear": 3,
    "timeout": 4,
    "crash": 4,
    "zoo-bug": 4,
    "MISMATCH": 5,
}
# the library under test (the checkout this file is in, or the one the venv installed)
_spec = importlib.util.find_spec("partitioner")
LIB = Path(_spec.origin).resolve().parents[1] if _spec and _spec.origin else ROOT
PROJECT_DIRS = tuple(str(LIB / d) + os.sep for d in ("partitioner", "runtime", "modelsplit"))


# -- comparing -------------------------------------------------------------------------------


def leaves(value: Any, path: str = "out") -> Iterator[tuple[str, Any]]:
    """(path, leaf) of a nested output: tensors and other leaves (None, ints)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict) or hasattr(value, "keys") and hasattr(value, "__getitem__"):
        for key in value.keys():  # noqa: SIM118 (ModelOutput)
            yield from leaves(value[key], f"{path}.{key}")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def rel_err(a: Any, b: Any, floor: float = 0.0) -> float:
    """max |a - b| / max |b| (floored), inf for a shape, dtype or presence mismatch."""
    import torch

    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if a.shape != b.shape:
        return math.inf
    if not a.is_floating_point() and not a.is_complex():
        return 0.0 if torch.equal(a, b) else math.inf
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(b).all():
        same = torch.equal(torch.isfinite(a), torch.isfinite(b))
        keep = torch.isfinite(b)
        if not same:
            return math.inf
        a, b = a[keep], b[keep]
    if b.numel() == 0:
        return 0.0
    scale = max(b.abs().max().item(), floor, 1e-30)
    return (a - b).abs().max().item() / scale


def compare_outputs(got: Any, want: Any) -> dict[str, float]:
    """Relative error per output leaf; a structure mismatch is one infinite entry."""
    import torch

    g, w = dict(leaves(got)), dict(leaves(want))
    if g.keys() != w.keys():
        return {f"structure {sorted(g)} vs {sorted(w)}": math.inf}
    errs = {}
    for key, b in w.items():
        a = g[key]
        if isinstance(b, torch.Tensor) or isinstance(a, torch.Tensor):
            ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            errs[key] = rel_err(a, b) if ok else math.inf
        else:
            errs[key] = 0.0 if a == b else math.inf
    return errs


def loss_of(out: Any) -> Any:
    """sum of mean squares of the floating outputs that need grad (float32 or float64)."""
    import torch

    terms = [
        (t if t.dtype in (torch.float32, torch.float64) else t.float()).pow(2).mean()
        for _, t in leaves(out)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    ]
    return sum(terms) if terms else None


def grads_of(model: Any, inputs: list[Any]) -> dict[str, Any]:
    found = {name: p.grad for name, p in model.named_parameters()}
    found.update({f"input[{i}]": x.grad for i, x in enumerate(inputs)})
    return found


def compare_grads(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    """Relative error per parameter (and input), against the larger of its own scale and
    1e-3 of the largest gradient: a gradient that should be 0 is compared with the rest."""
    scale = max((b.abs().max().item() for b in want.values() if b is not None), default=0.0)
    errs = {}
    for name, b in want.items():
        a = got.get(name)
        if b is None:
            errs[name] = 0.0 if a is None or not a.any() else math.inf
        elif a is None:
            errs[name] = 0.0 if not b.any() else math.inf
        else:
            errs[name] = rel_err(a, b, floor=1e-3 * scale)
    return errs


def state_of(model: Any) -> dict[str, Any]:
    found = {f"buffer {n}": b for n, b in model.named_buffers()}
    found.update({f"parameter {n}": p for n, p in model.named_parameters()})
    return found


def compare_state(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    return {name: rel_err(got.get(name), b) for name, b in want.items()}


def judge(err: dict[str, float], noise: dict[str, float] | None, err64: dict[str, float] | None):
    """(worst error, where, bad): a leaf is bad when it is off the unsplit model by more than
    TOL and off the float64 model by more than 10x the unsplit float32 model is (its rounding
    noise), or by more than TOL where there is no float64 model."""
    worst, where, bad = 0.0, "", []
    for key, e in err.items():
        if e > worst:
            worst, where = e, key
        if e <= TOL:
            continue
        if noise is None or err64 is None or key not in noise or key not in err64:
            bad.append((e, key, None, None))
        elif err64[key] > max(10 * noise[key], TOL):
            bad.append((e, key, noise[key], err64[key]))
    if bad:
        e, key, n, e64 = max(bad)
        extra = "" if n is None else f" (float64: split {e64:.2g}, unsplit {n:.2g})"
        return {"err": e, "where": key, "bad": True, "detail": f"{e:.3g} at {key}{extra}"}
    return {
        "err": worst,
        "where": where,
        "bad": False,
        "noise_max": max((noise or {0: 0}).values()),
    }


# -- one model, in its own process -------------------------------------------------------------


def first_line(exc: BaseException) -> str:
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    head = " ".join(text[:2]) if text and text[0].endswith(":") else (text[0] if text else "")
    return f"{type(exc).__name__}: {head}"[:400]


def raised_in_project(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PROJECT_DIRS)


def classify(exc: BaseException) -> str:
    from partitioner import ModelSplitError

    inner = getattr(exc, "original", None)
    if isinstance(exc, ModelSplitError) or isinstance(inner, ModelSplitError):
        return "error"
    for e in (exc, inner):
        if isinstance(e, (ValueError, TypeError)) and raised_in_project(e):
            return "error"
    return "unclear"


def library_warnings(caught: list[Any]) -> list[str]:
    said = []
    for w in caught:
        if str(w.filename).startswith(PROJECT_DIRS):
            line = f"{w.category.__name__}: {str(w.message).splitlines()[0]}"[:300]
            if line not in said:
                said.append(line)
    return said


def clone_inputs(args: Any, kwargs: Any, grad: bool) -> tuple[Any, Any, list[Any]]:
    import torch

    need = []

    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            v = v.clone()
            if grad and v.is_floating_point():
                v.requires_grad_(True)
                need.append(v)
        return v

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}, need


def to_double(args: Any, kwargs: Any) -> tuple[Any, Any]:
    import torch

    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().double().requires_grad_(v.requires_grad)
        return v

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


class Reference:
    """The unsplit model in float32 and, where it runs in float64, in float64 too: the
    float64 model tells rounding noise (float32 unsplit vs float64) from a real difference."""

    def __init__(self, pristine: Any, grad: bool) -> None:
        self.m32 = copy.deepcopy(pristine)
        self.m64: Any = copy.deepcopy(pristine).double()
        self.grad = grad

    def run(self, args: Any, kwargs: Any, backward: bool) -> dict[str, Any]:
        import torch

        a, k, need = clone_inputs(args, kwargs, self.grad and backward)
        with torch.set_grad_enabled(backward):
            torch.manual_seed(0)
            out = self.m32(*a, **k)
        ran: dict[str, Any] = {"out": out, "inputs": (a, k)}
        if backward and (loss := loss_of(out)) is not None:
            loss.backward()
            ran["grads"] = grads_of(self.m32, need)
        if self.m64 is not None:
            try:
                a64, k64 = to_double(*clone_inputs(args, kwargs, self.grad and backward)[:2])
                need64 = [v for v in (*a64, *k64.values()) if getattr(v, "requires_grad", 0)]
                with torch.set_grad_enabled(backward):
                    torch.manual_seed(0)
                    out64 = self.m64(*a64, **k64)
                ran["out64"], ran["inputs64"] = out64, (a64, k64)
                if "grads" in ran and (loss64 := loss_of(out64)) is not None:
                    loss64.backward()
                    ran["grads64"] = grads_of(self.m64, need64)
            except Exception:  # no float64 reference: plain tolerance
                self.m64 = None
        return ran


def compare(steps: dict[str, Any], step: str, fn: Any, got: Any, ref: dict, key: str) -> None:
    want, want64 = ref.get(key), ref.get(f"{key}64")
    noise = err64 = None
    if want64 is not None:
        noise, err64 = fn(want, want64), fn(got, want64)
    steps[step] = judge(fn(got, want), noise, err64)


def run_config(entry: Any, pristine: Any, cfg: dict[str, Any], result: dict[str, Any]) -> Any:
    """One configuration (devices, backward): returns its plan (or None)."""
    import torch

    from partitioner import ModelSplitter

    check: dict[str, Any] = {"config": cfg["label"], "steps": {}}
    result["checks"].append(check)
    steps = check["steps"]
    model, ref = copy.deepcopy(pristine), Reference(pristine, entry.input_grad)
    options = dict(entry.options, backward=cfg["backward"], time_limit=5.0)
    devices = [f"cpu:{k}" for k in range(cfg["devices"])]
    big, small = entry.batches
    args4, kwargs4 = entry.inputs(big)
    args3, kwargs3 = entry.inputs(small)
    step = "plan"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t0 = time.perf_counter()
            a, k, _ = clone_inputs(args4, kwargs4, False)
            chunks = cfg.get("chunks")  # None: the splitter's choice, 4 at batch 4 here
            common = dict(devices=devices, chunks=chunks, example_inputs=a, example_kwargs=k)
            if cfg.get("plan") is not None:  # the plan applied without solving, on the
                common["devices"] = list(cfg["plan"].devices)  # devices its stages use
                splitter = ModelSplitter.from_plan(model, cfg["plan"], **common, **options)
            else:
                splitter = ModelSplitter(model, **common, **options)
            check["plan_s"] = round(time.perf_counter() - t0, 2)
            check["stages"] = len(splitter.stages)
            for second, args, kwargs in ((False, args4, kwargs4), (True, args3, kwargs3)):
                if second and not cfg.get("batch3"):
                    continue
                backward, batch = not second, entry.batches[second]
                step = f"forward b{batch}"
                want = ref.run(args, kwargs, backward)
                a, k, need = clone_inputs(args, kwargs, entry.input_grad and backward)
                with torch.set_grad_enabled(backward):
                    torch.manual_seed(0)
                    got = splitter(*a, **k)
                compare(steps, step, compare_outputs, got, want, "out")
                compare(steps, f"inputs b{batch}", compare_outputs, (a, k), want, "inputs")
                if "grads" in want:
                    step = f"grads ({cfg['backward']})"
                    loss = loss_of(got)
                    if loss is None:
                        steps[step] = judge({"split output needs no grad": math.inf}, None, None)
                    else:
                        loss.backward()
                        compare(steps, step, compare_grads, grads_of(model, need), want, "grads")
                del got, want
            step = "state"
            want = {"state": state_of(ref.m32)}
            if ref.m64 is not None:
                want["state64"] = state_of(ref.m64)
            compare(steps, step, compare_state, state_of(model), want, "state")
            plan = splitter.plan
        except Exception as exc:
            check["error"] = {
                "step": step,
                "class": type(exc).__name__,
                "kind": classify(exc),
                "line": first_line(exc),
                "fewer_chunks": "fewer chunks" in str(exc),  # the remedy `remedy` tries
            }
            inner = getattr(exc, "original", None)
            if inner is not None:
                check["error"]["original"] = first_line(inner)
            plan = None
        check["warnings"] = library_warnings(caught)
    check["float64"] = ref.m64 is not None
    if any(v["bad"] for v in steps.values()):
        check["status"] = "warned" if check["warnings"] else "MISMATCH"
    elif "error" in check:
        check["status"] = check["error"]["kind"]
    else:
        check["status"] = "ok"
    return plan


def worker(name: str, out_path: str) -> None:
    import torch

    from benchmarks.zoo_models import BY_NAME

    entry = BY_NAME[name]
    torch.manual_seed(0)
    result: dict[str, Any] = {"name": name, "family": entry.family, "checks": []}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pristine = entry.build()
            pristine.train(entry.train)
            # the unsplit model must run (else the table is wrong, not the library)
            args, kwargs = entry.inputs(entry.batches[0])
            probe = copy.deepcopy(pristine)
            loss = loss_of(probe(*args, **kwargs))
            if loss is not None:
                loss.backward()
            del probe
        result["params"] = sum(p.numel() for p in pristine.parameters())
    except Exception as exc:
        result.update(status="zoo-bug", error={"line": first_line(exc), "step": "build"})
        Path(out_path).write_text(json.dumps(result))
        return
    plan = run_config(
        entry,
        pristine,
        {"label": "4dev", "devices": 4, "backward": "autograd", "batch3": True},
        result,
    )
    if plan is not None:
        run_config(
            entry,
            pristine,
            {"label": "4dev-pipelined", "devices": 4, "backward": "pipelined", "plan": plan},
            result,
        )
    run_config(
        entry,
        pristine,
        {"label": "2dev-pipelined", "devices": 2, "backward": "pipelined", "batch3": True},
        result,
    )
    remedy(entry, pristine, result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    try:
        summarise(result)
    except Exception as exc:  # a bug of the zoo's own: keep the raw checks
        result.update(status="zoo-bug", error={"line": first_line(exc), "step": "summary"})
    Path(out_path).write_text(json.dumps(result, default=str))


def remedy(entry: Any, pristine: Any, result: dict[str, Any]) -> None:
    """A row refused with "use bigger micro-batches (fewer chunks)": does the remedy the
    message gives work? The 4-device autograd config with chunks=2 (2-row micro-batches);
    its status goes to ``result["remedy"]``, not into the row's own status."""
    first = result["checks"][0] if result["checks"] else {}
    if not first.get("error", {}).get("fewer_chunks"):
        return
    trial: dict[str, Any] = {"checks": []}
    label = "4dev-chunks2"
    cfg = {"label": label, "devices": 4, "backward": "autograd", "chunks": 2, "batch3": True}
    run_config(entry, pristine, cfg, trial)
    check = trial["checks"][0]
    result["remedy"] = {
        "config": label,
        "status": check["status"],
        "line": check.get("error", {}).get("line", ""),
        "differences": [f"{s}: {v['detail']}" for s, v in check["steps"].items() if v["bad"]],
    }


def summarise(result: dict[str, Any]) -> None:
    checks = result["checks"]
    result["status"] = max((c["status"] for c in checks), key=RANK.__getitem__, default="ok")
    steps = [(c["config"], s, v) for c in checks for s, v in c["steps"].items()]

    def worst(pred: Any) -> float | None:
        return max((v["err"] for _, s, v in steps if pred(s)), default=None)

    result["out_err"] = worst(lambda s: s.startswith("forward"))
    result["grad_autograd"] = worst(lambda s: s == "grads (autograd)")
    result["grad_pipelined"] = worst(lambda s: s == "grads (pipelined)")
    result["state_err"] = worst(lambda s: s == "state" or s.startswith("inputs"))
    result["plan_s"] = {c["config"]: c.get("plan_s") for c in checks}
    result["stages"] = {c["config"]: c.get("stages") for c in checks}
    result["differences"] = [f"{c} {s}: {v['detail']}" for c, s, v in steps if v["bad"]]
    result["float64"] = all(c.get("float64") for c in checks)
    errors = [c for c in checks if "error" in c]
    if errors:
        result["error"] = dict(errors[0]["error"], config=errors[0]["config"])
    said: list[str] = []
    for c in checks:
        said += [w for w in c["warnings"] if w not in said]
    result["warnings"] = said


# -- the driver --------------------------------------------------------------------------------


def run_one(entry: Any, timeout: float) -> dict[str, Any]:
    if entry.needs and importlib.util.find_spec(entry.needs) is None:
        return {
            "name": entry.name,
            "family": entry.family,
            "status": "skipped",
            "note": f"needs {entry.needs}",
        }
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        out = Path(tmp) / "result.json"
        log = Path(tmp) / "stderr.txt"
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TRANSFORMERS_VERBOSITY="error",
            PYTHONWARNINGS="ignore",
        )
        t0 = time.perf_counter()
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", entry.name, "--out", str(out)],
                stdout=err,
                stderr=err,
                env=env,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {
                    "name": entry.name,
                    "family": entry.family,
                    "status": "timeout",
                    "seconds": round(time.perf_counter() - t0, 1),
                    "note": f"no result after {timeout:.0f} s",
                }
        if out.exists():
            result = json.loads(out.read_text())
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            return result
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        return {
            "name": entry.name,
            "family": entry.family,
            "status": "crash",
            "seconds": round(time.perf_counter() - t0, 1),
            "note": f"exit {proc.returncode}: " + " | ".join(tail)[-400:],
        }


def fmt(e: float | None) -> str:
    if e is None:
        return "-"
    if math.isinf(e):
        return "inf"
    return "0" if e == 0 else f"{e:.1e}"


def note_of(r: dict[str, Any]) -> str:
    if r.get("note"):
        return r["note"]
    if r["status"] in ("MISMATCH", "warned"):
        text = "; ".join(r.get("differences", [])[:2])
        if r["status"] == "warned":
            text += " | warned: " + "; ".join(r["warnings"])[:150]
        return text
    if "error" in r:
        e = r["error"]
        fix = r.get("remedy")
        said = f"[{e.get('config', '')} {e['step']}] {e.get('original') or e['line']}"
        return said if fix is None else f"(chunks=2: {fix['status']}) {said}"
    return ""


def table(results: list[dict[str, Any]], width: int = 140) -> str:
    head = (
        f"{'model':38} {'family':11} {'status':9} {'out err':>8} {'grad ag':>8} "
        f"{'grad pl':>8} {'plan s 4/2':>11} {'stages':>7} {'s':>6}  note"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        plan = r.get("plan_s") or {}
        stages = r.get("stages") or {}
        p = "/".join(
            f"{plan.get(k):.1f}" if plan.get(k) is not None else "-"
            for k in ("4dev", "2dev-pipelined")
        )
        s = "/".join(str(stages.get(k) or "-") for k in ("4dev", "2dev-pipelined"))
        rows.append(
            f"{r['name']:38} {r['family']:11} {r['status']:9} {fmt(r.get('out_err')):>8} "
            f"{fmt(r.get('grad_autograd')):>8} {fmt(r.get('grad_pipelined')):>8} {p:>11} "
            f"{s:>7} {r.get('seconds', 0) or 0:6.1f}  {note_of(r)[: max(40, width - 70)]}"
        )
    return "\n".join(rows)


def totals(results: list[dict[str, Any]]) -> dict[str, int]:
    count: dict[str, int] = {}
    for r in results:
        count[r["status"]] = count.get(r["status"], 0) + 1
    return count


def markdown(data: dict[str, Any]) -> str:
    """The results as docs/zoo.md's tables: every row, then every row that is not ok."""
    meta, results = data["meta"], data["results"]
    out = [
        f"- date {meta['date']}, commit `{meta['commit']}`"
        f"{' (uncommitted changes in the working tree)' if meta.get('dirty') else ''}, "
        f"Python {meta['python']}, torch {meta['torch']}"
        + "".join(
            f", {lib} {meta[lib]}"
            for lib in ("torchvision", "timm", "transformers")
            if lib in meta
        ),
        f"- command: `benchmarks/zoo.py {' '.join(meta['argv'])}`".replace(" `", " `", 1),
        f"- {len(results)} models in {meta.get('seconds', 0) / 60:.0f} min: "
        + ", ".join(f"{k} {v}" for k, v in sorted(totals(results).items())),
        "",
        "| model | family | status | out err | grad err (autograd) | grad err (pipelined) "
        "| plan s (4 dev / 2 dev) | stages | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        plan, stages = r.get("plan_s") or {}, r.get("stages") or {}
        p = " / ".join(
            f"{plan[k]:.1f}" if plan.get(k) is not None else "-"
            for k in ("4dev", "2dev-pipelined")
        )
        st = "/".join(str(stages.get(k) or "-") for k in ("4dev", "2dev-pipelined"))
        status = f"**{r['status']}**" if r["status"] == "MISMATCH" else r["status"]
        if r.get("rerun_of"):  # a row run again (docs/zoo.md says why)
            status += f" (re-run; first: {r['rerun_of']})"
        out.append(
            f"| {r['name']} | {r['family']} | {status} | {fmt(r.get('out_err'))} "
            f"| {fmt(r.get('grad_autograd'))} | {fmt(r.get('grad_pipelined'))} | {p} | {st} "
            f"| {r.get('seconds', 0) or 0:.0f} |"
        )
    out += ["", "| model | status | first line |", "|---|---|---|"]
    for r in results:
        if r["status"] not in ("ok", "skipped"):
            out.append(f"| {r['name']} | {r['status']} | {note_of(r).replace('|', '/')[:240]} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="NAME[,NAME]: run these entries only")
    parser.add_argument("--quick", action="store_true", help="a CI-sized subset (10 models)")
    parser.add_argument("--json", default="/tmp/zoo.json", help="where the results go")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a row is silently wrong (MISMATCH), crashed, or failed unclearly (CI)",
    )
    parser.add_argument("--markdown", metavar="JSON", help="print a JSON's results as markdown")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.out)
        return
    if opts.markdown:
        print(markdown(json.loads(Path(opts.markdown).read_text())))
        return

    from benchmarks.zoo_models import BY_NAME, ENTRIES, QUICK

    if opts.list:
        for e in ENTRIES:
            print(f"{e.name:40} {e.family:12} {e.expect}")
        return
    if opts.only:
        names = [n.strip() for n in opts.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            parser.error(f"unknown entries: {', '.join(unknown)} (see --list)")
        chosen = [BY_NAME[n] for n in names]
    elif opts.quick:
        chosen = [BY_NAME[n] for n in QUICK]
    else:
        chosen = list(ENTRIES)
    import torch

    meta = {
        "date": datetime.date.today().isoformat(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "argv": sys.argv[1:],
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": git("status", "--short") != "",
    }
    for lib in ("torchvision", "timm", "transformers"):
        if importlib.util.find_spec(lib) is not None:
            meta[lib] = importlib.import_module(lib).__version__
    print(" ".join(f"{k}={v}" for k, v in meta.items() if k != "argv"), flush=True)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, entry in enumerate(chosen, 1):
        r = run_one(entry, opts.timeout)
        r["expect"] = entry.expect
        results.append(r)
        print(
            f"[{i}/{len(chosen)}] {r['name']}: {r['status']} ({r.get('seconds', 0)} s) "
            f"{note_of(r)[:160]}",
            flush=True,
        )
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        Path(opts.json).write_text(
            json.dumps(
                {"meta": meta, "totals": totals(results), "results": results},
                indent=1,
                default=str,
            )
        )
    print()
    print(table(results))
    print()
    print(
        "totals:",
        ", ".join(f"{k} {v}" for k, v in sorted(totals(results).items())),
        f"({meta['seconds']:.0f} s); JSON: {opts.json}",
    )
    bad = [r["name"] for r in results if r["status"] in STRICT_FAILURES]
    if opts.strict and bad:
        print(f"zoo --strict: {len(bad)} row(s) failed: {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)


#: what --strict refuses: a wrong number without an error, a crash, an error not raised on purpose
STRICT_FAILURES = ("MISMATCH", "crash", "unclear", "zoo-bug")


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(LIB), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    main()
