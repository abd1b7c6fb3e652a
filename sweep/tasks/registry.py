"""Task registry: the one place to add a task. Generators are imported only when data is made."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskEntry:
    generator: str  # "module:function" returning sweep.tasks.retrieval.Splits
    summary: str


TASKS: dict[str, TaskEntry] = {
    "art": TaskEntry("sweep.tasks.retrieval:make_art_splits", "associative retrieval (Ba et al. 2016)"),
    "mart": TaskEntry(
        "sweep.tasks.retrieval:make_mart_splits", "modified ART: keys, then values (Keller et al.)"
    ),
}


def task_names() -> list[str]:
    return sorted(TASKS)
