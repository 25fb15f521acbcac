"""Where the CLI writes: results to stdout, notes and progress to stderr."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console

__all__ = ["Output"]


class Output:
    """Where the CLI writes: results to stdout, notes and progress to stderr."""

    def __init__(self, quiet: bool = False, as_json: bool = False) -> None:
        self.quiet = quiet
        self.as_json = as_json
        tty = sys.stdout.isatty()
        self.console = Console(file=sys.stdout, width=None if tty else 120, soft_wrap=False)
        self.err = Console(file=sys.stderr, width=None if sys.stderr.isatty() else 120)

    def show(self, renderable: Any) -> None:
        """A table or text for people (not with --quiet or --json)."""
        if not self.quiet and not self.as_json:
            self.console.print(renderable)

    def raw(self, text: str) -> None:
        """Text printed as it is (DOT, plan JSON), even with --quiet."""
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()

    def data(self, obj: Any) -> None:
        """The command's result for scripts (only with --json)."""
        if self.as_json:
            self.raw(json.dumps(obj, indent=2, default=str))

    def note(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message, markup=False, highlight=False)

    @contextlib.contextmanager
    def progress(self, total: int) -> Iterator[Callable[..., None]]:
        """``step(description)`` moves a progress bar on a TTY; elsewhere it logs.

        ``step(description, hand_over=True)`` hides the bar until the next step, for a
        phase that draws its own (profiling shows one per node on a TTY).
        """
        if self.quiet or self.as_json or not sys.stderr.isatty():
            yield lambda description, hand_over=False: logging.getLogger(__name__).info(
                "%s", description
            )
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task("starting", total=total)
            state = {"first": True, "hidden": False}

            def step(description: str, hand_over: bool = False) -> None:
                if state["hidden"]:
                    bar.start()
                if not state["first"]:
                    bar.advance(task)
                state["first"] = False
                bar.update(task, description=description)
                if hand_over:
                    bar.stop()
                state["hidden"] = hand_over

            yield step
