"""The solver table: which modes run where, and what each one does with the Newton settings.

Each backend builds one :class:`SolverTable` of :class:`SolverEntry` (availability
check + solve). A layer asks the table once per (cell, mode, device, dtype,
traced or not) and keeps the answer, so a forward pays for no availability
probe, sympy derivation, hashing or file read after the first.

Every solve has the signature::

    solve(cell, u, recurrent, bias, h0, resets, config, traced) -> (trajectory [B, T, K, N], SolveInfo)

with gates ``u`` [B, T, G, N] (without bias), ``recurrent`` [P, N], ``bias`` [G, N],
``h0`` [B, K, N] or None, ``resets`` [B, T] bool or None. ``traced`` is True
inside a compiled or transformed graph (MLX), where a solve must not read
values back to the host.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from pararnn_core.newton import NewtonConfig
from pararnn_core.user_warnings import warn_at_caller

#: ``auto`` takes the first mode of this list that runs on the input's device
AUTO_ORDER = ("fused", "kernel", "parallel")
MODES = ("auto", "sequential", "parallel", "kernel", "fused")
NEWTON_FIELDS = tuple(f.name for f in dataclasses.fields(NewtonConfig))
_DEFAULTS = NewtonConfig()


@dataclass(frozen=True)
class SolverEntry:
    """One mode of one backend.

    ``unavailable(cell, device)`` returns None when the mode runs ``cell`` on
    ``device`` (any cell when None), else the reason and what to do; it may
    compile and load kernels, and any exception it raises counts as a reason.
    ``honours`` names the NewtonConfig fields the mode acts on; an ``exact``
    mode solves the recurrence exactly (no Newton), so no setting applies and
    none is ignored. ``traceable``: the mode can run inside a compiled graph.
    """

    def serves(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types

    mode: str
    solve: Callable
    unavailable: Callable
    honours: frozenset = frozenset()
    exact: bool = False
    traceable: bool = True
    #: device types this entry serves (None: every device); a mode may have one entry per device type
    device_types: tuple | None = None

    def ignored_settings(self, config: NewtonConfig) -> list[str]:
        """Non-default NewtonConfig fields this mode would not act on."""
        if self.exact:
            return []
        return [
            name for name in NEWTON_FIELDS
            if name not in self.honours and getattr(config, name) != getattr(_DEFAULTS, name)
        ]


def _reason(entry: SolverEntry, cell, device) -> str | None:
    try:
        return entry.unavailable(cell, device)
    except Exception as error:  # a kernel that fails to build or load: auto moves on, the reason is kept
        return f"{type(error).__name__}: {error} (use mode='parallel' or 'sequential')"


class SolverTable:
    """The modes of one backend, with every decision cached.

    ``device_type(device)`` names the type of a device key ("cpu", "cuda", "gpu")
    so that a mode can have one entry per device type.
    """

    def __init__(self, backend: str, entries: list[SolverEntry], device_type: Callable):
        self.backend = backend
        self.entries = list(entries)
        self.device_type = device_type
        missing = set(MODES) - {"auto"} - {e.mode for e in entries}
        if missing:
            raise ValueError(f"solver table of {backend} lacks modes {sorted(missing)}")
        # cell -> {device: (entries, reasons)}; weak so user cells defined in a loop are not kept alive
        self._per_cell: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._any_cell: dict = {}
        self._choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._any_cell_choices: dict = {}

    def _resolved(self, cell, device) -> tuple[dict, dict]:
        """({mode: entry} runnable, {mode: reason} not) for ``cell`` on ``device``, probed once."""
        per_cell = self._any_cell if cell is None else self._per_cell.setdefault(cell, {})
        if device not in per_cell:
            kind = self.device_type(device)
            runnable, reasons = {}, {}
            for mode in MODES[1:]:
                entry = next((e for e in self.entries if e.mode == mode and e.serves(kind)), None)
                reason = (f"{self.backend} has no {mode!r} solver for {kind} devices" if entry is None
                          else _reason(entry, cell, device))
                if reason is None:
                    runnable[mode] = entry
                else:
                    reasons[mode] = reason
            per_cell[device] = (runnable, reasons)
        return per_cell[device]

    def unavailable_modes(self, device, cell=None) -> dict[str, str]:
        """Modes that cannot run on ``device`` (for ``cell``, when given), with the reason and what to do."""
        return dict(self._resolved(cell, device)[1])

    def choose(self, mode: str, cell, device, traced: bool = False) -> SolverEntry:
        """The entry that runs ``mode`` (or what ``auto`` picks) for ``cell`` on ``device``; cached."""
        key = (mode, device, traced)
        per_cell = self._any_cell_choices if cell is None else self._choices.setdefault(cell, {})
        entry = per_cell.get(key)
        if entry is None:
            entry = per_cell[key] = self._decide(mode, cell, device, traced)
        return entry

    def _decide(self, mode, cell, device, traced) -> SolverEntry:
        check_mode_name(mode)
        runnable, reasons = self._resolved(cell, device)
        if mode == "auto":
            for candidate in AUTO_ORDER:
                entry = runnable.get(candidate)
                if entry is not None and (entry.traceable or not traced):
                    return entry
            return runnable["sequential"]
        if mode in reasons:
            raise ValueError(f"mode {mode!r} is not available: {reasons[mode]}")
        entry = runnable[mode]
        if traced and not entry.traceable:
            raise ValueError(
                f"mode {mode!r} of {self.backend} cannot run inside a compiled graph (it reads data back to the "
                f"host); use mode='auto', 'parallel' or 'sequential' there"
            )
        return entry


def check_mode_name(mode) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def check_settings(entry: SolverEntry, config: NewtonConfig, requested: str):
    """A non-default Newton setting that the chosen mode would ignore: an error when the mode was asked for
    by name, a warning when ``auto`` chose it (the user did not pick it)."""
    ignored = entry.ignored_settings(config)
    if not ignored:
        return
    listed = ", ".join(f"{name}={getattr(config, name)!r}" for name in ignored)
    message = (
        f"mode {entry.mode!r} ignores NewtonConfig {listed} (it honours {', '.join(sorted(entry.honours)) or 'none'}); "
        f"use mode='parallel' for every setting, or leave these at their defaults"
    )
    if requested != "auto":
        raise ValueError(message)
    warn_at_caller(message, UserWarning)
