"""How long each notebook takes to run top to bottom, recorded in one file, and every text that quotes a run time
rendered from it (issue 23): the README's syllabus column, each lesson's intro and each exercise's intro.

    python tools/run_times.py                # measure every lesson, solved exercise and its grading; write; render
    python tools/run_times.py --only 05,11   # measure those numbers only (the file keeps the other entries)
    python tools/run_times.py --kind exercises   # only the solved exercises and their grading (or: --kind lessons)
    python tools/run_times.py --render       # rewrite the texts from the file, measuring nothing
    python tools/run_times.py --check        # fail if a text disagrees with the file (tests/test_run_times.py)

A lesson's time is the wall time of ``python -m pytest --nbval-lax --nbval-current-env notebooks/NN_*.ipynb``, kernel
start included, as ``bash course.sh lessons`` runs it; an exercise's is the same over its solved notebook
(solutions/NN_*.ipynb), and its grading time that of ``python -m course_lib.grade --require-full solutions/NN_*.ipynb``.
The file (benchmarks/results/run_times_<cpu>-<n>-cores.json) records the CPU, its cores, and for each run the date,
commit, versions and the 1-minute load average before and after; each entry names its run, and a run not measured by
this script says where its numbers come from ("source"). A text quotes a time between markers, which this script
rewrites: ``<!-- run-time -->about 14 s on a 2-core CPU<!-- /run-time -->`` in a notebook's markdown (the number is
the notebook's: notebooks/ -> "lessons", solutions/ and exercises/ -> "exercises"), ``<!-- run-time:NN -->`` in the
README's table and ``<!-- run-time:source -->`` for the README's sentence saying where the column comes from.
Markdown may quote no other run time (quoted_times; tests/test_no_typed_numbers.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: the file the texts quote: the course's reference machine, the 2-core CPU its README names
REFERENCE = RESULTS / "run_times_cpu-intel-r-xeon-r-processor-2-cores.json"
FOLDERS = {"notebooks": "lessons", "solutions": "exercises", "exercises": "exercises"}
MARK = re.compile(r"<!-- run-time(?::(?P<key>[\w-]+))? -->(?P<text>.*?)<!-- /run-time -->")
#: a quoted run time: "about 35 s", "~14 s", "in 2 minutes", "about a minute" (not "every 0.3 s" nor "12 ms")
QUOTED = re.compile(r"(?:\babout|~|\bunder|\bin|\btakes|\bwithin)\s*"
                    r"(?:\d+(?:\.\d+)?\s*|(?:an?|one|a few|several|two)\s+)"
                    r"(?:s|secs?|seconds?|mins?|minutes?|hours?)\b", re.IGNORECASE)
OTHERS_BUSY = 0.25   # cores that other processes used, on average, above which a measurement is called loaded
METHOD = ("wall time of `python -m pytest -q --nbval-lax --nbval-current-env <notebook>` (kernel start included), "
          "one notebook at a time; an exercise: its solved notebook (solutions/), and `python -m course_lib.grade "
          "--require-full <solution>` (grade_seconds). other_cpu_cores: the cores other processes kept busy meanwhile "
          "(the CPU time, from /proc, of the processes already running when the command started, so never the "
          "command's own kernel or workers; grade_other_cpu_cores: the same "
          f"during grading); loaded: above {OTHERS_BUSY} during the notebook or its grading")


# ---- rendering ---------------------------------------------------------------------------------------------------

def _busy(entry: dict, words: str) -> str:
    return words if entry.get("loaded") else ""


def intro(record: dict, kind: str, number: str) -> str:
    """The phrase a notebook's intro quotes between its markers."""
    entry = record.get(kind, {}).get(number)
    if entry is None:
        return f"a time not measured yet (`python tools/run_times.py --only {number}`)"
    text = f"about {entry['seconds']:.0f} s on a {record['cores']}-core CPU{_busy(entry, ' busy with other work')}"
    if kind == "exercises":
        text += f", and grades in about {entry['grade_seconds']:.0f} s"
    return text


def _spans(numbers: list[str]) -> str:
    """['00', '01', '02', '05'] -> '00-02, 05'."""
    runs: list[list[str]] = []
    for n in numbers:
        if runs and int(n) == int(runs[-1][-1]) + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(r[0] if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def readme_cell(record: dict, key: str) -> str:
    """The README's phrase for a marker: a lesson's column cell ("NN") or the sentence on its source ("source")."""
    if key != "source":
        entry = record["lessons"].get(key)
        return f"~{entry['seconds']:.0f} s{_busy(entry, ' (busy CPU)')}" if entry else "not measured"
    groups: dict[str, list[str]] = {}
    for number, entry in sorted(record["lessons"].items()):
        groups.setdefault(entry["run"], []).append(number)
    parts = []
    for run_id, numbers in groups.items():
        run = record["runs"][run_id]
        loaded = any(record["lessons"][n].get("loaded") for n in numbers)   # these entries, not the whole run's
        how = (f"measured by the script, {run['date'][:10]}, {'loaded' if loaded else 'unloaded'}"
               if run["measured_by_script"] else f"carried over from the {run['source']}")
        parts.append(f"{_spans(numbers)}: {how}")
    name = REFERENCE.relative_to(ROOT).as_posix()
    return f"`python tools/run_times.py` records them in `{name}`; lessons " + "; ".join(parts)


def target(path: Path) -> tuple[str, str] | None:
    """(kind, number) whose time a notebook quotes; None for the README."""
    kind = FOLDERS.get(path.parent.name)
    return (kind, path.name[:2]) if kind and path.suffix == ".ipynb" else None


def rendered(text: str, record: dict, where: tuple[str, str] | None) -> str:
    """text with every marker's phrase rewritten from record (JSON-escaped inside a notebook's file)."""
    def phrase(m: re.Match) -> str:
        key = m["key"]
        if where is None:
            new = readme_cell(record, key)
        else:
            new = json.dumps(intro(record, *where), ensure_ascii=False)[1:-1]
        return f"<!-- run-time{':' + key if key else ''} -->{new}<!-- /run-time -->"
    return MARK.sub(phrase, text)


def texts(root: Path = ROOT) -> list[Path]:
    return [root / "README.md"] + [p for folder in FOLDERS for p in sorted((root / folder).glob("[0-9][0-9]_*.ipynb"))]


def changes(record: dict, root: Path = ROOT) -> dict[Path, str]:
    """{path: its new text} for every text whose quoted times disagree with record."""
    out = {}
    for path in texts(root):
        text = path.read_text(encoding="utf-8")
        new = rendered(text, record, target(path))
        if new != text:
            out[path] = new
    return out


def quoted_times(markdown: str) -> list[str]:
    """The run times a piece of markdown quotes outside the run-time markers."""
    return [m.group(0) for m in QUOTED.finditer(MARK.sub("", markdown))]


def stray_quotes(root: Path = ROOT) -> list[str]:
    """'path cell id: quote' for every notebook markdown quoting a run time that does not come from the file."""
    out = []
    for path in texts(root)[1:]:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                out += [f"{path.relative_to(root)} cell {cell.get('id')}: {q!r}" for q in quoted_times(cell.source)]
    return out


def problems(record: dict, root: Path = ROOT) -> list[str]:
    """Why the texts disagree with record (nothing: they agree)."""
    readme = (root / "README.md").read_text(encoding="utf-8")
    missing = [n for n in record["lessons"] if f"<!-- run-time:{n} -->" not in readme]
    return ([f"{p.relative_to(root)}: a quoted run time differs from the file" for p in changes(record, root)]
            + [f"README.md: no <!-- run-time:{n} --> marker in the syllabus" for n in missing]
            + [f"{q} (quote it between run-time markers, or not at all)" for q in stray_quotes(root)])


# ---- measuring ---------------------------------------------------------------------------------------------------

def _process_ticks() -> dict[int, int] | None:
    """CPU time (user + system, clock ticks) of every process on this machine (Linux /proc), None elsewhere."""
    if not Path("/proc/stat").exists():
        return None
    ticks = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:                                  # the process ended meanwhile
                continue
            ticks[int(entry.name)] = int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15 of stat)
    return ticks


def _others_cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds used between the two snapshots by the processes that were already running before (not this one):
    the load the measurement shared the machine with. Processes the command started are new, so however they are
    reaped (a Jupyter kernel, torch.distributed workers) they never count as others."""
    me = os.getpid()
    return sum(after[p] - t for p, t in before.items() if p in after and p != me) / os.sysconf("SC_CLK_TCK")


def timed(command: list[str]) -> dict:
    """Run command in the repository; its wall time, the 1-minute load average before and after, and the cores other
    processes kept busy meanwhile (all CPU time used minus this command's own). Raises if the command fails."""
    load_before, ticks_before = os.getloadavg()[0], _process_ticks()
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    ticks_after = _process_ticks()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    out = dict(seconds=round(seconds, 1), load_1min_before=round(load_before, 2),
               load_1min_after=round(os.getloadavg()[0], 2))
    if ticks_before is not None and ticks_after is not None:
        out["other_cpu_cores"] = round(_others_cpu_seconds(ticks_before, ticks_after) / seconds, 2)
        out["loaded"] = out["other_cpu_cores"] > OTHERS_BUSY
    return out


NBVAL = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
         "--nbval-kernel-startup-timeout=300"]


def cpu() -> tuple[str, int]:
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model, os.cpu_count() or 1


def measure(numbers: set[str] | None, kinds: set[str], record: dict | None) -> dict:
    """Measure the notebooks of kinds ("lessons", "exercises") whose number is in numbers (all: None) into record (a
    new one: None)."""
    import torch

    from benchmarks.record import git_commit

    model, cores = cpu()
    record = record or dict(benchmark="run_times", cpu_model=model, cores=cores, method=METHOD,
                            runs={}, lessons={}, exercises={})
    if (record["cpu_model"], record["cores"]) != (model, cores):
        raise SystemExit(f"the file is of a {record['cores']}-core {record['cpu_model']}, not of this "
                         f"{cores}-core {model}")
    record["method"] = METHOD
    run_id = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    run = dict(measured_by_script=True, date=run_id, git_commit=git_commit(), python=platform.python_version(),
               torch=torch.__version__, command=" ".join(["python", "tools/run_times.py", *sys.argv[1:]]),
               load_1min_before=round(os.getloadavg()[0], 2))
    record["runs"][run_id] = run
    for folder, kind in (("notebooks", "lessons"), ("solutions", "exercises")):
        for path in sorted((ROOT / folder).glob("[0-9][0-9]_*.ipynb")):
            if kind not in kinds or numbers is not None and path.name[:2] not in numbers:
                continue
            name = path.relative_to(ROOT).as_posix()
            print(f"{name} ...", end=" ", flush=True)
            entry = dict(notebook=name, run=run_id, **timed([*NBVAL, name]))
            if kind == "exercises":
                grade = timed([sys.executable, "-m", "course_lib.grade", "--require-full", name])
                entry.update(grade_seconds=grade["seconds"], grade_other_cpu_cores=grade.get("other_cpu_cores"),
                             loaded=entry.get("loaded") or grade.get("loaded"))
            record[kind][path.name[:2]] = entry
            print(f"{entry['seconds']} s" + (f", grading {entry['grade_seconds']} s" if kind == "exercises" else ""))
    run["load_1min_after"] = round(os.getloadavg()[0], 2)
    entries = [e for kind in ("lessons", "exercises") for e in record[kind].values() if e["run"] == run_id]
    run["loaded"] = any(e.get("loaded") for e in entries)
    used = {e["run"] for kind in ("lessons", "exercises") for e in record[kind].values()}
    record["runs"] = {k: v for k, v in record["runs"].items() if k in used}
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated notebook numbers to measure, e.g. 00,03 (default: all)")
    parser.add_argument("--kind", choices=["lessons", "exercises"], help="measure only these (default: both)")
    parser.add_argument("--render", action="store_true", help="rewrite the texts from the file, measuring nothing")
    parser.add_argument("--check", action="store_true", help="fail if a text disagrees with the file")
    args = parser.parse_args(argv)
    record = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else None
    if args.check:
        found = problems(record) if record else [f"no {REFERENCE.relative_to(ROOT)}"]
        print("\n".join(found + ["run python tools/run_times.py --render"] if found else ["run times agree"]))
        return 1 if found else 0
    if not args.render:
        model, cores = cpu()
        out = RESULTS / f"run_times_{re.sub(r'[^a-z0-9]+', '-', f'cpu {model} {cores} cores'.lower()).strip('-')}.json"
        numbers = set(args.only.split(",")) if args.only else None
        kinds = {args.kind} if args.kind else {"lessons", "exercises"}
        measured = measure(numbers, kinds, json.loads(out.read_text()) if out.exists() else None)
        out.write_text(json.dumps(measured, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
        if out != REFERENCE:
            print(f"the texts quote {REFERENCE.relative_to(ROOT)}, not this machine's file: nothing rendered")
            return 0
        record = measured
    rendered = changes(record)
    for path, text in rendered.items():
        path.write_text(text, encoding="utf-8")
        print(f"rendered {path.relative_to(ROOT)}")
    if rendered:   # the Chinese edition quotes the English cells' times: regenerate it (tools/i18n.py)
        sys.path.insert(0, str(ROOT))
        from tools import i18n

        i18n.main([])
    left = stray_quotes()
    print("\n".join(["run times quoted outside the markers:", *left]) if left else "every quoted run time is rendered")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
