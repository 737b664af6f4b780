"""Third-party output known to be benign, silenced around the one call that triggers it, never globally.

A newcomer reads transformers' "LOAD REPORT ... MISSING ... newly initialized" as "the model is broken", and
loading bars printed beside the command's own progress bar as clutter. Each context manager here covers one
known case and restores what it changed on exit, so the same messages from any other call (or a real problem
in this one) still show. The switches they flip (progress-bar flags, warning filters) are process-wide while
inside, as diffusers', transformers' and Python's are: meant for the loading calls of one command.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# transformers 5 logs the load report of an adapter through this module's logger (integrations/peft.py)
ADAPTER_REPORT_LOGGER = "transformers.integrations.peft"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the report's bold/colour codes
_REPORT_ROW = re.compile(r"^(?P<key>[^|]+?)\s*\|\s*(?P<status>[A-Z][A-Z ]*?)\s*\|")  # "key | MISSING | ..."
_ADAPTER_OF_KEY = re.compile(r"\.lora_[A-Za-z_]+\.(?P<adapter>[^.]+)\.")  # "...q_proj.lora_A.star.weight" -> star


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No loading bars from diffusers ("Loading pipeline components...") or transformers ("Loading weights") inside.

    Loading a pipeline takes seconds and its bars nest (one per component inside one over the components), which
    is not the one bar at a time a command shows. huggingface_hub's download bars are not touched: a download
    is long work a user wants to see.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    # transformers' disable_progress_bar() would switch off the hub's download bars too; its tqdm hook does not
    set_hook = getattr(transformers_logging, "set_tqdm_hook", None)
    previous = None

    def disabled(factory: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    if set_hook is not None:
        previous = set_hook(disabled)
    try:
        yield
    finally:
        if set_hook is not None:
            set_hook(previous)
        if diffusers_was_enabled:
            diffusers_logging.enable_progress_bar()


class _OtherAdaptersReport(logging.Filter):
    """Takes out of a LOAD REPORT the rows that list another adapter's LoRA tensor as MISSING; a report left with
    no rows is dropped.

    Why they are benign: transformers 5 (``load_adapter``) expects every ``lora`` parameter of the model from the
    file being loaded, so when diffusers loads a second adapter into the text encoder, the first adapter's
    tensors are reported "MISSING ... newly initialized"; they were loaded earlier and are untouched. Rows about
    the adapter being loaded, and any other status (unexpected keys, size mismatch), stay.
    """

    def __init__(self, adapter: str) -> None:
        super().__init__()
        self.adapter = adapter

    def _other_adapter_row(self, line: str) -> bool:
        row = _REPORT_ROW.match(_ANSI.sub("", line))
        key = _ADAPTER_OF_KEY.search(row["key"]) if row and row["status"] == "MISSING" else None
        return key is not None and key["adapter"] != self.adapter

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        lines = message.splitlines()
        other = [self._other_adapter_row(line) for line in lines]
        if not any(other):
            return True
        if sum(other) == sum(bool(_REPORT_ROW.match(_ANSI.sub("", line))) for line in lines):
            return False
        record.msg, record.args = "\n".join(line for line, drop in zip(lines, other) if not drop), None
        return True


class _NoKeysForComponent(logging.Filter):
    """Drops diffusers' "No LoRA keys associated to <model> found with the prefix=..." warning.

    Why it is benign here: a LoRA trained in the UNet only (as many are) has no text-encoder tensors, and diffusers
    says so on every load. The MoLE pipeline has loaded the same file before the reference pipeline does, and refuses
    tensors it cannot place, so a text-encoder half under a prefix diffusers missed would already have stopped it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "No LoRA keys associated to" not in record.getMessage()


# diffusers' modules that warn when a LoRA file has no tensors for one of the pipeline's models
NO_KEYS_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.peft")


@contextmanager
def quiet_multiple_adapters() -> Iterator[None]:
    """No PEFT "Already found a `peft_config` attribute in the model ... multiple adapters" warning inside: several
    adapters in one model is what is wanted there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model",
                                category=UserWarning)
        yield


@contextmanager
def quiet_adapter_loading(adapter: str) -> Iterator[None]:
    """Around ``pipe.load_lora_weights(..., adapter_name=adapter)`` into a pipeline that may hold other adapters:
    no load report that lists only the other adapters' tensors, no multiple-adapters warning, no warning that the
    file has no tensors for one of the models (a UNet-only LoRA), no loading bars."""
    filters = [(logging.getLogger(ADAPTER_REPORT_LOGGER), _OtherAdaptersReport(adapter))]
    filters += [(logging.getLogger(name), _NoKeysForComponent()) for name in NO_KEYS_LOGGERS]
    for logger, log_filter in filters:
        logger.addFilter(log_filter)
    try:
        with quiet_multiple_adapters(), quiet_loading():
            yield
    finally:
        for logger, log_filter in filters:
            logger.removeFilter(log_filter)
