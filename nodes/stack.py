"""Load LyCORIS Stack: many adapter files in one node, as rows that are real node inputs (so the
canvas, the Vue renderer and a workflow posted as API JSON all carry the same rows), with
`LORA_STACK` in and out, trigger words and Civitai hashes as text, and Wan 2.2 expert pairs.

Each row goes through the single loader's `apply_adapter_file`, in stack order, so a stack gives
what the same files chained through Load LyCORIS give (and the same `lora_metadata` attachment).

Rows are one input, `rows`: the number of rows, and under it each row's fields, named
`rows.<field>_<n>` in API JSON (`rows.lora_name_1`, `rows.strength_model_1`, ...). ComfyUI 0.28
declares them as a dynamic combo (only the chosen number of rows is shown); runtimes without the
V3 node API (the pinned March-2024 one) get a plain node with the same input names and all
`MAX_ROWS` row groups shown, of which the first `rows` are read. The same API JSON runs on both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import folder_paths

from ..lycoris_core import AdapterFormatError
from ..lycoris_core.block_weights import BlockWeightError
from ..lycoris_core.trigger_words import hashes_text, trigger_text
from .block_weight_node import read_block_weights
from .cache import load_cached
from .loader import CATEGORY, MODES, STRENGTH, _adapter_path, _attach_metadata, describe_adapter
from .patching import apply_adapter_file

try:  # ComfyUI with the V3 node API (dynamic inputs)
    from comfy_api.latest import io
    if not hasattr(io, "DynamicCombo"):
        io = None
except ImportError:
    io = None

MAX_ROWS = 10
EXPERTS = ["both", "high", "low"]
ROW_COUNTS = [str(n) for n in range(MAX_ROWS + 1)]
DEFAULT_ROWS = "1"
_TWIN = re.compile(r"(?<![a-z])(high|low)([_\-. ]?noise)", re.IGNORECASE)

TIPS = {
    "model": "The diffusion model (for Wan 2.2: the high-noise expert).",
    "clip": "The text encoder(s); leave unconnected for model-only adapters.",
    "model_low": "Wan 2.2: the low-noise expert. Rows marked low or both go to it; a *high_noise* file finds "
                 "its *low_noise* twin in the same folder for it.",
    "lora_stack": "A LORA_STACK from another stack node (Efficiency, Comfyroll, LoRA Manager, or this one): its "
                  "(name, strength_model, strength_clip) rows are applied first, in mode auto.",
    "schedule": "From a LyCORIS Schedule node: when the rows act while sampling (first steps, ramps, another "
                "strength on the negative pass), for every row's diffusion-model side; scheduled rows run beside "
                "the layers whatever their mode. For one row only, load that file with its own Load LyCORIS.",
    "rows": "How many rows of adapters this node has.",
    "on": "Off: the row is skipped and leaves nothing behind.",
    "lora_name": "The adapter file, from the loras folders.",
    "strength_model": "Strength on the diffusion model; 0 leaves it untouched.",
    "strength_clip": "Strength on the text encoder(s); 0 leaves them untouched.",
    "mode": "auto: bypass on quantized layers, merge on float ones; merge; bypass.",
    "expert": "Wan 2.2: which expert the row changes (high = model, low = model_low); both = each gets the file "
              "(or its high/low twin). Without model_low, low rows are skipped.",
    "block_weights": "Per-block strength for this row (as Load LyCORIS's block_weights). Empty: every block at 1.",
}
OUTPUT_TIPS = (
    "The diffusion model with every row applied.",
    "The text encoder(s) with every row applied.",
    "Per row what matched, and which rows change the same layers.",
    "Trigger words of the applied files (sidecar files beside them, then their metadata), comma-separated.",
    "sd-webui's \"Lora hashes\" value (name: hash, ...) that Civitai reads from an image's parameters.",
    "The rows applied (lora_stack rows, then this node's) as (name, strength_model, strength_clip).",
    "Wan 2.2: the low-noise expert with its rows applied.",
)


@dataclass
class Row:
    label: str  # "row 2" or "lora_stack 1", for the report and errors
    lora_name: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    mode: str = "auto"
    expert: str = "both"
    block_weights: str = ""
    on: bool = True


def _field(values: dict, name: str, n: int, default):
    """A row field from the V3 nested dict (`lora_name_1`) or the flat V1 inputs (`rows.lora_name_1`)."""
    for key in (f"{name}_{n}", f"rows.{name}_{n}"):
        if values.get(key) is not None:
            return values[key]
    return default


def rows_from_inputs(count, values: dict) -> list[Row]:
    """The node's own rows: the first `count` row groups of `values`."""
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise ValueError(f"Load LyCORIS Stack: rows must be a number 0-{MAX_ROWS}, got {count!r}") from None
    if not 0 <= count <= MAX_ROWS:
        raise ValueError(f"Load LyCORIS Stack: rows must be 0-{MAX_ROWS}, got {count}")
    rows = []
    for n in range(1, count + 1):
        name = _field(values, "lora_name", n, None)
        if not name:
            raise ValueError(f"Load LyCORIS Stack: row {n} has no lora_name (input rows.lora_name_{n})")
        row = Row(f"row {n}", str(name), float(_field(values, "strength_model", n, 1.0)),
                  float(_field(values, "strength_clip", n, 1.0)), str(_field(values, "mode", n, "auto")),
                  str(_field(values, "expert", n, "both")), str(_field(values, "block_weights", n, "") or ""),
                  bool(_field(values, "on", n, True)))
        if row.mode not in MODES:
            raise ValueError(f"Load LyCORIS Stack: row {n} mode '{row.mode}'; expected one of {', '.join(MODES)}")
        if row.expert not in EXPERTS:
            raise ValueError(f"Load LyCORIS Stack: row {n} expert '{row.expert}'; expected one of {', '.join(EXPERTS)}")
        rows.append(row)
    return rows


def rows_from_lora_stack(lora_stack, title: str = "Load LyCORIS Stack") -> list[Row]:
    """Rows from a `LORA_STACK`: a list of (name, strength_model, strength_clip), names relative to
    the loras folders (Efficiency Nodes, Comfyroll, LoRA Manager); "None" entries are empty slots."""
    if lora_stack is None:
        return []
    if not isinstance(lora_stack, (list, tuple)):
        raise ValueError(f"{title}: lora_stack must be a list of (name, strength_model, strength_clip), "
                         f"got {type(lora_stack).__name__}")
    rows = []
    for i, entry in enumerate(lora_stack, 1):
        if not isinstance(entry, (list, tuple)) or len(entry) < 3:
            raise ValueError(f"{title}: lora_stack entry {i} is {entry!r}; expected "
                             "(name, strength_model, strength_clip)")
        name, strength_model, strength_clip = entry[0], entry[1], entry[2]
        if name in (None, "", "None"):
            continue
        try:
            rows.append(Row(f"lora_stack {i}", str(name), float(strength_model), float(strength_clip)))
        except (TypeError, ValueError):
            raise ValueError(f"{title}: lora_stack entry {i} ({name}) has strengths "
                             f"{strength_model!r}, {strength_clip!r}; expected numbers") from None
    return rows


def resolve_adapter(name: str) -> str:
    """The file of a row: a name in the loras folders, or (from other packs' stacks) an absolute
    path that lies inside them."""
    if os.path.isabs(name) and os.path.isfile(name):
        roots = [os.path.realpath(r) for r in folder_paths.get_folder_paths("loras")]
        real = os.path.realpath(name)
        if any(real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
            return name
    return _adapter_path(name)


def twin_name(name: str) -> str | None:
    """The other Wan 2.2 expert's file of `name` (`*high_noise*` <-> `*low_noise*`, in the same
    folder, same case), if it exists in the loras folders."""
    folder, base = os.path.split(name)
    match = _TWIN.search(base)
    if match is None:
        return None
    word = match.group(1)
    other = "low" if word.lower() == "high" else "high"
    other = other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
    twin_base = base[: match.start(1)] + other + base[match.end(1):]
    twin = os.path.join(folder, twin_base) if folder else twin_base
    path = folder_paths.get_full_path("loras", twin)
    original = folder_paths.get_full_path("loras", name)
    if path is None or (original is not None and os.path.dirname(path) != os.path.dirname(original)):
        return None
    return twin


def _is_low(name: str) -> bool:
    match = _TWIN.search(os.path.basename(name))
    return match is not None and match.group(1).lower() == "low"


def _targets(row: Row, have_low: bool) -> list[tuple[str, str]]:
    """(expert, file name) pairs a row applies: "high" is the model input, "low" model_low."""
    if row.expert == "high" or not have_low:
        return [] if row.expert == "low" else [("high", row.lora_name)]
    if row.expert == "low":
        return [("low", row.lora_name)]
    twin = twin_name(row.lora_name)
    if twin is None:
        return [("high", row.lora_name), ("low", row.lora_name)]
    return [("low", row.lora_name), ("high", twin)] if _is_low(row.lora_name) else \
        [("high", row.lora_name), ("low", twin)]


def apply_stack(model, clip, model_low, rows: list[Row], schedule=None):
    """(model, clip, model_low, report, trigger words, hashes, LORA_STACK applied). Each row is
    applied as Load LyCORIS applies one file; a row off or at strength 0 is skipped whole.
    `schedule` (a LYCORIS_SCHEDULE): every row's model side follows it, in bypass."""
    if model is None:
        raise ValueError("Load LyCORIS Stack: connect a model")
    models = {"high": model, "low": model_low}
    lines, infos, applied = [], [], []
    touched: list[tuple[str, set]] = []  # (row label, {(expert, side, layer key)})
    for row in rows:
        if not row.on:
            lines.append(f"[{row.label}] {row.lora_name}: off")
            continue
        if row.strength_model == 0 and (row.strength_clip == 0 or clip is None):
            lines.append(f"[{row.label}] {row.lora_name}: strength 0, skipped")
            continue
        targets = _targets(row, model_low is not None)
        if not targets:
            lines.append(f"[{row.label}] {row.lora_name}: warning: for the low-noise expert, but model_low "
                         "is not connected; skipped")
            continue
        layers = set()
        for i, (expert, name) in enumerate(targets):
            with_clip = clip if i == 0 else None
            path = resolve_adapter(name)
            where = f"{row.label} ({name})"
            try:
                blocks = None
                if row.block_weights.strip():
                    blocks = read_block_weights(row.block_weights, models[expert], with_clip)
                adapter_file = load_cached(path)
                new_model, new_clip, report = apply_adapter_file(
                    models[expert], with_clip, adapter_file, row.strength_model,
                    row.strength_clip if with_clip is not None else 0.0, row.mode,
                    block_weight=None if blocks is None else blocks.weight_for_key, schedule=schedule)
            except (AdapterFormatError, BlockWeightError) as error:
                raise ValueError(f"Load LyCORIS Stack, {where}: {error}") from None
            _attach_metadata(new_model, new_clip, adapter_file.metadata)
            models[expert] = new_model
            if with_clip is not None:
                clip = new_clip
            strengths = f"mode {row.mode}, strength_model {row.strength_model:g}" + (
                f", strength_clip {row.strength_clip:g}" if with_clip is not None else "")
            expert_note = "" if model_low is None else f" -> {'model' if expert == 'high' else 'model_low'}"
            text = report.text(adapter_file, strengths)
            if blocks is not None:
                text += f"\nblock weights ({blocks.dialect}, {blocks.architecture}): {blocks.describe(compact=True)}"
                text += "".join(f"\n  warning: {w}" for w in blocks.warnings)
            info, facts = describe_adapter(path, adapter_file.metadata)
            infos.append(info)
            text += facts
            lines.append(f"[{row.label}{expert_note}] " + text.replace("\n", "\n    "))
            layers |= {(expert, report.targets[m], key) for m, key in report.coverage.matched.items()}
        touched.append((row.label, layers))
        applied.append((row.lora_name, row.strength_model, row.strength_clip))
    header = f"LyCORIS stack: {len(applied)} of {len(rows)} rows applied"
    text = "\n".join([header, *lines, *_overlaps(touched)])
    return models["high"], clip, models["low"], text, trigger_text(infos), hashes_text(infos), applied


def _overlaps(touched: list[tuple[str, set]]) -> list[str]:
    """One line per pair of rows that change some of the same layers (their effects add up there)."""
    out = []
    for i, (label, layers) in enumerate(touched):
        for other, other_layers in touched[i + 1:]:
            shared = layers & other_layers
            if shared:
                where = sorted({("model_low" if e == "low" else s) for e, s, _ in shared})
                out.append(f"overlap: {label} and {other} both change {len(shared)} layers ({', '.join(where)})")
    return out or (["overlap: none (no two rows change the same layer)"] if len(touched) > 1 else [])


def run(model, rows, clip=None, model_low=None, lora_stack=None, schedule=None, **row_values):
    """The node's work, whichever node API called: `rows` is the row count (V1) or the V3 nested dict."""
    if isinstance(rows, dict):
        row_values = dict(rows, **row_values)
        count = rows.get("rows")
    else:
        count = rows
    own = rows_from_inputs(count, row_values)
    result = apply_stack(model, clip, model_low, rows_from_lora_stack(lora_stack) + own, schedule)
    model, clip, model_low, text, words, hashes, applied = result
    print(text)
    return (model, clip, text, words, hashes, list(applied), model_low), text


def _row_fields(n: int) -> dict:
    """V1 declarations of row n's inputs, named as the V3 dynamic combo names them."""
    return {
        f"rows.on_{n}": ("BOOLEAN", {"default": True, "tooltip": TIPS["on"]}),
        f"rows.lora_name_{n}": (folder_paths.get_filename_list("loras"), {"tooltip": TIPS["lora_name"]}),
        f"rows.strength_model_{n}": ("FLOAT", dict(STRENGTH, tooltip=TIPS["strength_model"])),
        f"rows.strength_clip_{n}": ("FLOAT", dict(STRENGTH, tooltip=TIPS["strength_clip"])),
        f"rows.mode_{n}": (MODES, {"default": "auto", "tooltip": TIPS["mode"]}),
        f"rows.expert_{n}": (EXPERTS, {"default": "both", "tooltip": TIPS["expert"]}),
        f"rows.block_weights_{n}": ("STRING", {"default": "", "tooltip": TIPS["block_weights"]}),
    }


RETURN_TYPES = ("MODEL", "CLIP", "STRING", "STRING", "STRING", "LORA_STACK", "MODEL")
RETURN_NAMES = ("MODEL", "CLIP", "report", "trigger_words", "adapter_hashes", "LORA_STACK", "model_low")
DESCRIPTION = ("Many LoRA / LyCORIS files in one node: each row a file with its strengths, mode, block weights "
               "and Wan 2.2 expert; LORA_STACK in and out; trigger words and Civitai hashes as text.")


class LycorisStackV1:
    """Runtimes without the V3 node API: every row group is shown; `rows` says how many are read."""

    DESCRIPTION = DESCRIPTION
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = RETURN_TYPES
    RETURN_NAMES = RETURN_NAMES
    OUTPUT_TOOLTIPS = OUTPUT_TIPS

    @classmethod
    def INPUT_TYPES(cls):
        optional = {
            "clip": ("CLIP", {"tooltip": TIPS["clip"]}),
            "model_low": ("MODEL", {"tooltip": TIPS["model_low"]}),
            "lora_stack": ("LORA_STACK", {"tooltip": TIPS["lora_stack"]}),
            "schedule": ("LYCORIS_SCHEDULE", {"tooltip": TIPS["schedule"]}),
        }
        for n in range(1, MAX_ROWS + 1):
            optional.update(_row_fields(n))
        return {"required": {"model": ("MODEL", {"tooltip": TIPS["model"]}),
                             "rows": (ROW_COUNTS, {"default": DEFAULT_ROWS, "tooltip": TIPS["rows"]})},
                "optional": optional}

    def load(self, model, rows, clip=None, model_low=None, lora_stack=None, schedule=None, **row_values):
        outputs, text = run(model, rows, clip, model_low, lora_stack, schedule, **row_values)
        return {"ui": {"text": [text]}, "result": outputs}


if io is not None:
    LoraStackType = io.Custom("LORA_STACK")
    ScheduleType = io.Custom("LYCORIS_SCHEDULE")

    def _row_inputs(count: int) -> list:
        """Row groups 1..count. All optional: the front-end lists required inputs before optional
        ones, so mixing them would scatter a row's fields; a row without lora_name is an error."""
        inputs = []
        for n in range(1, count + 1):
            inputs += [
                io.Boolean.Input(f"on_{n}", default=True, optional=True, tooltip=TIPS["on"]),
                io.Combo.Input(f"lora_name_{n}", options=folder_paths.get_filename_list("loras"),
                               optional=True, tooltip=TIPS["lora_name"]),
                io.Float.Input(f"strength_model_{n}", default=1.0, min=STRENGTH["min"], max=STRENGTH["max"],
                               step=STRENGTH["step"], optional=True, tooltip=TIPS["strength_model"]),
                io.Float.Input(f"strength_clip_{n}", default=1.0, min=STRENGTH["min"], max=STRENGTH["max"],
                               step=STRENGTH["step"], optional=True, tooltip=TIPS["strength_clip"]),
                io.Combo.Input(f"mode_{n}", options=MODES, default="auto", optional=True, tooltip=TIPS["mode"]),
                io.Combo.Input(f"expert_{n}", options=EXPERTS, default="both", optional=True,
                               tooltip=TIPS["expert"]),
                io.String.Input(f"block_weights_{n}", default="", optional=True, tooltip=TIPS["block_weights"]),
            ]
        return inputs

    class LycorisStackV3(io.ComfyNode):
        """ComfyUI with dynamic inputs: the `rows` combo shows exactly that many row groups."""

        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="LycorisStack",
                display_name="Load LyCORIS Stack",
                category=CATEGORY,
                description=DESCRIPTION,
                inputs=[
                    io.Model.Input("model", tooltip=TIPS["model"]),
                    io.Clip.Input("clip", optional=True, tooltip=TIPS["clip"]),
                    io.Model.Input("model_low", optional=True, tooltip=TIPS["model_low"]),
                    LoraStackType.Input("lora_stack", optional=True, tooltip=TIPS["lora_stack"]),
                    ScheduleType.Input("schedule", optional=True, tooltip=TIPS["schedule"]),
                    io.DynamicCombo.Input("rows", tooltip=TIPS["rows"], options=[
                        # the front-end starts a new node at the first option: one row; "0" (only
                        # lora_stack) comes last
                        io.DynamicCombo.Option(count, _row_inputs(int(count))) for count in ROW_COUNTS[1:] + ["0"]]),
                ],
                outputs=[
                    io.Model.Output("MODEL", display_name="MODEL", tooltip=OUTPUT_TIPS[0]),
                    io.Clip.Output("CLIP", display_name="CLIP", tooltip=OUTPUT_TIPS[1]),
                    io.String.Output("report", display_name="report", tooltip=OUTPUT_TIPS[2]),
                    io.String.Output("trigger_words", display_name="trigger_words", tooltip=OUTPUT_TIPS[3]),
                    io.String.Output("adapter_hashes", display_name="adapter_hashes", tooltip=OUTPUT_TIPS[4]),
                    LoraStackType.Output("LORA_STACK", display_name="LORA_STACK", tooltip=OUTPUT_TIPS[5]),
                    io.Model.Output("model_low", display_name="model_low", tooltip=OUTPUT_TIPS[6]),
                ],
            )

        @classmethod
        def execute(cls, model, rows, clip=None, model_low=None, lora_stack=None, schedule=None) -> "io.NodeOutput":
            outputs, text = run(model, rows, clip, model_low, lora_stack, schedule)
            return io.NodeOutput(*outputs, ui={"text": [text]})

    LycorisStack = LycorisStackV3
else:
    LycorisStack = LycorisStackV1
