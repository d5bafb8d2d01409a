// src/api/currencies.ts from the x-minor-units of docs/openapi.json's Currency schema:
// the exponent of every currency the service accepts, which Intl does not always agree with.
// `--check` fails when the committed file differs (CI), like openapi-typescript --check.
import { readFileSync, writeFileSync } from "node:fs";

const spec = JSON.parse(readFileSync(new URL("../../../docs/openapi.json", import.meta.url), "utf8"));
const units = spec.components.schemas.Currency["x-minor-units"];
const target = new URL("../src/api/currencies.ts", import.meta.url);
const text =
  "// Generated from docs/openapi.json by scripts/currencies.mjs (`make client`): do not edit.\n" +
  "/** ISO 4217 exponent (digits after the decimal point) of each currency the service accepts. */\n" +
  `export const MINOR_UNITS: Readonly<Record<string, number>> = ${JSON.stringify(units, null, 2)};\n`;

if (process.argv.includes("--check")) {
  let current = "";
  try {
    current = readFileSync(target, "utf8");
  } catch {}
  if (current !== text) {
    console.error("src/api/currencies.ts is out of date: run `make client`");
    process.exit(1);
  }
} else {
  writeFileSync(target, text);
}
