"""Trigger words and Civitai-readable hashes of an adapter file, for prompts and image savers.

Trigger words come from the sidecar files users already keep beside their LoRAs (written by
sd-webui/Forge, Civitai Helper and LoRA Manager) and from the file's own metadata (the trainer's
trigger phrase, else its most frequent caption tags). A sidecar is read only when it resolves to a
place inside one of the folders the caller names (the loras folders), so a symlink cannot make the
node read elsewhere. Nothing here is executed or written.

The hash is sd-webui's "Lora hashes" form that Civitai reads from an image's parameters (Civitai
calls it AutoV3): the sha256 of a .safetensors file's tensor data, i.e. the file after its 8-byte
length and JSON header, first 12 hex digits; other files hash whole. Hashes are kept per
(path, size, mtime), so an unchanged file is read once per session.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from .inspection import trigger_words as tag_frequencies

# the trainer's own trigger phrase: kohya/SimpleTuner modelspec, ai-toolkit and other trainers' fields
EXPLICIT_KEYS = ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_phrase", "trigger_words",
                 "trigger_word", "instance_prompt")
TOP_TAGS = 5  # caption tags shown when the file names no trigger phrase
SHORT_HASH = 12  # sd-webui's shorthash length, what Civitai matches
SIDECAR_LIMIT = 4 << 20  # a sidecar larger than this is not a sidecar


@dataclass
class AdapterInfo:
    """What a prompt or an image saver needs to know about one adapter file."""

    name: str  # the file name without extension, as sd-webui writes it in "Lora hashes"
    trigger_words: list[str] = field(default_factory=list)
    preferred_weight: float | None = None
    sources: list[str] = field(default_factory=list)  # where the words came from
    tensor_sha256: str = ""

    @property
    def short_hash(self) -> str:
        return self.tensor_sha256[:SHORT_HASH]

    def hash_entry(self) -> str:
        return f"{self.name}: {self.short_hash}"


def split_words(value) -> list[str]:
    """A trigger field as a list: a JSON list, or comma-separated text (sd-webui's activation text)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return split_words(json.loads(text))
            except ValueError:
                pass
        return [w.strip() for w in text.split(",") if w.strip()]
    if isinstance(value, (list, tuple)):
        words = []
        for item in value:
            words.extend(split_words(item) if isinstance(item, str) else [])
        return words
    return []


def metadata_trigger_words(metadata: dict) -> tuple[list[str], str | None]:
    """(words, source key): the explicit trigger phrase if the trainer wrote one, else the top caption tags."""
    for key in EXPLICIT_KEYS:
        words = split_words(metadata.get(key))
        if words:
            return words, key
    tags = [tag for tag, _ in tag_frequencies(metadata, TOP_TAGS) if tag]
    return (tags, "ss_tag_frequency") if tags else ([], None)


def _inside(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def _read_json(path: str, roots: list[str]):
    """The parsed sidecar, or None when it is absent, outside the roots, too large or not JSON."""
    if not os.path.isfile(path) or not _inside(path, roots) or os.path.getsize(path) > SIDECAR_LIMIT:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _weight(value) -> float | None:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return None
    return weight if weight == weight and abs(weight) != float("inf") else None


def sidecar_trigger_words(path: str, roots: list[str]) -> tuple[list[str], float | None, list[str]]:
    """(words, preferred weight, sources) from the sidecars beside `path`:
    sd-webui/Forge `<stem>.json` ("activation text", "preferred weight" — 0 there means unset),
    Civitai Helper `<stem>.civitai.info` ("trainedWords"), LoRA Manager `<stem>.metadata.json`
    ("civitai"."trainedWords", "usage_tips" JSON with "strength")."""
    stem = os.path.splitext(path)[0]
    words: list[str] = []
    weight = None
    sources = []

    def take(found: list[str], suffix: str) -> None:
        if found:
            words.extend(found)
            sources.append(os.path.basename(stem) + suffix)

    webui = _read_json(stem + ".json", roots)
    if isinstance(webui, dict):
        take(split_words(webui.get("activation text")), ".json")
        preferred = _weight(webui.get("preferred weight"))
        weight = preferred if preferred else None
    helper = _read_json(stem + ".civitai.info", roots)
    if isinstance(helper, dict):
        take(split_words(helper.get("trainedWords")), ".civitai.info")
    manager = _read_json(stem + ".metadata.json", roots)
    if isinstance(manager, dict):
        civitai = manager.get("civitai")
        take(split_words(civitai.get("trainedWords")) if isinstance(civitai, dict) else [], ".metadata.json")
        tips = manager.get("usage_tips")
        if isinstance(tips, str):
            try:
                tips = json.loads(tips)
            except ValueError:
                tips = None
        if weight is None and isinstance(tips, dict):
            weight = _weight(tips.get("strength"))
    return _unique(words), weight, sources


def _unique(words: list[str]) -> list[str]:
    seen, out = set(), []
    for word in words:
        if word.casefold() not in seen:
            seen.add(word.casefold())
            out.append(word)
    return out


def tensor_sha256(path: str, block: int = 1 << 20) -> str:
    """sha256 of a .safetensors file's tensor data (sd-webui's and Civitai's LoRA hash: stable when
    only the metadata header is edited); of the whole file for other formats."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if path.lower().endswith(".safetensors"):
            head = handle.read(8)
            if len(head) == 8:
                handle.seek(8 + int.from_bytes(head, "little"))
            else:
                handle.seek(0)
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


_HASHES: dict[str, tuple[tuple[int, int], str]] = {}


def cached_tensor_sha256(path: str) -> str:
    stat = os.stat(path)
    stamp = (stat.st_size, stat.st_mtime_ns)
    entry = _HASHES.get(path)
    if entry is None or entry[0] != stamp:
        entry = (stamp, tensor_sha256(path))
        _HASHES[path] = entry
    return entry[1]


def adapter_info(path: str, metadata: dict, roots: list[str]) -> AdapterInfo:
    """Trigger words (sidecars first, then the file's metadata, without repeats) and hash of one file."""
    words, weight, sources = sidecar_trigger_words(path, roots)
    from_metadata, key = metadata_trigger_words(metadata or {})
    if from_metadata and not (words and key == "ss_tag_frequency"):  # tags only when nothing names the trigger
        words = _unique(words + from_metadata)
        sources.append(f"metadata {key}")
    name = os.path.splitext(os.path.basename(path))[0]
    return AdapterInfo(name, words, weight, sources, cached_tensor_sha256(path))


def hashes_text(infos: list[AdapterInfo]) -> str:
    """sd-webui's "Lora hashes" value: `name: hash, name: hash` (one entry per file)."""
    seen, entries = set(), []
    for info in infos:
        if info.short_hash and info.name not in seen:
            seen.add(info.name)
            entries.append(info.hash_entry())
    return ", ".join(entries)


def trigger_text(infos: list[AdapterInfo]) -> str:
    """Every file's trigger words, comma-separated, each once, in stack order."""
    return ", ".join(_unique([w for info in infos for w in info.trigger_words]))
