// Small helpers shared by the test files (kept outside test/ so the runner does not run them).

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Poll `predicate` until it returns a truthy value (returned), or fail after `timeoutMs`. */
export async function waitFor(predicate, { timeoutMs = 5000, intervalMs = 10, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/** Record every detail the client emits under `name`; returns the (live) array. */
export function record(client, name) {
  const seen = [];
  client.on(name, (detail) => seen.push(detail));
  return seen;
}

/** The next detail emitted under `name` that satisfies `predicate`. */
export function nextEmit(client, name, predicate = () => true, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out after ${timeoutMs} ms waiting for "${name}"`));
    }, timeoutMs);
    const off = client.on(name, (detail) => {
      if (!predicate(detail)) return;
      clearTimeout(timer);
      off();
      resolve(detail);
    });
  });
}

/** Subscribe `client` to each of `convs`; resolves once every one has had its "subscribed". */
export function subscribeAll(client, convs, timeoutMs = 10_000) {
  return Promise.all(convs.map((conv) => {
    const done = nextEmit(client, "subscribed", (m) => m.conv_id === conv, timeoutMs);
    client.subscribe(conv);
    return done;
  }));
}
