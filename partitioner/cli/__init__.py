"""Command-line interface: ``modelsplit plan | show | run | compare``.

`app` parses the command line and maps errors to exit codes, `commands` holds the four
commands (`run` and `compare` in modules of their own), `common` what they share,
`output` where they write, `render` the tables and pictures of a plan.
"""

from partitioner.cli.app import (
    EXIT_ERROR,
    EXIT_INFEASIBLE,
    EXIT_OK,
    EXIT_USAGE,
    build_parser,
    main,
)

__all__ = ["EXIT_ERROR", "EXIT_INFEASIBLE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
