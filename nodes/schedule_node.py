"""LyCORIS Schedule: when a loaded adapter acts during sampling (keyframes over the steps, and
another strength on the negative pass), handed to the loaders' `schedule` input."""

from __future__ import annotations

from ..lycoris_core.schedule import INTERPOLATIONS, PRESETS, ScheduleError, schedule_from

SCHEDULE_TYPE = "LYCORIS_SCHEDULE"


class LycorisSchedule:
    DESCRIPTION = ("When the adapter acts while sampling: e.g. a lightning LoRA for the first 2 steps, a detail LoRA "
                   "for the last half, a ramp, and another strength on the negative (unconditional) pass. Connect it "
                   "to a Load LyCORIS node's `schedule` input; the scheduled adapter runs beside the layers (no "
                   "weight is rewritten), so its strength can change every step at no reload.")
    CATEGORY = "loaders/lycoris"
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE_TYPE, "STRING")
    RETURN_NAMES = ("schedule", "description")
    OUTPUT_TOOLTIPS = ("The schedule, for a loader's `schedule` input.", "The schedule in words.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "preset": (list(PRESETS), {"default": "first 2 steps", "tooltip": "A ready schedule; ignored when "
                       "keyframes are given."}),
            "keyframes": ("STRING", {"default": "", "multiline": False, "placeholder": "e.g. 0:1, 0.25:0  or  "
                          "0:1, 2 steps:0", "tooltip": "PLACE:MULTIPLIER pairs: the place as a fraction of the "
                          "steps (0 = first step), a percentage (25%) or whole steps (2 steps); the multiplier "
                          "scales the loader's strength from that place on. Empty: the preset."}),
            "interpolation": (list(INTERPOLATIONS), {"default": "hold", "tooltip": "hold: each keyframe's value "
                              "until the next one; linear: a ramp between keyframes."}),
            "negative_multiplier": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                    "tooltip": "Multiplies the strength on the negative (unconditional) pass: 0 "
                                    "keeps the adapter out of the negative prompt's prediction."}),
        }}

    def build(self, preset, keyframes, interpolation, negative_multiplier):
        try:
            schedule = schedule_from(preset, keyframes, interpolation, negative_multiplier)
        except ScheduleError as error:
            raise ValueError(f"LyCORIS Schedule: {error}") from None
        return (schedule, schedule.describe())
