// Copies the contract (../../proto/policyd) into this package, so the published package carries
// the exact .proto files its types were generated from.
const fs = require("node:fs");
const path = require("node:path");

const source = path.resolve(__dirname, "..", "..", "..", "proto", "policyd");
const target = path.resolve(__dirname, "..", "proto", "policyd");
fs.rmSync(target, { recursive: true, force: true });
fs.cpSync(source, target, { recursive: true });
console.log(`copied ${source} -> ${target}`);
