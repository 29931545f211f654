"""Quiet loading of transformers models for the CLI: no weight-loading progress bars or notices on stderr."""

from contextlib import contextmanager


@contextmanager
def quiet_transformers():
    """transformers logs errors only and shows no progress bar inside the block; its settings come back after."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
