"""The simulated GPU's pieces a bench (or a test) needs: install the plugin, the workload, the figures.

``install`` puts ``bench/gpu_sim_nodes.py`` into ``DIR/custom_nodes`` and the
checkpoints it loads into ``DIR/models/checkpoints`` (empty files: only their
names matter); ``plan`` draws the mixed workload; ``task_graph`` is one task;
``read_records`` reads what every instance process recorded in ``DIR/gpu_sim``;
``figures`` turns records into what issue 16 asks for: idle gap between
back-to-back tasks on an instance, model loads vs the minimum possible,
makespan vs ideal, GPU-busy fraction, per-client completion spread.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.support import pct

NODES = Path(__file__).resolve().parent / "gpu_sim_nodes.py"
PLUGIN_NAME = "gpu_sim.py"
RECORDS_DIR = "gpu_sim"
WARMUP_CKPT = "sim_warmup.safetensors"


@dataclass(frozen=True)
class Task:
    """One task of the workload: its client, its label (unique, recorded by the sampler), its checkpoint."""

    client: str
    label: str
    ckpt: str


@dataclass(frozen=True)
class Costs:
    """What the simulated GPU charges: ``load_s`` per checkpoint load, ``steps * step_s`` per task."""

    load_s: float
    steps: int
    step_s: float

    @property
    def sample_s(self) -> float:
        return self.steps * self.step_s


def checkpoint_names(count: int) -> list[str]:
    return [f"sim_{chr(ord('a') + i)}.safetensors" if i < 26 else f"sim_{i}.safetensors" for i in range(count)]


def install(data_dir: Path, checkpoints: list[str]) -> None:
    """The plugin into ``DIR/custom_nodes``, the checkpoints (and the warm-up one) into ``models/checkpoints``."""
    custom_nodes = data_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(NODES, custom_nodes / PLUGIN_NAME)
    folder = data_dir / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [*checkpoints, WARMUP_CKPT]:
        (folder / name).touch()


def plan(clients: int, tasks: int, checkpoints: list[str], seed: int) -> list[Task]:
    """Each client's tasks use the checkpoints in equal shares, in a random order (fixed by ``seed``)."""
    rng = random.Random(seed)
    out = []
    for c in range(clients):
        models = [checkpoints[i % len(checkpoints)] for i in range(tasks)]
        rng.shuffle(models)
        out += [Task(f"c{c}", f"c{c}-t{i:03}", ckpt) for i, ckpt in enumerate(models)]
    return out


def task_graph(ckpt: str, label: str, costs: Costs) -> dict[str, Any]:
    """``SimCheckpointLoader -> SimSampler``: one task on the simulated GPU."""
    return {
        "1": {"class_type": "SimCheckpointLoader", "inputs": {"ckpt_name": ckpt, "load_s": costs.load_s}},
        "2": {"class_type": "SimSampler", "inputs": {"model": ["1", 0], "steps": costs.steps,
                                                     "step_s": costs.step_s, "label": label}},
    }


def read_records(data_dir: Path) -> list[dict[str, Any]]:
    """Every task record of every instance process (``DIR/gpu_sim/<pid>.jsonl``); a torn last line is skipped."""
    records = []
    folder = data_dir / RECORDS_DIR
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # being written right now
    return records


@dataclass
class Figures:
    """One run's figures (times in seconds unless the name says ms)."""

    tasks: int
    instances: int
    instances_used: int
    gaps_ms: list[float]
    loads: int
    min_loads: int
    makespan_s: float
    ideal_s: float
    busy_s: float
    load_busy_s: float
    client_done_s: dict[str, float]
    runs_per_label: dict[str, int] = field(default_factory=dict)

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / (self.instances * self.makespan_s) if self.makespan_s > 0 else 0.0

    @property
    def loading_fraction(self) -> float:
        return self.load_busy_s / (self.instances * self.makespan_s) if self.makespan_s > 0 else 0.0

    @property
    def spread(self) -> float:
        done = list(self.client_done_s.values())
        return max(done) / min(done) if done and min(done) > 0 else float("nan")

    @property
    def missing(self) -> list[str]:
        return sorted(label for label, runs in self.runs_per_label.items() if runs == 0)

    @property
    def repeated(self) -> list[str]:
        return sorted(label for label, runs in self.runs_per_label.items() if runs > 1)

    def lines(self, goals: bool = True) -> list[str]:
        """The figures as printed lines."""
        def goal(text: str) -> str:
            return f" (goal {text})" if goals else ""

        g = self.gaps_ms
        gap = (f"p50 {statistics.median(g):.3f} ms, p99 {pct(g, 0.99):.3f} ms, max {max(g):.3f} ms over {len(g)} gaps"
               if g else "no back-to-back tasks")
        done = self.client_done_s
        return [
            f"idle gap between back-to-back tasks on an instance: {gap}{goal('p50 < 1 ms, p99 < 5 ms')}",
            f"model loads: {self.loads}, minimum possible {self.min_loads}: "
            f"{self.loads / max(self.min_loads, 1):.2f}x the minimum{goal('<= 1.3x')}",
            f"makespan: {self.makespan_s:.2f} s, {self.makespan_s / max(self.ideal_s, 1e-9):.2f}x the ideal "
            f"{self.ideal_s:.2f} s "
            f"(all sampling plus the minimum loads, packed on {self.instances} instances)",
            f"GPU busy: {self.busy_fraction * 100:.1f}% of instances x makespan{goal('>= 90%')}: loading "
            f"{self.loading_fraction * 100:.1f}%, sampling {(self.busy_fraction - self.loading_fraction) * 100:.1f}%; "
            f"{self.instances_used} of {self.instances} instances ran tasks",
            "per-client completion: " + ", ".join(f"{c} {t:.2f} s" for c, t in sorted(done.items()))
            + f", spread max/min {self.spread:.3f}{goal('<= 1.15 in the cluster')}",
            f"runs: {self.tasks} tasks, {len(self.missing)} never ran, {len(self.repeated)} ran more than once",
        ]


def figures(records: list[dict[str, Any]], tasks: list[Task], accepted_us: dict[str, int], start_us: int,
            instances: int) -> Figures:
    """The figures of the ``tasks`` run, all submitted from ``start_us`` on.

    A gap counts as back-to-back when the next task on that instance had been
    accepted (``accepted_us[label]``, the client's clock after the submitting
    call returned: the same machine's ``time.time()``) before the previous one
    ended: it was waiting while the instance sat idle.
    """
    labels = {task.label: task for task in tasks}
    ours = [r for r in records if r["label"] in labels]
    runs = Counter(r["label"] for r in ours)
    by_instance: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in ours:
        by_instance[record["pid"]].append(record)
    gaps = []
    for runs_on_instance in by_instance.values():
        runs_on_instance.sort(key=lambda r: r["start_us"])
        for prev, nxt in zip(runs_on_instance, runs_on_instance[1:], strict=False):
            if accepted_us.get(nxt["label"], nxt["start_us"]) <= prev["end_us"]:
                gaps.append((nxt["start_us"] - prev["end_us"]) / 1000)
    end_us = max((r["end_us"] for r in ours), default=start_us)
    done: dict[str, float] = {}
    for record in ours:
        client = labels[record["label"]].client
        done[client] = max(done.get(client, 0.0), (record["end_us"] - start_us) / 1e6)
    ckpts = {task.ckpt for task in tasks}
    min_loads = max(len(ckpts), min(instances, len(tasks)))
    load_s = max((r["load_s"] for r in ours), default=0.0)
    sampling_s = sum(r["steps"] * r["step_s"] for r in ours)
    return Figures(
        tasks=len(tasks), instances=instances, instances_used=len(by_instance), gaps_ms=gaps,
        loads=sum(1 for r in ours if r["loaded"]), min_loads=min_loads,
        makespan_s=(end_us - start_us) / 1e6, ideal_s=(sampling_s + min_loads * load_s) / instances,
        busy_s=sum(r["end_us"] - r["start_us"] for r in ours) / 1e6,
        load_busy_s=sum(r["load_end_us"] - r["start_us"] for r in ours if r["loaded"]) / 1e6,
        client_done_s=done, runs_per_label={label: runs.get(label, 0) for label in labels},
    )
