"""What a run learned: its plots as PNGs, and one self-contained HTML report.

:func:`plot_run` writes the interpretation plots of a run folder (``train``) or of
each fold of a cross-validation folder (``cv``) next to the run's CSVs;
:func:`write_report` writes ``report.html``, a single file with every image and the
top-loss clips' audio embedded as data URIs (it fetches nothing), plus the run's
config, metrics tables and most-confused pairs. :func:`run_figures` gives the same
plots as matplotlib figures, for notebooks.

One job per module: :mod:`~soundsight.report.run` reads a run or ``cv`` folder,
:mod:`~soundsight.report.plotting` makes and saves the figures,
:mod:`~soundsight.report.html` renders the page (template
``soundsight/templates/report.html``), :mod:`~soundsight.report.inference` runs the
model for the embeddings, and :mod:`~soundsight.report.files` writes files whole.

Files written into a run folder::

    history.png          train/valid loss and error per epoch, both stages
    lr_schedule.png      one-cycle learning rates per step (see below)
    confusion.png        row-normalised confusion matrix, sorted by recall
    per_class.png        precision / recall / F1 per class
    top_losses.png       the worst validation clips: spectrogram, labels, p, loss
    top_losses.csv       the same clips as data
    tsne.png             t-SNE of penultimate embeddings, coloured by label
    tsne_thumbnails.png  spectrogram thumbnails at the t-SNE positions
    tsne.csv             path, label, x, y
    plots.json           what was plotted, from which inputs (to skip redoing it)
    report.html          (write_report)

``lr_find.png`` is training's own (``--lr auto``); when ``lr_find.csv`` (columns
``lr``, ``loss``, and the suggestion in ``suggestion``) is present it is redrawn with
:func:`soundsight.plots.plot_lr_find`.

The learning-rate schedule is reconstructed, not recorded: it is deterministic given
the recipe in the model file (peak rates after any LR finder, epochs per stage) and
the number of optimiser steps per epoch, which is read from the stage's Lightning
checkpoint (its OneCycleLR state holds ``total_steps``). Without checkpoints the
steps per epoch are unknown; the curve is then drawn with 100 steps per epoch, which
is the same shape on the epoch axis (one-cycle phases are fractions of the stage).
"""

from .html import audio_uri, write_report
from .inference import LogMels, clip_embeddings, idle_threads
from .plotting import (
    RUN_PLOTS,
    TOP_LOSSES,
    batch_figure,
    figures,
    plot_run,
    plots_are_current,
    run_figures,
    show_batch,
)
from .run import (
    CVData,
    RunData,
    cv_folds,
    is_cv_folder,
    steps_per_epoch_from_checkpoints,
)

__all__ = [
    "RUN_PLOTS",
    "TOP_LOSSES",
    "CVData",
    "LogMels",
    "RunData",
    "audio_uri",
    "batch_figure",
    "clip_embeddings",
    "cv_folds",
    "figures",
    "idle_threads",
    "is_cv_folder",
    "plot_run",
    "plots_are_current",
    "run_figures",
    "show_batch",
    "steps_per_epoch_from_checkpoints",
    "write_report",
]
