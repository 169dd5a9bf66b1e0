// The entity map of the client (#17 item 3): whole entities from ws.state, upserts, appends, deletes.

import { test } from "node:test";
import assert from "node:assert/strict";

import { applyPatch, applyToEntities, mergeAppend } from "../broadcaster-client.js";

const ev = (seq, key, data, op) => ({ type: "llm.message", conv_id: "c", seq, id: `e${seq}`, ts: seq, data, key, ...(op ? { op } : {}) });

test("mergeAppend extends strings and replaces the rest", () => {
  assert.deepEqual(mergeAppend({ text: "He", n: 1 }, { text: "llo", n: "x" }), { text: "Hello", n: "x" });
  assert.deepEqual(mergeAppend(["not", "an", "object"], { text: "a" }), { text: "a" });
  assert.deepEqual(mergeAppend(undefined, { text: "a", m: { b: 1 } }), { text: "a", m: { b: 1 } });
});

test("applyToEntities keeps whole entities", () => {
  const map = new Map();
  applyToEntities(map, { type: "ws.state", conv_id: "c", seq: 2, entities: { a: ev(1, "a", { text: "He" }), b: ev(2, "b", { x: 1 }) } });
  const [[key, entity]] = applyToEntities(map, ev(3, "a", { text: "llo" }, "append"));
  assert.equal(key, "a");
  assert.deepEqual(entity, ev(3, "a", { text: "Hello" }));
  assert.equal("op" in entity, false);
  assert.deepEqual(applyToEntities(map, ev(4, "b", null)), [["b", null]]);
  assert.deepEqual(applyToEntities(map, ev(5, "b", null)), []);
  assert.deepEqual(applyToEntities(map, { type: "chat.x", conv_id: "c", seq: 6, data: 1 }), []);
  assert.deepEqual([...map.keys()], ["a"]);
  assert.deepEqual(applyToEntities(map, { type: "ws.reset", conv_id: "c", seq: 9 }), [["a", null]]);
  assert.equal(map.size, 0);
});

test("applyPatch: merge patch with $append and $set", () => {
  assert.deepEqual(applyPatch({ text: "Hel", n: 1, gone: 2, m: { a: 1 } }, { text: { $append: "lo" }, n: { $set: null }, gone: null, m: { b: { $set: { c: 1 } } }, l: [1] }), {
    text: "Hello",
    n: null,
    m: { a: 1, b: { c: 1 } },
    l: [1],
  });
  assert.deepEqual(applyPatch("not an object", { a: 1 }), { a: 1 });
});

test("applyToEntities applies a delta only against the version it was sent", () => {
  const map = new Map();
  applyToEntities(map, ev(1, "a", { text: "He", body: "x" }));
  const [[, entity]] = applyToEntities(map, { ...ev(2, "a", { text: { $append: "llo" } }), op: "delta", base: 1 });
  assert.deepEqual(entity, ev(2, "a", { text: "Hello", body: "x" }));
  assert.equal("base" in entity || "op" in entity, false);
  assert.deepEqual(applyToEntities(map, { ...ev(4, "a", { text: { $append: "!" } }), op: "delta", base: 3 }), [["a", null]]);
});
