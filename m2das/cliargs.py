"""The command-line parser every m2das command shares: one-line errors, exit 2, and flags that
take both spellings (--stats_files and --stats-files). Torch- and numpy-free (login nodes)."""

import argparse
import re


class Parser(argparse.ArgumentParser):
    """Errors as one line naming the flag and where to look, exit 2 (EXIT_BAD_INPUT)."""

    def error(self, message):
        from m2das.runfolder import EXIT_BAD_INPUT

        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def add_flag(self, name: str, *more, **kw):
        """`name` as written, and also with its hyphens and underscores swapped after the leading
        `--`: train's flags are the paper's underscores, prepare's and pack's read as hyphens."""
        body = name[2:]
        other = "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
        return self.add_argument(name, *more, *([other] if other != name else []), **kw)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not already say its default, and never
    "(default: None)": a flag whose help spells "(default DATA_PATH/...)" would show it twice."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None:
            return re.sub(r"\s*\(default: %\(default\)s\)", "", text)
        if re.search(r"\(default\b|\bdefault:", text):
            return text
        return super()._get_help_string(action)
