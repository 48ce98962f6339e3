"""Synthetic breast DKI studies (DWI in Siemens/GE/Philips b-value conventions, T2, SEG, truth).

``write_study(out, seed=..., lesion=..., snr=..., vendor=...)`` writes the study and returns its
``StudyManifest``; ``add_arguments`` + ``run`` are ``her2low synth``.
"""

from .phantom import Laterality, LesionType, Phantom, TissueLabel, dki_signal, make_phantom
from .study import (
    DEFAULT_B_VALUES,
    SeriesEntry,
    StudyManifest,
    add_arguments,
    add_subcommand,
    cmd_synth,
    run,
    study_geometry,
    write_study,
)
from .vendors import Vendor

__all__ = [
    "DEFAULT_B_VALUES",
    "Laterality",
    "LesionType",
    "Phantom",
    "SeriesEntry",
    "StudyManifest",
    "TissueLabel",
    "Vendor",
    "add_arguments",
    "add_subcommand",
    "cmd_synth",
    "dki_signal",
    "make_phantom",
    "run",
    "study_geometry",
    "write_study",
]
