// The pack's example workflows name its test files (e2e_tiny_sd15.safetensors, ...). A node of an
// example lists its file widgets in the property `lycoris_example_files`; when such a widget names a
// file this ComfyUI does not list, the first file it does list is put in its place, so the example runs
// as opened (its Note says to pick your own). Nodes without the property (every workflow of a user)
// are never touched: a missing file there stays an error the user sees.

import { app } from "../../scripts/app.js";
import { findWidget } from "./lycoris_common.js";

/** The first listed file to use instead of `value`, or null when `value` is listed (or nothing is). */
export function fallbackFile(value, listed) {
	if (!Array.isArray(listed) || listed.includes(value)) return null;
	return listed.find((name) => name !== "none") ?? null;
}

app.registerExtension({
	name: "lycorisnodepack.ExampleFiles",
	loadedGraphNode(node) {
		const files = node.properties?.lycoris_example_files;
		if (!Array.isArray(files)) return;
		for (const name of files) {
			const widget = findWidget(node, name);
			const values = widget?.options?.values;
			const listed = typeof values === "function" ? values(widget) : values;
			const replacement = fallbackFile(widget?.value, listed);
			if (replacement == null) continue;
			console.info(`[lycoris] example workflow: ${node.type} ${name} '${widget.value}' is not here; using '${replacement}'`);
			widget.value = replacement;
			widget.callback?.(replacement);
		}
	},
});
