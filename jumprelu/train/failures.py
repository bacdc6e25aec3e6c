"""One line for a failed checkpoint read or write, from the exception chain orbax and tensorstore raise.

Their messages run to dozens of lines (a tensorstore spec, a traceback per thread); the
user needs the cause: the OSError underneath, and whether the disk is full.
"""

from __future__ import annotations

import errno
import os
import re


def chain(error: BaseException):
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def no_space(error: BaseException) -> bool:
    """A full disk, whether Python (OSError ENOSPC) or tensorstore (RESOURCE_EXHAUSTED) reports it."""
    for e in chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "RESOURCE_EXHAUSTED" in str(e) or "No space left on device" in str(e):
            return True
    return False


def reason(error: BaseException) -> str:
    """One line for an exception from orbax or tensorstore: the OSError underneath if there is one."""
    if no_space(error):
        return os.strerror(errno.ENOSPC)
    for e in chain(error):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    for e in chain(error):  # tensorstore's own status ("OUT_OF_RANGE: Error reading ... of size 10")
        if _STATUS.match(str(e)):
            return str(e).strip().splitlines()[0][:300]
    # orbax appends the repr of a tensorstore spec (dozens of lines) to its own message
    text = str(error).split(" See full TensorStore details:")[0].strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


_STATUS = re.compile(r"^[A-Z][A-Z_]{3,}: ")  # absl status codes: DATA_LOSS, OUT_OF_RANGE, NOT_FOUND...
