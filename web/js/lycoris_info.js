// Info panel on the LyCORIS loaders: what the selected file holds (algorithm mix, ranks, base
// model, trigger words), read by the server's GET /lycoris/info, which only opens files ComfyUI
// lists in its loras folders. Display only: nothing of it is saved or queued. After a run the
// loader's report (its "text" UI output) is shown under it.

import { app } from "../../scripts/app.js";
import { addPanelWidget, addStyles, chainCallback, el, fetchCached, findWidget, fitNode, watchNode } from "./lycoris_common.js";

const LOADERS = new Set(["LycorisLoader", "LycorisLoaderModelOnly"]);
const LINE_HEIGHT = 15;

function baseModel(summary) {
	const training = summary.training ?? {};
	return training["modelspec.architecture"] ?? training.ss_base_model_version ?? training.ss_sd_model_name ?? null;
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
		line("base model", baseModel(summary) ?? "not in the file's metadata"),
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
	const nameWidget = findWidget(node, "lycoris_name");
	if (!nameWidget) return;
	const body = el("div.lycoris-info-body");
	const report = el("div.lycoris-note.lycoris-line.lycoris-report");
	const panel = el("div.lycoris-panel.lycoris-info", { title: "" }, [body, report]);
	let shown = null; // the file name the panel shows (or is loading)
	let lines = 1;

	const contentHeight = () => {
		const measured = body.offsetHeight + report.offsetHeight;
		if (panel.offsetParent && measured > 0) return measured + 12;
		return (Math.max(1, lines) + (report.textContent ? 1 : 0)) * LINE_HEIGHT + 12;
	};
	addPanelWidget(node, "lycoris_info", panel, { height: contentHeight });

	const show = (children) => {
		body.replaceChildren(...children);
		lines = children.length;
		fitNode(node);
	};

	const refresh = async () => {
		panel.dataset.lycorisNode = String(node.id);
		const name = nameWidget.value;
		if (name === shown) return;
		shown = name;
		if (!name || name === "none") {
			show([el("div.lycoris-note", { textContent: "no file selected" })]);
			return;
		}
		show([el("div.lycoris-note", { textContent: `reading ${name}…` })]);
		try {
			const info = await fetchCached(`/lycoris/info?name=${encodeURIComponent(name)}`);
			if (shown === name) {
				panel.title = info.text ?? "";
				show(infoLines(info));
			}
		} catch (error) {
			if (shown === name) {
				panel.title = "";
				show([el("div.lycoris-error", { textContent: `cannot show ${name}: ${error.message}` })]);
			}
		}
	};

	chainCallback(nameWidget, refresh);
	watchNode(node, refresh);
	const onExecuted = node.onExecuted;
	node.onExecuted = function (message) {
		onExecuted?.apply(this, arguments);
		const text = message?.text?.join?.("\n") ?? "";
		report.textContent = text.split("\n")[0];
		report.title = text;
		fitNode(node);
	};
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
