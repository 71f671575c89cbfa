"""Short messages for config mistakes: one line that names the key path as the user writes it
(``model.init_args.mixers.swa.windw``) and the fix, instead of jsonargparse's usage dump, a
traceback with the message twice and a ``Namespace(...)`` of the whole config.

``VLT_DEBUG=1`` (or jsonargparse's ``JSONARGPARSE_DEBUG``) re-raises with the full traceback.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import sys


class UserConfigError(ValueError):
    """A mistake in the recipe or the command line; ``main`` prints it as one short message."""


def debug() -> bool:
    return bool(os.environ.get("VLT_DEBUG") or os.environ.get("JSONARGPARSE_DEBUG"))


def _options(parser) -> list[str]:
    opts = []
    for action in getattr(parser, "_actions", []):
        opts += [o for o in action.option_strings if o.startswith("--")]
    return opts


def argument_error_message(err: Exception, parser, prog: str) -> str:
    """jsonargparse's parse error, with a close match for a mistyped option."""
    msg = str(err).strip()
    m = re.search(r"unrecognized arguments: (\S+)", msg)
    if m and m.group(1).startswith("--"):
        bad = m.group(1).split("=", 1)[0]
        close = difflib.get_close_matches(bad, _options(parser), n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown option {bad} ({hint}`{prog} --help` lists the options; abbreviations are not accepted)"
    # jsonargparse appends the whole given value; the first lines carry the reason
    lines = [ln for ln in msg.splitlines() if ln.strip() and not ln.lstrip().startswith("Given value")]
    return " ".join(ln.strip() for ln in lines[:6]) + f" (see `{prog} --help`)"


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _section_of(exc: BaseException) -> tuple[str | None, type | None]:
    """Which config section raised: the first ``self`` in the traceback that is a Lightning module,
    data module or the trainer."""
    import lightning as L
    tb = exc.__traceback__
    found = (None, None)
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, L.LightningModule):
            found = ("model", type(obj))
        elif isinstance(obj, L.LightningDataModule):
            found = ("data", type(obj))
        elif isinstance(obj, L.Trainer) and found[0] is None:
            found = ("trainer", type(obj))
        tb = tb.tb_next
    return found


def instantiation_error_message(exc: BaseException) -> str | None:
    """The user's mistake behind an error raised while the CLI builds the model, data or trainer,
    with the section prefix (``model.init_args.``); None when it is not a config error."""
    inner = None
    for e in _chain(exc):
        if isinstance(e, (ValueError, TypeError, FileNotFoundError)) and \
                not str(e).startswith(("Does not validate against any of the Union", "Problem with given class_path")):
            inner = e
    if inner is None:
        return None
    msg = str(inner).strip()
    section, cls = _section_of(inner)
    if section in ("model", "data") and cls is not None:
        params = set(inspect.signature(cls.__init__).parameters)
        lead = re.match(r"[A-Za-z_]\w*", msg)
        if lead and lead.group(0) in params:
            msg = f"{section}.init_args.{msg}"
        elif section == "model" and lead and lead.group(0) in ("decoder", "vision"):
            msg = f"model.init_args.model.{msg}"
    return msg


def report(message: str, prog: str = "vlt") -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    if not debug():
        print("(VLT_DEBUG=1 shows the full traceback)", file=sys.stderr)
