// The report of every pack node that writes one (the loaders, Resize, Combine, Slice, Extract, Merge to
// checkpoint, Inspect), shown on the node itself after a run: a read-only text box filled from the
// node's "text" UI output. When the output carries warnings ("lycoris_warning": a file made for another
// base model, layers that did not land), the node turns orange and the warning is shown above the
// report; the next run without one restores the node's colours. Display only: nothing of it is saved
// in the workflow or queued. Works on the March-2024 front-end and the current one, canvas and Vue nodes.

import { app } from "../../scripts/app.js";
import { addPanelWidget, addStyles, el, fitNode } from "./lycoris_common.js";

const REPORT_NODES = new Set([
	"LycorisLoader", "LycorisLoaderModelOnly", "LycorisResize", "LycorisDyLoRASlice", "LycorisCombine",
	"LycorisExtract", "LycorisMergeToCheckpoint", "LycorisInspect",
]);
const LINE_HEIGHT = 14;
const MAX_LINES = 14;
// LiteGraph's title (color) and body (bgcolor) colours of a node in the warning state
export const WARNING_COLORS = { color: "#b0600c", bgcolor: "#6a3a12" };
const PLACEHOLDER = "report: shown here after a run";

const STYLE = `
.lycoris-report-panel textarea { box-sizing: border-box; width: 100%; resize: none; margin: 0; padding: 2px 4px;
  font: 11px/14px ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; overflow: auto;
  color: var(--input-text, #ddd); background: transparent; border: none; outline: none; }
.lycoris-report-panel .lycoris-warning { color: #ffb74d; font-weight: bold; white-space: pre-wrap; margin-bottom: 3px; }
.lycoris-report-panel .lycoris-warning:empty { display: none; }
`;

function addReportStyles() {
	addStyles();
	if (document.getElementById("lycoris-report-styles")) return;
	document.head.append(el("style", { id: "lycoris-report-styles", textContent: STYLE }));
}

/** Put the node in the warning state (or take it out), keeping the colours the user gave it. */
export function setWarningState(node, warning) {
	if (warning) {
		if (node.color !== WARNING_COLORS.color) {
			node.lycorisColors = { color: node.color, bgcolor: node.bgcolor };
		}
		node.color = WARNING_COLORS.color;
		node.bgcolor = WARNING_COLORS.bgcolor;
	} else if (node.color === WARNING_COLORS.color) {
		// a workflow saved in the warning state has no colours to go back to: the defaults
		node.color = node.lycorisColors?.color;
		node.bgcolor = node.lycorisColors?.bgcolor;
		delete node.lycorisColors;
	}
	node.setDirtyCanvas?.(true, true);
}

function addReportPanel(node) {
	const warning = el("div.lycoris-warning");
	const text = el("textarea", { readOnly: true, spellcheck: false, rows: 1, value: PLACEHOLDER });
	text.setAttribute("aria-label", "report");
	const panel = el("div.lycoris-panel.lycoris-report-panel", { dataset: { lycorisNode: String(node.id) } },
		[warning, text]);
	let lines = 1;
	let warningLines = 0;
	const contentHeight = () => (Math.min(lines, MAX_LINES) + warningLines) * LINE_HEIGHT + 12;
	addPanelWidget(node, "lycoris_report", panel, { height: contentHeight });

	const onExecuted = node.onExecuted;
	node.onExecuted = function (message) {
		onExecuted?.apply(this, arguments);
		panel.dataset.lycorisNode = String(node.id);
		const report = message?.text?.join?.("\n") ?? "";
		const warnings = (message?.lycoris_warning ?? []).filter(Boolean);
		text.value = report || PLACEHOLDER;
		lines = Math.max(1, text.value.split("\n").length);
		text.style.height = `${Math.min(lines, MAX_LINES) * LINE_HEIGHT + 4}px`;
		warning.textContent = warnings.join("\n");
		warningLines = warnings.length ? warnings.reduce((n, w) => n + Math.ceil(w.length / 70), 0) : 0;
		panel.classList.toggle("lycoris-has-warning", warnings.length > 0);
		setWarningState(node, warnings.length > 0);
		fitNode(node, warnings.length ? 420 : 0);
	};
}

app.registerExtension({
	name: "lycorisnodepack.Report",
	async nodeCreated(node) {
		if (!REPORT_NODES.has(node.comfyClass)) return;
		addReportStyles();
		addReportPanel(node);
	},
});
