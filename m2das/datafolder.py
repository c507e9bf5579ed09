"""The data-folder contract: the names of what `m2das prepare` and `m2das pack` write, and the
trainer, the monitor, `m2das eval` and the demo read.

Every module takes these names from here, so a file is renamed in one place. A
data folder and a run folder both hold the normalisation statistics under one
name; the run-folder contract names it and this one takes it from there.
Torch- and numpy-free: `python -m m2das.datafolder NAME` answers shell scripts.

    DATA/
      audioset_lms/<relative path of the audio>.npy   LMS files, float32 [1, 80, T]
      lms_recipe.json        how the LMS were made (also pinned in a run folder)
      files_audioset.csv     every LMS file that exists and loads (file_name)
      files_as_weighted.csv  the training list: file_name,label,weight
      files_as_eval.csv      AudioSet's eval segments among them: the monitor's list
      norm_stats.json        normalisation mean/std
      prepare_failures.csv   files that could not be converted, and why
      metadata/              AudioSet's lists, downloaded when not given
      packed/                `m2das pack`'s default output (its own names: m2das/data/packed.py)
"""

import sys

from m2das.runfolder import NORM_STATS, print_fact

LMS_DIR = "audioset_lms"
RECIPE_FILE = "lms_recipe.json"
FILE_LIST = "files_audioset.csv"
WEIGHTED_LIST = "files_as_weighted.csv"
EVAL_LIST = "files_as_eval.csv"
FAILURES = "prepare_failures.csv"
METADATA_DIR = "metadata"
PACKED_DIR = "packed"
PREPARE_LOCK = ".prepare.lock"  # one `m2das prepare` per data folder

NAMES = (LMS_DIR, RECIPE_FILE, FILE_LIST, WEIGHTED_LIST, EVAL_LIST, NORM_STATS, FAILURES, METADATA_DIR,
         PACKED_DIR, PREPARE_LOCK)


def main(argv=None) -> int:
    """`python -m m2das.datafolder NAME`: a data-folder fact for shell scripts (e.g. WEIGHTED_LIST)."""
    return print_fact(globals(), "m2das.datafolder", "WEIGHTED_LIST", argv)


if __name__ == "__main__":
    sys.exit(main())
