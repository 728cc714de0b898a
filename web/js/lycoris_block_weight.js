// Block-weight editor on LyCORIS Block Weight: one number cell per block id of the model's
// architecture, grouped in rows (BASE, IN, M, OUT, TE / D, S, ...). The node's own widgets stay
// the source of truth: the editor only writes `weights` (named syntax, ids whose value is not 1)
// and sets `preset` to "none" when a cell is edited by hand; choosing a preset in the node's
// `preset` combo fills the cells from that preset and writes its weights. Block ids and preset
// values come from the server (GET /lycoris/blocks, /lycoris/architecture), so the editor shows
// what the node will read; with architecture "auto" it follows the `model` link up to the loader
// that names the model file.

import { app } from "../../scripts/app.js";
import { addPanelWidget, addStyles, chainCallback, el, fetchCached, findWidget, fitNode, watchNode } from "./lycoris_common.js";
import { formatValue, formatWeights, idGroup, parseNamedWeights } from "./lycoris_weights_text.js";

const NODE_CLASS = "LycorisBlockWeight";
const NONE = "none";
const AUTO = "auto";
// loader widgets that name a model file, and the folder list the server looks the name up in
const MODEL_FILE_WIDGETS = [["ckpt_name", "checkpoints"], ["unet_name", "diffusion_models"]];
const CELL_WIDTH = 42;
const GROUP_WIDTH = 36;
const ROW_HEIGHT = 30;
const LINE_HEIGHT = 15;
const MIN_WIDTH = 580;

/** The node feeding `node`'s input `slot`, on either front-end's graph. */
function inputNode(node, slot) {
	if (slot < 0 || node.inputs?.[slot]?.link == null) return null;
	return node.getInputNode?.(slot) ?? null;
}

/**
 * Where the block ids come from: {kind: "architecture", architecture}, {kind: "file", folder, name}
 * (the loader upstream of the model input) or {kind: "none", why}. Follows reroutes and any node
 * with a MODEL input (other loaders, model patches) up to a node with a model-file widget.
 */
export function blockSource(node) {
	const architecture = findWidget(node, "architecture")?.value ?? AUTO;
	if (architecture !== AUTO) return { kind: "architecture", architecture };
	let current = inputNode(node, node.inputs?.findIndex((input) => input.name === "model") ?? -1);
	const seen = new Set();
	while (current && !seen.has(current)) {
		seen.add(current);
		for (const [widgetName, folder] of MODEL_FILE_WIDGETS) {
			const widget = findWidget(current, widgetName);
			if (widget && typeof widget.value === "string" && widget.value) {
				return { kind: "file", folder, name: widget.value };
			}
		}
		const inputs = current.inputs ?? [];
		let slot = inputs.findIndex((input) => input.type === "MODEL");
		if (slot < 0 && inputs.length === 1) slot = 0; // a reroute: one untyped input
		current = inputNode(current, slot);
	}
	return {
		kind: "none",
		why: seen.size ? "the model does not come from a checkpoint or diffusion-model loader: pick the architecture"
			: "connect a model or pick the architecture",
	};
}

function sourceKey(source) {
	return source.kind === "file" ? `file:${source.folder}/${source.name}` : `${source.kind}:${source.architecture ?? source.why}`;
}

/** {architecture, ids, presets, from} for a block source; throws with the server's reason. */
async function loadTable(source) {
	if (source.kind === "none") return null;
	let architecture = source.architecture;
	let ids = null;
	if (source.kind === "file") {
		const query = `folder=${encodeURIComponent(source.folder)}&name=${encodeURIComponent(source.name)}`;
		const detected = await fetchCached(`/lycoris/architecture?${query}`);
		if (!detected.architecture || detected.architecture === "unknown") {
			throw new Error(`cannot tell the architecture of ${source.name}: pick it in 'architecture'`);
		}
		architecture = detected.architecture;
		ids = detected.ids;
	}
	const blocks = await fetchCached(`/lycoris/blocks?architecture=${encodeURIComponent(architecture)}`);
	ids = ids?.length ? ids : blocks.ids;
	const presets = {};
	for (const [name, values] of Object.entries(blocks.presets ?? {})) {
		presets[name] = Object.fromEntries(ids.map((id) => [id, values[id] ?? 1]));
	}
	return { architecture: blocks.architecture, ids, presets, from: source.kind === "file" ? source.name : null };
}

class BlockWeightEditor {
	constructor(node) {
		this.node = node;
		this.preset = findWidget(node, "preset");
		this.weights = findWidget(node, "weights");
		this.table = null;
		this.tableKey = null;
		this.loading = Promise.resolve();
		this.values = {};
		this.inputs = new Map();
		this.rendered = null; // [tableKey, preset, weights] last shown
		this.build();
	}

	build() {
		this.status = el("div.lycoris-line.lycoris-status");
		this.note = el("div.lycoris-note");
		this.grid = el("div.lycoris-grid");
		this.report = el("div.lycoris-note.lycoris-report");
		this.element = el("div.lycoris-panel.lycoris-blocks", {}, [this.status, this.note, this.grid, this.report]);
		addPanelWidget(this.node, "lycoris_block_editor", this.element, {
			height: () => this.contentHeight(),
			maxHeight: 340,
		});
		chainCallback(this.preset, (value) => this.presetChosen(value));
		chainCallback(this.weights, () => this.sync());
		chainCallback(findWidget(this.node, "architecture"), () => this.sync());
		const onConnectionsChange = this.node.onConnectionsChange;
		this.node.onConnectionsChange = (...args) => {
			onConnectionsChange?.apply(this.node, args);
			setTimeout(() => this.sync(), 0);
		};
		watchNode(this.node, () => this.sync());
		const onExecuted = this.node.onExecuted;
		this.node.onExecuted = (message) => {
			onExecuted?.call(this.node, message);
			const text = message?.text?.join?.("\n") ?? "";
			this.report.textContent = text.split("\n")[0] ?? "";
			this.report.title = text;
			fitNode(this.node);
		};
		if (this.node.size[0] < MIN_WIDTH) this.node.setSize([MIN_WIDTH, this.node.size[1]]);
		setTimeout(() => this.sync(), 0);
	}

	/** The height the content needs: measured while shown, else computed from the node's width. */
	contentHeight() {
		const parts = [this.status, this.grid, this.note, this.report];
		const measured = parts.reduce((sum, part) => sum + part.offsetHeight, 0);
		if (this.element.offsetParent && measured > 0) return measured + 12;
		const perLine = Math.max(1, Math.floor((this.node.size[0] - 20 - 14 - GROUP_WIDTH) / CELL_WIDTH));
		let lines = 0;
		for (const count of this.groupCounts()) lines += Math.ceil(count / perLine);
		const notes = 1 + (this.note.textContent ? 1 : 0) + (this.report.textContent ? 1 : 0);
		return lines * ROW_HEIGHT + notes * LINE_HEIGHT + 12;
	}

	groupCounts() {
		const counts = new Map();
		for (const id of this.table?.ids ?? []) counts.set(idGroup(id), (counts.get(idGroup(id)) ?? 0) + 1);
		return [...counts.values()];
	}

	/** Bring the editor in line with the node: a new block source loads its table, changed text re-renders. */
	sync() {
		this.element.dataset.lycorisNode = String(this.node.id);
		const source = blockSource(this.node);
		const key = sourceKey(source);
		if (key !== this.tableKey) {
			this.tableKey = key;
			this.loading = this.load(source, key);
			return;
		}
		const state = [this.tableKey, this.preset?.value, this.weights?.value];
		if (!this.rendered || state.some((value, i) => value !== this.rendered[i])) this.render();
	}

	async load(source, key) {
		this.table = null;
		this.buildCells();
		this.status.textContent = source.kind === "none" ? "" : "reading the model's blocks…";
		this.note.className = "lycoris-note";
		this.note.textContent = source.kind === "none" ? source.why : "";
		let table = null;
		let failure = null;
		try {
			table = await loadTable(source);
		} catch (error) {
			failure = error.message;
		}
		if (key !== this.tableKey) return; // a newer source took over meanwhile
		this.table = table;
		this.buildCells();
		this.render();
		if (failure) {
			this.note.className = "lycoris-error";
			this.note.textContent = failure;
		}
		fitNode(this.node, MIN_WIDTH);
	}

	buildCells() {
		this.inputs.clear();
		const rows = [];
		let row = null;
		let cells = null;
		for (const id of this.table?.ids ?? []) {
			const group = idGroup(id);
			if (!row || row.dataset.group !== group) {
				cells = el("div.lycoris-cells");
				row = el("div.lycoris-row", { dataset: { group } }, [el("span.lycoris-group", { textContent: group }), cells]);
				rows.push(row);
			}
			const input = el("input", { type: "number", step: "0.05", value: "1", title: id, dataset: { lycorisBlock: id } });
			input.addEventListener("input", () => this.cellEdited(id, input, false));
			input.addEventListener("change", () => this.cellEdited(id, input, true));
			this.inputs.set(id, input);
			const label = id === group ? "" : id.slice(group.length);
			cells.append(el("label.lycoris-cell", {}, [el("span", { textContent: label }), input]));
		}
		this.grid.replaceChildren(...rows);
	}

	/** Show the node's current preset / weights in the cells. */
	render() {
		this.rendered = [this.tableKey, this.preset?.value, this.weights?.value];
		if (!this.table) {
			this.setEnabled(false);
			return;
		}
		const { architecture, ids, presets, from } = this.table;
		const preset = this.preset?.value ?? NONE;
		const text = this.weights?.value ?? "";
		let what;
		let note = "";
		let values = null;
		if (text.trim()) {
			const read = parseNamedWeights(text, ids, presets);
			if (read.error) {
				note = `weights (read-only here, the node reads it): ${text.trim()}\n${read.error}`;
			} else {
				values = read.values;
			}
			what = read.preset ? `preset ${read.preset} (typed)` : "weights";
			if (values && preset !== NONE && presets[preset] && formatWeights(ids, values) === formatWeights(ids, presets[preset])) {
				what = `preset ${preset}`;
			}
		} else if (preset !== NONE) {
			values = presets[preset] ? { ...presets[preset] } : null;
			if (!values) note = `preset ${preset} does not read for ${architecture}: the node will say why`;
			what = `preset ${preset}`;
		} else {
			values = Object.fromEntries(ids.map((id) => [id, 1]));
			what = "every block at 1";
		}
		this.status.textContent = `${architecture} · ${ids.length} blocks${from ? ` of ${from}` : ""} · ${what}`;
		this.status.title = this.status.textContent;
		this.note.className = "lycoris-note";
		this.note.textContent = note;
		this.values = values ?? {};
		for (const [id, input] of this.inputs) {
			const value = this.values[id];
			if (value === undefined) {
				input.value = "";
			} else if (document.activeElement !== input || input.valueAsNumber !== value) {
				input.value = formatValue(value);
			}
			this.markCell(input, value);
		}
		this.setEnabled(values !== null);
	}

	setEnabled(enabled) {
		for (const input of this.inputs.values()) input.disabled = !enabled;
	}

	markCell(input, value) {
		input.classList.toggle("lycoris-changed", value !== undefined && value !== 1);
		input.classList.toggle("lycoris-off", value === 0);
	}

	/** A cell typed into: the weights text follows and the preset no longer applies. */
	cellEdited(id, input, committed) {
		if (!this.table) return;
		const value = input.valueAsNumber;
		if (Number.isNaN(value)) {
			if (committed) input.value = formatValue(this.values[id] ?? 1); // left empty or invalid: put it back
			return;
		}
		if (!(id in this.values)) this.values = Object.fromEntries(this.table.ids.map((block) => [block, 1]));
		this.values[id] = value;
		this.markCell(input, value);
		if (this.preset && this.preset.value !== NONE) this.preset.value = NONE;
		this.writeWeights(formatWeights(this.table.ids, this.values));
	}

	/** The preset combo changed (by a person or a workflow): its values become the weights. */
	async presetChosen(preset) {
		if (preset === NONE) {
			this.sync();
			return;
		}
		await this.loading;
		if (this.preset?.value !== preset) return; // changed again meanwhile
		const values = this.table?.presets[preset];
		// without a table (no architecture yet) or for a preset of another family, the node reads the
		// preset by name: the weights must then be empty, or they would override it
		this.writeWeights(values ? formatWeights(this.table.ids, values) : "");
	}

	writeWeights(text) {
		if (this.weights && this.weights.value !== text) {
			this.weights.value = text; // (the textarea widget's setter runs its callback: sync, then nothing to do)
		}
		this.render();
		this.node.setDirtyCanvas?.(true, true);
		app.graph?.change?.();
	}
}

app.registerExtension({
	name: "lycorisnodepack.BlockWeightEditor",
	async nodeCreated(node) {
		if (node.comfyClass !== NODE_CLASS) return;
		addStyles();
		node.lycorisBlockEditor = new BlockWeightEditor(node);
	},
});
