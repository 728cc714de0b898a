// Info panel on the LyCORIS loaders: what the selected file holds (algorithm mix, ranks, base
// model, trigger words), read by the server's GET /lycoris/info, which only opens files ComfyUI
// lists in its loras folders. Display only: nothing of it is saved or queued. The loader's report
// after a run is shown by lycoris_report.js.

import { app } from "../../scripts/app.js";
import { blockSource } from "./lycoris_block_weight.js";
import { addPanelWidget, addStyles, chainCallback, el, fetchCached, findWidget, fitNode, watchNode } from "./lycoris_common.js";

const LOADERS = new Set(["LycorisLoader", "LycorisLoaderModelOnly"]);
const LINE_HEIGHT = 15;

function baseModel(summary) {
	const training = summary.training ?? {};
	return training["modelspec.architecture"] ?? training.ss_base_model_version ?? training.ss_sd_model_name ?? null;
}

/** The base model as recorded (and as users name it), or as read from the layers when not recorded. */
function baseLine(summary, trainedFor) {
	const recorded = baseModel(summary);
	const family = trainedFor?.name;
	if (recorded) return family ? `${recorded} (${family})` : recorded;
	return family ? `${family} (from its layers)` : "not in the file's metadata";
}

function line(key, value, title) {
	return el("div.lycoris-line", { title: title ?? String(value) }, [el("span.lycoris-key", { textContent: `${key}: ` }), String(value)]);
}

/** The panel's lines for a /lycoris/info answer. */
export function infoLines(info) {
	const summary = info.summary;
	const algorithms = Object.entries(summary.algorithms ?? {}).map(([algo, count]) => `${algo} ×${count}`).join(", ") || "none";
	const ranks = (summary.ranks ?? []).join(", ") || "-";
	const alphas = (summary.alphas ?? []).map((alpha) => Number(alpha.toPrecision(4))).join(", ") || "-";
	const size = summary.size_bytes == null ? "" : `, ${(summary.size_bytes / 2 ** 20).toFixed(2)} MiB`;
	const triggers = (summary.trigger_words ?? []).map(([word]) => word);
	const lines = [
		line("algorithms", `${algorithms} (${summary.modules} modules${size})`),
		line("rank", `${ranks}   alpha: ${alphas}`),
		line("base model", baseLine(summary, info.trained_for)),
		line("trigger words", triggers.length ? triggers.slice(0, 8).join(", ") + (triggers.length > 8 ? ", …" : "") : "none recorded",
			triggers.join(", ")),
	];
	if ((summary.problems ?? []).length || (summary.unknown_keys ?? []).length) {
		const count = summary.problems.length + summary.unknown_keys.length;
		lines.push(el("div.lycoris-error", { textContent: `${count} key(s) not understood: see Inspect LyCORIS`, title: info.text }));
	}
	return lines;
}

function addInfoPanel(node) {
	// `lora_name` since the loaders took core's input names; `lycoris_name` before
	const nameWidget = findWidget(node, "lora_name") ?? findWidget(node, "lycoris_name");
	if (!nameWidget) return;
	const body = el("div.lycoris-info-body");
	const panel = el("div.lycoris-panel.lycoris-info", { title: "" }, [body]);
	let shown = null; // the file name the panel shows (or is loading)
	let lines = 1;

	const contentHeight = () => {
		const measured = body.offsetHeight;
		if (panel.offsetParent && measured > 0) return measured + 12;
		return Math.max(1, lines) * LINE_HEIGHT + 12;
	};
	addPanelWidget(node, "lycoris_info", panel, { height: contentHeight });

	const show = (children) => {
		body.replaceChildren(...children);
		lines = children.length;
		fitNode(node);
	};

	// the file's base model against the checkpoint the model input comes from, before anything runs
	const modelCheck = async (info, source) => {
		const file = info.trained_for;
		if (source.kind !== "file" || !file?.architecture) return [];
		const query = `folder=${encodeURIComponent(source.folder)}&name=${encodeURIComponent(source.name)}`;
		const model = await fetchCached(`/lycoris/architecture?${query}`).catch(() => null);
		if (!model?.architecture || model.architecture === "unknown" || model.architecture === file.architecture) return [];
		return [el("div.lycoris-error.lycoris-mismatch", {
			textContent: `${file.name} file, ${model.architecture} model (${source.name}): it will not fit`,
			title: `file: ${file.evidence}`,
		})];
	};

	const refresh = async () => {
		panel.dataset.lycorisNode = String(node.id);
		const source = blockSource(node);
		const name = nameWidget.value;
		const key = `${name}|${source.kind === "file" ? `${source.folder}/${source.name}` : ""}`;
		if (key === shown) return;
		shown = key;
		if (!name || name === "none") {
			show([el("div.lycoris-note", { textContent: "no file selected" })]);
			return;
		}
		show([el("div.lycoris-note", { textContent: `reading ${name}…` })]);
		try {
			const info = await fetchCached(`/lycoris/info?name=${encodeURIComponent(name)}`);
			const mismatch = await modelCheck(info, source);
			if (shown === key) {
				panel.title = info.text ?? "";
				show([...mismatch, ...infoLines(info)]);
			}
		} catch (error) {
			if (shown === key) {
				panel.title = "";
				show([el("div.lycoris-error", { textContent: `cannot show ${name}: ${error.message}` })]);
			}
		}
	};

	chainCallback(nameWidget, refresh);
	watchNode(node, refresh);
	setTimeout(refresh, 0);
}

app.registerExtension({
	name: "lycorisnodepack.AdapterInfo",
	async nodeCreated(node) {
		if (!LOADERS.has(node.comfyClass)) return;
		addStyles();
		addInfoPanel(node);
	},
});
