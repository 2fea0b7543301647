// The page's packing code (src/heinfer.js) on a spec and an input from stdin (JSON
// {spec, x, vectors}); prints the packed slot vectors (as [ct, slot, value] triples of the non-zero
// slots), the unpacked outputs of `vectors`, and finishOutput of them. tests/test_browser.py
// compares this slot for slot with the Python SDK's packing for every zoo model.
import { finishOutput, pack, unpack } from "../src/heinfer.js";

let text = "";
for await (const chunk of process.stdin) text += chunk;
const { spec, x, vectors } = JSON.parse(text);
const packed = pack(spec.packing, Float64Array.from(x));
const nonzero = [];
packed.forEach((v, ct) => v.forEach((val, slot) => { if (val !== 0) nonzero.push([ct, slot, val]); }));
const decoded = unpack(spec.packing, vectors.map((v) => Float64Array.from(v)));
console.log(JSON.stringify({ nonzero, decoded: Array.from(decoded),
                             logits: Array.from(finishOutput(spec, decoded, Float64Array.from(x))) }));
