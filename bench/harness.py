"""Benchmark harness: a record of the machine, interleaved timing, and result writers.

    env = environment(dtype="float32")          # CPU, GPU, versions, threads, git SHA, load average
    result = compare({"a": f, "b": g}, baseline="a", repeats=3)
    write_results("case", env, [Table("title", result.rows())])   # bench/results/case.{md,csv}

`compare` runs the variants round-robin (a b c, b c a, c a b, ...) so that a burst of load from
someone else on a shared machine lands on every variant alike, and reports each variant's min
and median seconds and their ratios to the baseline's min and median (ratio = variant seconds /
baseline seconds: below 1 is faster than the baseline).

A variant may return a dict. Its key "seconds" then replaces the measured wall time (used for
timings extrapolated from a subset, which must say so); other numeric keys are kept as a
breakdown (median over repeats), other keys (strings, bools) as notes from the last run.
"""
from __future__ import annotations

import csv
import gc
import io
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Environment

def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # absent, or broken on this machine
        return "absent"


def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def load_average() -> str:
    """1, 5 and 15 minute load averages, e.g. '3.10 2.50 1.90'."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def environment(dtype: str = "float32") -> dict:
    """What a timing depends on: steer's record of the machine (`steer.core.runtime.environment`:
    CPU, its matrix units, threads, versions) and what a benchmark adds (date, cores this process
    may use, memory, dtype, git SHA, load at the start). `finish(env)` adds the closing load."""
    from steer.core.runtime import environment as machine

    env = machine()
    del env["load_average"]  # a timing records the load at its start and its end instead
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    mem = "unknown"
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **env,
        "cores": cores, "memory": mem, "gpu": env.get("gpu", "none"), "triton": _version("triton"),
        "numpy": _version("numpy"), "sklearn": _version("sklearn"), "dtype": dtype, "git": _git_sha(),
        "load_start": load_average(), "load_end": "",
    }


def bench_model(name: str, quick: bool, device: str = "cpu"):
    """(model, tokenizer, label): `load_model(name)` in fp32 on `device`, or with `quick` the tiny
    random Llama of tests/tiny.py (a dry run of a script, not a measurement)."""
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import tiny_model, tiny_tokenizer

        return tiny_model("llama"), tiny_tokenizer(), "tiny random llama (tests/tiny.py)"
    from steer.engine.models import load_model

    model, tok = load_model(name, device=device, dtype="float32")
    return model, tok, name


def finish(env: dict) -> dict:
    env["load_end"] = load_average()
    return env


# --------------------------------------------------------------------------------------------
# Interleaved comparison

@dataclass
class Variant:
    name: str
    seconds: list[float] = field(default_factory=list)
    breakdown: dict[str, list[float]] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Comparison:
    variants: dict[str, Variant]
    baseline: str
    repeats: int
    order: list[str]  # the names in the order they were timed (warm-up excluded)

    def ratio(self, name: str, stat: str = "min") -> float:
        """Variant seconds / baseline seconds, of the min or the median."""
        v, b = self.variants[name], self.variants[self.baseline]
        return getattr(v, stat) / getattr(b, stat)

    def rows(self, **extra) -> list[dict]:
        """One row per variant: min, median, ratios, breakdown medians, notes (+ `extra` columns)."""
        out = []
        for name, v in self.variants.items():
            row = {**extra, "variant": name, "repeats": len(v.seconds), "min_s": v.min, "median_s": v.median,
                   "ratio_min": self.ratio(name, "min"), "ratio_median": self.ratio(name, "median"),
                   "baseline": self.baseline}
            row.update({k: statistics.median(vals) for k, vals in v.breakdown.items()})
            row.update(v.notes)
            out.append(row)
        return out


def _record(v: Variant, out, wall: float) -> float:
    """Store one timed call's result in `v` (see the module docstring); return its seconds."""
    seconds = wall
    if isinstance(out, Mapping):
        seconds = float(out.get("seconds", wall))
        for key, value in out.items():
            if key == "seconds":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                v.breakdown.setdefault(key, []).append(float(value))
            else:
                v.notes[key] = value
        if "seconds" in out:
            v.breakdown.setdefault("wall_s", []).append(wall)
    v.seconds.append(seconds)
    return seconds


def compare(variants: Mapping[str, Callable[[], object]], baseline: str, repeats: int = 3, warmup: int = 1,
            log: Callable[[str], None] | None = print) -> Comparison:
    """Time every variant `repeats` times, interleaved (round-robin, rotating the start).

    `warmup` untimed rounds run first, also interleaved. gc runs before every call, outside the
    timing.
    """
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {list(variants)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(variants)
    results = {n: Variant(n) for n in names}
    order = []
    gc.collect()
    gc.freeze()  # objects alive now are not scanned again: a gc pass between calls takes ms, not s
    try:
        for r in range(warmup + repeats):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                gc.collect()
                t0 = time.perf_counter()
                out = variants[name]()
                wall = time.perf_counter() - t0
                if r < warmup:
                    if log:
                        log(f"  warm-up {name}: {wall:.2f} s")
                    continue
                order.append(name)
                seconds = _record(results[name], out, wall)
                if log:
                    extra = f" (wall {wall:.2f} s)" if seconds != wall else ""
                    log(f"  [{r - warmup + 1}/{repeats}] {name}: {seconds:.3f} s{extra}  load {load_average()}")
    finally:
        gc.unfreeze()
    return Comparison(results, baseline, repeats, order)


# --------------------------------------------------------------------------------------------
# Writers

@dataclass
class Table:
    title: str
    rows: list[dict]
    columns: Sequence[str] | None = None  # default: union of the rows' keys, in first-seen order
    note: str = ""

    def keys(self) -> list[str]:
        if self.columns is not None:
            return list(self.columns)
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)


def _fmt(x) -> str:
    if isinstance(x, bool) or x is None:
        return "" if x is None else str(x)
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x).replace("|", "/").replace("\n", " ")


def markdown(title: str, env: Mapping, tables: Sequence[Table], notes: str = "") -> str:
    out = [f"# {title}", ""]
    if notes:
        out += [notes.strip(), ""]
    for t in tables:
        out += [f"## {t.title}", ""]
        if t.note:
            out += [t.note.strip(), ""]
        keys = t.keys()
        out.append("| " + " | ".join(keys) + " |")
        out.append("|" + "---|" * len(keys))
        for row in t.rows:
            out.append("| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |")
        out.append("")
    out += ["## Environment", "", "| key | value |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in env.items()]
    out += ["", f"Command: `{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`", ""]
    return "\n".join(out)


def csv_text(env: Mapping, tables: Sequence[Table]) -> str:
    """One row per table row: `table`, the union of all tables' columns, then `env_*` columns."""
    keys: dict[str, None] = {}
    for t in tables:
        keys.update(dict.fromkeys(t.keys()))
    header = ["table", *keys, *(f"env_{k}" for k in env)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for t in tables:
        for row in t.rows:
            w.writerow([t.title, *(_csv_value(row.get(k, "")) for k in keys), *env.values()])
    return buf.getvalue()


def _csv_value(x):
    return repr(x) if isinstance(x, float) else x


def write_results(case: str, env: Mapping, tables: Sequence[Table], title: str | None = None, notes: str = "",
                  out_dir: Path | str = RESULTS) -> tuple[Path, Path]:
    """Write `<case>.md` and `<case>.csv` under `out_dir` (overwritten); return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, cs = out_dir / f"{case}.md", out_dir / f"{case}.csv"
    md.write_text(markdown(title or case, env, tables, notes))
    cs.write_text(csv_text(env, tables))
    return md, cs
