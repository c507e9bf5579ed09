"""The command-line parser every m2das command shares: one-line errors, exit 2, and flags that
take both spellings (--stats_files and --stats-files). Torch- and numpy-free (login nodes)."""

import argparse
import re


class Parser(argparse.ArgumentParser):
    """Errors as one line naming the flag and where to look, exit 2 (EXIT_BAD_INPUT)."""

    def error(self, message):
        from m2das.runfolder import EXIT_BAD_INPUT

        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def add_argument(self, *names, **kw):
        """Every long flag also in its other spelling (see both_spellings)."""
        return super().add_argument(*both_spellings(names), **kw)

    add_flag = add_argument  # the name prepare and pack were written with

    def add_argument_group(self, *args, **kw):
        return _spelling_both(super().add_argument_group(*args, **kw))

    def add_mutually_exclusive_group(self, **kw):
        return _spelling_both(super().add_mutually_exclusive_group(**kw))


def both_spellings(names) -> list:
    """The flag names as written, then each long one with hyphens and underscores swapped after the
    leading `--`: train's flags are the paper's underscores, prepare's and pack's read as hyphens,
    and either spelling works with every command."""
    spelled = list(names)
    for name in names:
        if name.startswith("--") and name[2:3].isalnum():
            body = name[2:]
            other = "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
            if other not in spelled:
                spelled.append(other)
    return spelled


def _spelling_both(group):
    add = group.add_argument
    group.add_argument = lambda *names, **kw: add(*both_spellings(names), **kw)
    return group


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
