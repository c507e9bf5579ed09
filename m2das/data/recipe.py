"""The LMS recipe record (DATA/lms_recipe.json, pinned as RUN/lms_recipe.json): how a folder's LMS
were made, so that files of two recipes never mix silently.

`m2das prepare` writes it, plans reconversion when the recipe changed, and the
trainer pins it in the run folder and warns when the data no longer matches. A
folder with LMS files but no record is inferred here, in one place: most such
folders come from the reference's wav_to_lms.py (soxr HQ through librosa, the
paper's recipe, which m2das matches), some from m2das 0.1.0 or older (torchaudio's
resampler). Where the audio is at hand, `m2das prepare` tells them apart by
content; otherwise the paper's recipe is assumed, never the legacy one.
Torch-free at import (the recipe itself comes from m2das.data.audio when needed).
"""

import json
import os
from pathlib import Path

from m2das.datafolder import RECIPE_FILE
from m2das.fileio import write_json

OTHER_RECIPE_OUTPUTS = "other_recipe_outputs"  # outputs known to come from an older recipe
LEGACY_VERSION = "0.1.0 or older"  # the m2das that wrote folders without a record


class RecipeError(ValueError):
    """An unreadable record, or a folder of another recipe that must not be mixed; one line."""


def read_recipe(folder) -> dict | None:
    """The recipe record of a data or run folder, or None when it has none.

    A record that cannot be read raises RecipeError naming the file.
    """
    path = os.path.join(folder, RECIPE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: unreadable LMS recipe record ({e}); delete it and rerun "
                          f"`m2das prepare` to write it again") from None
    if not isinstance(record, dict) or not isinstance(record.get("recipe"), dict):
        raise RecipeError(f"{path}: no 'recipe' object in it; delete it and rerun `m2das prepare`")
    return record


def describe_recipe(recipe: dict) -> str:
    """One line naming what differs most often between recipes: the resampler."""
    return f"{recipe.get('resampler', '?')} {recipe.get('resampler_quality', '?')} resampling"


def installed_version() -> str:
    """m2das's version as installed (pyproject takes it from m2das.__version__, its one home)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("m2das")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def recipe_record(recipe: dict, other_outputs=()) -> dict:
    """What lms_recipe.json holds: the recipe, the versions that made it, and the outputs still
    made with another recipe (listed so that the trainer can warn about them)."""
    import importlib.metadata

    record = {"recipe": recipe, "m2das_version": installed_version(), OTHER_RECIPE_OUTPUTS: sorted(other_outputs)}
    if recipe.get("resampler") == "soxr":
        record["soxr_version"] = importlib.metadata.version("soxr")
    return record


def recorded_recipe(folder, has_lms: bool, resampler: str | None = None) -> dict | None:
    """The folder's record; for a folder with LMS files but no record, the recipe of `resampler`
    (what its content showed), else the paper's: the reference's wav_to_lms.py makes it, and
    such folders are the common case (marked "inferred"). None when it has neither."""
    record = read_recipe(folder)
    if record is None and has_lms:
        from m2das.data.audio import LEGACY_RESAMPLER, RESAMPLER, lms_recipe

        resampler = resampler or RESAMPLER
        record = {"recipe": lms_recipe(resampler),
                  "m2das_version": LEGACY_VERSION if resampler == LEGACY_RESAMPLER else "none (another tool)",
                  OTHER_RECIPE_OUTPUTS: [], "inferred": True}
    return record


def resampler_by_content(jobs, done: set, tries: int = 2) -> str | None:
    """Which resampler made a record-less folder's LMS: a listed 44.1/48 kHz clip is converted with
    both and compared with its stored LMS (the two differ by ~1e-2, the same recipe by <1e-3).
    None when no such clip is at hand."""
    import numpy as np
    import soundfile as sf

    from m2das.data.audio import LEGACY_RESAMPLER, RESAMPLER, SAMPLE_RATE, load_audio, lms_from_waveform

    for job in jobs:
        if job.out_rel not in done:
            continue
        try:
            if sf.info(job.src).samplerate == SAMPLE_RATE:
                continue
            stored = np.load(job.out)
            wave, rate = load_audio(job.src)
            diffs = {r: float(np.abs(lms_from_waveform(wave, rate, resampler=r) - stored).mean())
                     for r in (RESAMPLER, LEGACY_RESAMPLER)}
        except Exception:  # unreadable or another shape: try the next clip
            tries -= 1
            if tries <= 0:
                return None
            continue
        return min(diffs, key=diffs.get)
    return None


# ---------------------------------------------------------------- prepare's side: what to convert again


def _resampled(job) -> bool:
    """Whether the output of `job` went through the resampler (its source is not 16 kHz)."""
    import soundfile as sf

    from m2das.data.audio import SAMPLE_RATE

    try:
        return sf.info(job.src).samplerate != SAMPLE_RATE
    except Exception:  # unreadable now: converting it again records why
        return True


def plan_recipe(jobs, done: set, record: dict | None, data_dir: Path, recipe: dict,
                reconvert: bool, progress: bool) -> tuple[list, set[str]]:
    """(jobs whose existing output is of another recipe and must be converted again, all outputs
    of another recipe). Refuses (RecipeError) a folder of another recipe unless `reconvert`: its
    old files must not mix silently with new ones."""
    from m2das.data.convert import log, progress_bar

    if record is None:
        return [], set()
    old = record["recipe"]
    if old == recipe:
        stale = set(record.get(OTHER_RECIPE_OUTPUTS) or []) & done
        if stale and not reconvert:
            log(f"warning: {len(stale)} LMS files in {data_dir} were made with another recipe "
                f"(listed in {RECIPE_FILE}); rerun with --reconvert to convert them again")
            return [], stale
    else:
        what = (f"{data_dir} holds {len(done)} LMS files made with {describe_recipe(old)} "
                f"(m2das {record.get('m2das_version', '?')}); this m2das makes the paper's LMS "
                f"with {describe_recipe(recipe)}")
        if not reconvert:
            raise RecipeError(f"{what}. Rerun with --reconvert to convert the affected files "
                              f"again (16-kHz inputs are kept as they are), or pass an empty DATA_DIR")
        log(f"{what}: converting the affected files again (--reconvert)")
        resampler_keys = {"resampler", "resampler_quality"}
        only_resampler = ({k: v for k, v in old.items() if k not in resampler_keys}
                          == {k: v for k, v in recipe.items() if k not in resampler_keys})
        candidates = [j for j in jobs if j.out_rel in done]
        with progress_bar(len(candidates), "recipe", progress) as bar:
            stale = set()
            for job in candidates:
                if not only_resampler or _resampled(job):
                    stale.add(job.out_rel)
                bar.update(1)
        stale |= done - {j.out_rel for j in jobs}  # no input here: cannot tell, cannot redo
    redo = [j for j in jobs if j.out_rel in stale]
    orphans = stale - {j.out_rel for j in redo}
    if orphans:
        log(f"warning: {len(orphans)} LMS files of another recipe have no input in this "
            f"AUDIO_DIR (e.g. {sorted(orphans)[0]}); they stay, listed in {RECIPE_FILE}: "
            f"delete them, or rerun with the AUDIO_DIR they came from")
    return (redo if reconvert else []), stale


# ---------------------------------------------------------------- the trainer's side: pin and compare


def recipe_of(data_path) -> dict | None:
    """The record of a data folder, inferred for one that has an LMS folder but no record.
    None for hand-made data (neither). Raises RecipeError when the record is unreadable."""
    from m2das.datafolder import LMS_DIR

    return recorded_recipe(data_path, (Path(data_path) / LMS_DIR).is_dir())


def record_recipe(run_dir, data_path) -> str | None:
    """Pin the data's LMS recipe in the run folder; a one-line warning when the run mixes recipes.

    First start: copies the data folder's record into RUN/lms_recipe.json. Later
    starts: compares the data folder's recipe with the pinned one. The warning
    (None when all is well) names what differs: the data changed recipe since the
    run started, the data folder still holds files of an older recipe, or the data
    is not the paper's recipe. Raises RecipeError when a record is unreadable.
    """
    from m2das.data.audio import lms_recipe

    current = recipe_of(data_path)
    if current is None:
        return None
    pinned_path = Path(run_dir) / RECIPE_FILE
    pinned = read_recipe(run_dir)
    if pinned is None:
        write_json(pinned_path, current)
        pinned = current
    warnings = []
    if pinned["recipe"] != current["recipe"]:
        warnings.append(f"this run started on LMS made with {describe_recipe(pinned['recipe'])} "
                        f"({pinned_path}), but {data_path} now holds {describe_recipe(current['recipe'])}: "
                        f"the run mixes recipes; start a new run folder to train on one recipe")
    others = current.get(OTHER_RECIPE_OUTPUTS) or []
    if others:
        warnings.append(f"{len(others)} LMS files in {data_path} were made with another recipe (e.g. "
                        f"{others[0]}); rerun `m2das prepare --reconvert` on it")
    if not warnings and current.get("inferred") and current["recipe"] != lms_recipe():
        warnings.append(f"{data_path} has no {RECIPE_FILE}: its LMS were made by another tool or before "
                        f"m2das recorded recipes ({describe_recipe(current['recipe'])}, not the paper's "
                        f"{describe_recipe(lms_recipe())}); `m2das prepare --reconvert` brings it up to date")
    elif not warnings and current["recipe"] != lms_recipe():
        warnings.append(f"{data_path} holds LMS made with {describe_recipe(current['recipe'])}, not the "
                        f"paper's {describe_recipe(lms_recipe())}; `m2das prepare --reconvert` converts it")
    return "; ".join(warnings) or None
