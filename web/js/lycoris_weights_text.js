// The named block-weight text ("IN04=0.5, OUT03-OUT05=0") the block-weight editor writes and
// reads back. Pure functions, no ComfyUI imports: the browser test imports this module directly.
//
// Writing follows the front-end contract of LyCORIS Block Weight: only the ids whose value is not
// 1, in the architecture's block order, runs of equal values inside one group written as a range,
// joined by ", "; every block at 1 gives "". Reading understands the part of the named syntax a
// person types by hand (ids, IN4-style short ids, MID, ranges, groups, globs, * / ALL, DEFAULT)
// with plain numbers; anything else (random tokens, A/B, Inspire or LBW vectors, % shorthand) is
// left to the node, which reads every dialect: `parseNamedWeights` then says why it cannot show it.

/** The group prefix of a block id: "IN04" -> "IN", "S07" -> "S", "TE2" -> "TE", "BASE" -> "BASE". */
export function idGroup(blockId) {
	const match = /^([A-Z]+)/.exec(blockId);
	return match ? match[1] : blockId;
}

/** A weight as short text: at most 6 significant digits, no "-0". */
export function formatValue(value) {
	const text = String(Number(Number(value).toPrecision(6)));
	return text === "-0" ? "0" : text;
}

/** The weights text for `values` ({id: number}) over `ids` (the architecture's order). */
export function formatWeights(ids, values) {
	const parts = [];
	let i = 0;
	while (i < ids.length) {
		const value = values[ids[i]] ?? 1;
		let j = i;
		while (j + 1 < ids.length && idGroup(ids[j + 1]) === idGroup(ids[i]) && (values[ids[j + 1]] ?? 1) === value) {
			j += 1;
		}
		if (value !== 1) {
			parts.push(`${i === j ? ids[i] : `${ids[i]}-${ids[j]}`}=${formatValue(value)}`);
		}
		i = j + 1;
	}
	return parts.join(", ");
}

const NUMBER = /^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$/;
const SHORT_ID = /^([A-Z]+)(\d+)$/;

function normalId(selector, ids) {
	if (ids.includes(selector)) return selector;
	if (selector === "MID" && ids.includes("M00")) return "M00";
	const short = SHORT_ID.exec(selector);
	if (!short) return null;
	return ids.find((id) => {
		const full = SHORT_ID.exec(id);
		return full && full[1] === short[1] && Number(full[2]) === Number(short[2]);
	}) ?? null;
}

function globRegExp(glob) {
	const body = glob.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
	return new RegExp(`^${body}$`);
}

/** The ids a selector names, or a string saying why it names none. */
function select(selector, ids) {
	if (selector === "*" || selector === "ALL") return [...ids];
	const exact = normalId(selector, ids);
	if (exact) return [exact];
	if (/[*?]/.test(selector)) {
		const pattern = globRegExp(selector);
		const hit = ids.filter((id) => pattern.test(id));
		if (hit.length) return hit;
	} else if (selector.includes("-")) {
		const [low, high] = selector.split("-", 2).map((part) => normalId(part.trim(), ids));
		if (low && high) {
			const [i, j] = [ids.indexOf(low), ids.indexOf(high)];
			return i <= j ? ids.slice(i, j + 1) : `range ${selector}: ${low} comes after ${high}`;
		}
	} else {
		const group = ids.filter((id) => idGroup(id) === selector);
		if (group.length) return group;
	}
	return `'${selector}' names no block here`;
}

/**
 * Read `text` for `ids`. Returns {values} ({id: number} for every id) when the editor can show it,
 * or {error} with a one-line reason when only the node can read it (another dialect, a token).
 * `presets` ({name: {id: value}}) lets a bare preset name in the text show that preset's values.
 */
export function parseNamedWeights(text, ids, presets = {}) {
	const body = (text ?? "").trim();
	const ones = Object.fromEntries(ids.map((id) => [id, 1]));
	if (!body) return { values: ones };
	if (presets[body]) return { values: { ...ones, ...presets[body] }, preset: body };
	if (body.startsWith("%") || !body.includes("=")) {
		return { error: "not in the named syntax (a vector, a preset name or % shorthand)" };
	}
	let fallback = 1;
	const assignments = [];
	for (const raw of body.split(/[,;\n]+/)) {
		const item = raw.trim();
		if (!item) continue;
		const at = item.indexOf("=");
		if (at < 0) return { error: `'${item}' is not SELECTOR=VALUE` };
		const selector = item.slice(0, at).trim().toUpperCase();
		const valueText = item.slice(at + 1).trim();
		if (!NUMBER.test(valueText)) return { error: `'${item}': only plain numbers are shown here` };
		const value = Number(valueText);
		if (selector === "DEFAULT") {
			fallback = value;
			continue;
		}
		const targets = select(selector, ids);
		if (typeof targets === "string") return { error: targets };
		assignments.push([targets, value]);
	}
	const values = Object.fromEntries(ids.map((id) => [id, fallback]));
	for (const [targets, value] of assignments) {
		for (const id of targets) values[id] = value;
	}
	return { values };
}
