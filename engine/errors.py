"""The one exception type for user mistakes, and the guard that turns it into exit status 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (recipe, CSV, command line): reported in one line, exit 2."""


class TrainingError(Exception):
    """A run that cannot go on (non-finite loss, out of memory): one line naming the step, exit 3.
    The last complete checkpoint is left as it was."""


def run_cli(main: Callable[[], int]) -> None:
    """Run `main`, turning a UserError into one line on stderr and exit status 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are UserErrors too: one line and exit 2, like every other mistake."""

    def error(self, message: str):
        raise UserError(f"command line: {message} (see {self.prog} --help)")
