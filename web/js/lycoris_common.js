// Shared by the pack's front-end extensions: JSON from the pack's read-only routes, a small panel
// DOM widget that works on the March-2024 front-end and on the current one, and the styles.
// ComfyUI imports every .js file of WEB_DIRECTORY; this one registers no extension of its own.

import { api } from "../../scripts/api.js";

const PANEL_MARGIN = 10;

/** GET a pack route; resolves to the JSON body, or throws an Error with the route's one-line reason. */
export async function fetchJson(path) {
	const response = await api.fetchApi(path);
	let body = null;
	try {
		body = await response.json();
	} catch {
		// not JSON: reported below with the status
	}
	if (!response.ok) {
		throw new Error(body?.error ?? `${path.split("?")[0]} answered ${response.status}`);
	}
	return body;
}

/** A route answer cached per path (file headers and block tables do not change while the page is open). */
const cache = new Map();
export function fetchCached(path) {
	if (!cache.has(path)) {
		const answer = fetchJson(path);
		answer.catch(() => cache.delete(path)); // a refused answer is asked again next time
		cache.set(path, answer);
	}
	return cache.get(path);
}

export function findWidget(node, name) {
	return node.widgets?.find((widget) => widget.name === name);
}

/** A DOM element: tag with optional ".class" suffixes, properties, children. */
export function el(spec, props = {}, children = []) {
	const [tag, ...classes] = spec.split(".");
	const element = document.createElement(tag || "div");
	if (classes.length) element.className = classes.join(" ");
	for (const [key, value] of Object.entries(props)) {
		if (key === "dataset") Object.assign(element.dataset, value);
		else if (key in element) element[key] = value;
		else element.setAttribute(key, value);
	}
	for (const child of [].concat(children)) {
		if (child != null) element.append(child);
	}
	return element;
}

/**
 * Add `element` to `node` as a display-only DOM widget: nothing of it goes into the saved workflow
 * or the queued prompt (both front-ends honour `options.serialize === false` for the prompt; the
 * new one also skips `widget.serialize === false` when saving the workflow).
 * `height()` is the height the content wants; the node is grown to give it that much, up to
 * `maxHeight` (beyond that the panel scrolls until the node is made taller).
 */
export function addPanelWidget(node, name, element, { height, maxHeight = 1e9 }) {
	// both front-ends inset DOM widgets by PANEL_MARGIN on each side
	const full = () => height() + 2 * PANEL_MARGIN;
	const least = () => Math.min(height(), maxHeight) + 2 * PANEL_MARGIN;

	const widget = node.addDOMWidget(name, "lycoris-panel", element, {
		serialize: false,
		hideOnZoom: true,
		getValue: () => undefined,
		setValue: () => {},
		getMinHeight: least,
		getHeight: full,
		getMaxHeight: full,
	});
	widget.serialize = false;
	if (!node.lycorisTrimsPanels) {
		// the March-2024 front-end saves every widget's value: drop the panels' nulls at the end
		node.lycorisTrimsPanels = true;
		const onSerialize = node.onSerialize;
		node.onSerialize = function (data) {
			const values = data.widgets_values;
			let keep = this.widgets?.length ?? 0;
			while (keep > 0 && this.widgets[keep - 1].type === "lycoris-panel") keep -= 1;
			if (Array.isArray(values) && values.length > keep) values.length = keep;
			return onSerialize?.apply(this, arguments);
		};
	}
	return widget;
}

/** Grow the node (never shrink it) so its widgets fit: a panel's content changed. Calling setSize
 * also makes the March-2024 front-end lay its DOM widgets out again (its computeSize ignores them). */
export function fitNode(node, minWidth = 0) {
	const wanted = node.computeSize();
	node.setSize([Math.max(node.size[0], wanted[0], minWidth), Math.max(node.size[1], wanted[1])]);
	node.setDirtyCanvas?.(true, true);
}

const WATCH_INTERVAL_MS = 250;
const watched = new Set();
let watchTimer = null;

function runWatchers() {
	for (const entry of watched) {
		if (!entry.node.graph) continue; // between a removal and its onRemoved
		try {
			entry.check();
		} catch (error) {
			console.error("[lycoris]", error);
		}
	}
}

/** Run `check()` every WATCH_INTERVAL_MS while the node is in a graph: the one way to see changes that
 * come without an event of their own (a value set by code, a link made elsewhere) on both front-ends.
 * It cannot hang on drawing: with Vue node rendering ("Nodes 2.0") the canvas never draws the node. */
export function watchNode(node, check) {
	const entry = { node, check };
	watched.add(entry);
	const onRemoved = node.onRemoved;
	node.onRemoved = function (...args) {
		watched.delete(entry);
		return onRemoved?.apply(this, args);
	};
	watchTimer ??= setInterval(runWatchers, WATCH_INTERVAL_MS);
}

/** Call `after(value)` after the widget's own callback, whoever changes it (a menu, a workflow load). */
export function chainCallback(widget, after) {
	if (!widget) return;
	const previous = widget.callback;
	widget.callback = function (...args) {
		const result = previous?.apply(this, args);
		after(widget.value, ...args);
		return result;
	};
}

const STYLE = `
.lycoris-panel { box-sizing: border-box; overflow: auto; font: 11px/1.35 sans-serif; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #4e4e4e); border-radius: 6px;
  padding: 4px 6px; }
.lycoris-panel .lycoris-note { color: var(--descrip-text, #999); white-space: pre-wrap; }
.lycoris-panel .lycoris-error { color: var(--error-text, #ff4444); white-space: pre-wrap; }
.lycoris-panel .lycoris-line { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.lycoris-panel .lycoris-key { color: var(--descrip-text, #999); }
.lycoris-blocks .lycoris-row { display: flex; align-items: flex-start; margin: 2px 0; }
.lycoris-blocks .lycoris-cells { display: flex; flex-wrap: wrap; gap: 2px; flex: 1; }
.lycoris-blocks .lycoris-group { width: 34px; flex: none; color: var(--descrip-text, #999); font-weight: bold;
  padding-top: 11px; }
.lycoris-blocks .lycoris-cell { display: flex; flex-direction: column; align-items: center; width: 40px; flex: none; }
.lycoris-blocks .lycoris-cell span { font-size: 9px; color: var(--descrip-text, #999); line-height: 10px; height: 10px; }
.lycoris-blocks input { width: 38px; box-sizing: border-box; padding: 1px 2px; font-size: 11px; text-align: right;
  background: var(--comfy-menu-bg, #353535); color: var(--input-text, #ddd); border: 1px solid var(--border-color, #4e4e4e);
  border-radius: 3px; -moz-appearance: textfield; }
.lycoris-blocks input::-webkit-outer-spin-button, .lycoris-blocks input::-webkit-inner-spin-button {
  -webkit-appearance: none; margin: 0; }
.lycoris-blocks input.lycoris-off { color: #f88; }
.lycoris-blocks input.lycoris-changed { border-color: #6a8fcf; }
.lycoris-blocks input:disabled { opacity: 0.45; }
`;

export function addStyles() {
	if (document.getElementById("lycoris-styles")) return;
	document.head.append(el("style", { id: "lycoris-styles", textContent: STYLE }));
}
