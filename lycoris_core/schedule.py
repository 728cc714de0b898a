"""When an adapter acts during sampling: a strength multiplier over the sampling steps.

A `Schedule` maps each model call to a multiplier of the adapter's strength: keyframes over
sampling progress (0 = first step, 1 = the end), held or linearly interpolated between them, and a
separate multiplier for the negative (unconditional) pass. Lightning/turbo LoRAs for the first
steps, pose LoRAs early, detail LoRAs late, and Wan 2.2 phases are all keyframes. The node layer
works out the call's step and which batch rows are negative; everything here is plain Python.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

INTERPOLATIONS = ("hold", "linear")

# name -> (keyframes text, interpolation); "N steps" keyframes count whole sampling steps
PRESETS = {
    "always": ("0:1", "hold"),
    "first 1 step": ("0:1, 1 step:0", "hold"),
    "first 2 steps": ("0:1, 2 steps:0", "hold"),
    "first 25%": ("0:1, 0.25:0", "hold"),
    "first 50%": ("0:1, 0.5:0", "hold"),
    "last 50%": ("0:0, 0.5:1", "hold"),
    "last 25%": ("0:0, 0.75:1", "hold"),
    "ramp up": ("0:0, 1:1", "linear"),
    "ramp down": ("0:1, 1:0", "linear"),
}


class ScheduleError(ValueError):
    """A keyframe text that cannot be read; the message says what was expected."""


@dataclass(frozen=True)
class Keyframe:
    position: float  # a fraction of the sampling steps, or a step index when `in_steps`
    multiplier: float
    in_steps: bool = False

    def at(self, steps: int) -> float:
        """The keyframe's place as a fraction of `steps` sampling steps."""
        return self.position / steps if self.in_steps else self.position


@dataclass(frozen=True)
class Schedule:
    keyframes: tuple[Keyframe, ...] = (Keyframe(0.0, 1.0),)
    interpolation: str = "hold"
    negative: float = 1.0  # multiplier on the negative (unconditional) pass, on top of the keyframes

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ScheduleError(f"interpolation '{self.interpolation}': expected one of {', '.join(INTERPOLATIONS)}")
        if not self.keyframes:
            raise ScheduleError("a schedule needs at least one keyframe")

    def multiplier(self, step: int, steps: int, negative: bool = False) -> float:
        """The strength multiplier at sampling step `step` (0-based) of `steps`."""
        progress = step / steps if steps > 0 else 0.0
        return self.at_progress(progress, steps) * (self.negative if negative else 1.0)

    def at_progress(self, progress: float, steps: int = 0) -> float:
        """The keyframes' multiplier at `progress` (fraction of the steps done); before the first
        keyframe its value holds, after the last one the last value."""
        points = sorted((k.at(max(steps, 1)), k.multiplier) for k in self.keyframes)
        places = [p for p, _ in points]
        i = bisect.bisect_right(places, progress + 1e-9) - 1
        if i < 0:
            return points[0][1]
        if self.interpolation == "hold" or i == len(points) - 1:
            return points[i][1]
        (p0, m0), (p1, m1) = points[i], points[i + 1]
        return m0 if p1 <= p0 else m0 + (m1 - m0) * (progress - p0) / (p1 - p0)

    def is_constant(self) -> bool:
        values = {k.multiplier for k in self.keyframes}
        return len(values) == 1 and self.negative == 1.0

    def describe(self) -> str:
        frames = ", ".join(f"{_place(k)}:{k.multiplier:g}" for k in self.keyframes)
        text = f"{frames} ({self.interpolation})"
        return text + (f", negative pass x{self.negative:g}" if self.negative != 1.0 else "")


def _place(k: Keyframe) -> str:
    if k.in_steps:
        return f"{k.position:g} step" + ("" if k.position == 1 else "s")
    return f"{k.position:g}"


_KEYFRAME = re.compile(r"^\s*(?P<place>[-+0-9.]+)\s*(?P<unit>%|steps?)?\s*[:=]\s*(?P<value>[-+0-9.eE]+)\s*$")


def parse_keyframes(text: str) -> tuple[Keyframe, ...]:
    """"0:1, 0.25:0" (fractions of the steps), "0:1, 2 steps:0" (whole steps) or "0:1, 25%:0";
    ';' or new lines separate keyframes too."""
    comma = re.search(r"(?<![\d.])(\d+),(\d+)\s*(?:%|steps?)?\s*[:=]", text)
    if comma is not None:
        raise ScheduleError(f"'{comma.group(0)}': did you mean {comma.group(1)}.{comma.group(2)}? (use '.' for "
                            "decimals; ',' separates keyframes)")
    frames = []
    for part in re.split(r"[,;\n]+", text.strip()):
        if not part.strip():
            continue
        match = _KEYFRAME.match(part)
        if match is None:
            raise ScheduleError(f"keyframe '{part.strip()}': expected PLACE:MULTIPLIER such as 0:1, 0.25:0, "
                                "'2 steps:0' or '25%:0'")
        place, unit = float(match["place"]), match["unit"] or ""
        if unit == "%":
            place /= 100
        in_steps = unit.startswith("step")
        if place < 0 or (not in_steps and place > 1):
            raise ScheduleError(f"keyframe '{part.strip()}': the place must be a fraction of the steps "
                                "from 0 to 1 (or 'N steps', or a percentage)")
        frames.append(Keyframe(place, float(match["value"]), in_steps))
    if not frames:
        raise ScheduleError("no keyframes: write e.g. 0:1, 0.25:0")
    return tuple(frames)


def schedule_from(preset: str, keyframes: str = "", interpolation: str = "hold", negative: float = 1.0) -> Schedule:
    """The schedule a LyCORIS Schedule node describes: its keyframes text if given, else the preset."""
    if keyframes.strip():
        return Schedule(parse_keyframes(keyframes), interpolation, float(negative))
    if preset not in PRESETS:
        raise ScheduleError(f"unknown preset '{preset}': expected one of {', '.join(PRESETS)}")
    text, preset_interpolation = PRESETS[preset]
    return Schedule(parse_keyframes(text), preset_interpolation, float(negative))


def step_of(sigma: float, sample_sigmas) -> tuple[int, int]:
    """(step index, number of steps) of a model call at `sigma` in the sampler's schedule
    `sample_sigmas` (descending, steps + 1 values): the step whose interval holds the sigma, so
    samplers that evaluate between two sigmas (Heun, DPM-2) stay in their step."""
    values = [float(s) for s in sample_sigmas]
    steps = max(len(values) - 1, 1)
    step = 0
    for i in range(steps):
        if values[i] >= sigma - 1e-6 * max(1.0, abs(sigma)):
            step = i
    return step, steps
