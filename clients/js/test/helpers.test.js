// Pure helpers of the client: frame parsing and the backoff schedule.

import { test } from "node:test";
import assert from "node:assert/strict";

import { backoffDelay, parseFrame, FATAL_CLOSE_CODES } from "../broadcaster-client.js";

test("parseFrame splits NDJSON and skips blank lines", () => {
  const { messages, errors } = parseFrame('{"type":"a"}\n\n  {"type":"b","data":"x\\ny"}  \n');
  assert.deepEqual(messages, [{ type: "a" }, { type: "b", data: "x\ny" }]);
  assert.deepEqual(errors, []);
});

test("parseFrame reports lines that are not JSON objects", () => {
  const { messages, errors } = parseFrame('{"type":"a"}\n[1]\n42\nnope\n{"type":"b"}');
  assert.deepEqual(messages, [{ type: "a" }, { type: "b" }]);
  assert.deepEqual(
    errors.map((e) => e.line),
    ["[1]", "42", "nope"],
  );
});

test("backoffDelay grows exponentially up to maxMs", () => {
  const cfg = { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0 };
  assert.deepEqual(
    [0, 1, 2, 3, 4, 10].map((n) => backoffDelay(n, cfg)),
    [100, 200, 400, 800, 1000, 1000],
  );
});

test("backoffDelay jitter stays within [delay * (1 - jitter), delay]", () => {
  const cfg = { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0.5 };
  assert.equal(backoffDelay(2, cfg, () => 0), 400);
  assert.equal(backoffDelay(2, cfg, () => 1), 200);
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(3, cfg);
    assert.ok(d >= 400 && d <= 800, `delay ${d}`);
  }
});

test("fatal close codes are the refusals", () => {
  assert.deepEqual([...FATAL_CLOSE_CODES], [4400, 4401, 4403, 4404]);
});
