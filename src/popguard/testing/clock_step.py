"""A wall clock that one host's processes see stepped (`date -s` an hour ahead or back),
for tests: Debian's libfaketime (package `faketime`) preloaded into every process
started with `environment()`, the machine's own clock untouched.

The offset is read from a file (FAKETIME_TIMESTAMP_FILE) that every process reads
again each CACHE_SECONDS, so `step("+1h")` moves the wall clock of processes already
running, as a real step does; CLOCK_MONOTONIC is left alone
(FAKETIME_DONT_FAKE_MONOTONIC), as a real step leaves it.

libfaketime 0.9.10, Debian 12's, has a bug with that setting: an absolute sleep on
CLOCK_MONOTONIC (Python >= 3.11's time.sleep) is mapped through the faked wall clock
and fails with EINVAL (wolfcw/libfaketime#426, fixed in 0.9.11). A shim preloaded in
front of it, compiled here with cc, sends those sleeps straight to the kernel.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path

# Where Debian's libfaketime is; `$LIB` is expanded by the dynamic loader, as the
# faketime command's own LD_PRELOAD does. The MT build: popguard's services have threads.
LIBFAKETIME = "/usr/$LIB/faketime/libfaketimeMT.so.1"
CACHE_SECONDS = 1  # how often a process reads the offset file again (default 10)

MONOTONIC_SLEEP_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_nanosleep_t)(clockid_t, int, const struct timespec *, struct timespec *);

int clock_nanosleep(clockid_t clock, int flags, const struct timespec *req,
                    struct timespec *rem)
{
    if (clock == CLOCK_MONOTONIC) {  /* not faked: the kernel's own sleep */
        return syscall(SYS_clock_nanosleep, clock, flags, req, rem) == 0 ? 0 : errno;
    }
    static clock_nanosleep_t next;
    if (next == NULL) {
        next = (clock_nanosleep_t)dlsym(RTLD_NEXT, "clock_nanosleep");
    }
    return next(clock, flags, req, rem);
}
"""


def missing() -> str | None:
    """Why a stepped clock cannot be made here (for a skip), or None."""
    # $LIB is lib/x86_64-linux-gnu on Debian's amd64 (lib/<triplet> on the others).
    if not glob.glob(LIBFAKETIME.replace("$LIB", "lib/*")):
        return "libfaketime is not installed (scripts/install-test-deps.sh: faketime)"
    if shutil.which("cc") is None:
        return "no C compiler for the libfaketime 0.9.10 shim (scripts/install-test-deps.sh)"
    return None


class SteppedClock:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._offset_file = folder / "faketime-offset"
        self._shim = folder / "monotonic-sleep-shim.so"
        source = folder / "monotonic-sleep-shim.c"
        source.write_text(MONOTONIC_SLEEP_SHIM)
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-O2", "-o", str(self._shim), str(source), "-ldl"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.step("+0")

    def environment(self) -> dict[str, str]:
        """What a process (and every process it starts) needs in its environment to see
        this clock."""
        return {
            "LD_PRELOAD": f"{self._shim}:{LIBFAKETIME}",
            "FAKETIME_TIMESTAMP_FILE": str(self._offset_file),
            "FAKETIME_CACHE_DURATION": str(CACHE_SECONDS),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def step(self, offset: str) -> None:
        """Set the offset from the real wall clock, in libfaketime's words ("+1h",
        "-1h", "+0"); processes see it within CACHE_SECONDS."""
        partial = self._offset_file.with_suffix(".partial")
        partial.write_text(offset + "\n")
        partial.replace(self._offset_file)  # whole or not at all, for its readers
