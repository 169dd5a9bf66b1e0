-- broadcaster publish script (envelope version 1). One call = one event, atomically:
-- number it, append it to the history stream, remember its id, upsert the keyed state,
-- and fan it out on the conversation's live channel.
--
-- KEYS (P = key prefix, C = conversation id; the braces are the Redis Cluster hash tag)
--   [1] P:{C}:meta          hash: seq (last assigned), epoch
--   [2] P:{C}:log           stream: entry id <seq>-0, field p = payload
--   [3] P:{C}:live          pub/sub channel (a KEY, so SPUBLISH works on a cluster)
--   [4] P:{C}:state         hash: state key -> payload of its latest event
--   [5] P:{C}:state_order   zset: state key scored by the seq that last wrote it
--   [6] P:{C}:id:<event id> string: the seq first assigned to this event id
-- ARGV
--   [1] conversation id     [2] event id          [3] event type
--   [4] data, msgpack-encoded bytes (0xc0 = nil: with a state key, deletes the entry)
--   [5] state key ("" = none)
--   [6] history size (events kept, approximately: XADD MAXLEN ~)
--   [7] history ttl, seconds [8] idempotency ttl, seconds
--   [9] epoch to use if the conversation has none
--   [10] max state entries   [11] "1" to SPUBLISH (Redis Cluster), else PUBLISH
--   [12] max state bytes (optional; absent or 0 = no byte cap): the encoded size of all
--        state entries, tracked in meta field state_bytes; past it the oldest-updated go
-- Returns {seq, epoch, duplicate (0/1), state entries evicted}
--
-- The payload is the msgpack map {"v":1,"id","conv","seq","type","ts","data","epoch"}
-- (+ "key"), assembled from msgpack pieces: the data bytes are copied as they came,
-- never decoded (a Lua table cannot tell [] from {} and loses big integers). The few
-- scalars are encoded below rather than with cmsgpack, so the script also runs where
-- cmsgpack is missing (fakeredis, some Redis-compatible servers).

local function mp_str(s)
  local n = #s
  if n < 32 then
    return string.char(0xa0 + n) .. s
  elseif n < 256 then
    return string.char(0xd9, n) .. s
  elseif n < 65536 then
    return string.char(0xda, math.floor(n / 256), n % 256) .. s
  end
  return string.char(0xdb, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256) .. s
end

local function be32(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256)
end

local function mp_uint(n) -- 0 <= n < 2^53, exact in a Lua number; smallest form, like msgpack-python
  if n < 128 then
    return string.char(n)
  elseif n < 256 then
    return string.char(0xcc, n)
  elseif n < 65536 then
    return string.char(0xcd, math.floor(n / 256), n % 256)
  elseif n < 4294967296 then
    return string.char(0xce) .. be32(n)
  end
  return string.char(0xcf) .. be32(math.floor(n / 4294967296)) .. be32(n % 4294967296)
end

local meta, log, live, state, order, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local conv, event_id, etype, data, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local history_ttl = ARGV[7]

local epoch = redis.call('HGET', meta, 'epoch')
local fresh = not epoch
if epoch then
  local first = redis.call('GET', idem)
  if first then
    return {tonumber(first), epoch, 1, 0}
  end
else
  -- A new numbering starts: whatever outlived the old one is stale (an id key
  -- included: it refers to a seq of the lost epoch).
  redis.call('DEL', log, state, order, idem)
  epoch = ARGV[9]
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
end

local seq = redis.call('HINCRBY', meta, 'seq', 1)
local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local parts = {
  string.char(key ~= '' and 0x89 or 0x88),
  mp_str('v'), mp_uint(1),
  mp_str('id'), mp_str(event_id),
  mp_str('conv'), mp_str(conv),
  mp_str('seq'), mp_uint(seq),
  mp_str('type'), mp_str(etype),
  mp_str('ts'), mp_uint(ts),
  mp_str('data'), data,
  mp_str('epoch'), mp_str(epoch),
}
if key ~= '' then
  parts[#parts + 1] = mp_str('key')
  parts[#parts + 1] = mp_str(key)
end
local payload = table.concat(parts)

redis.call('XADD', log, 'MAXLEN', '~', ARGV[6], seq .. '-0', 'p', payload)
redis.call('SET', idem, seq, 'EX', ARGV[8])

local evicted = 0
if key ~= '' then
  local previous = redis.call('HSTRLEN', state, key)
  if data == '\192' then
    if redis.call('HDEL', state, key) == 1 then
      redis.call('HINCRBY', meta, 'state_bytes', -previous)
    end
    redis.call('ZREM', order, key)
  else
    redis.call('HSET', state, key, payload)
    redis.call('ZADD', order, seq, key)
    local bytes = redis.call('HINCRBY', meta, 'state_bytes', #payload - previous)
    local cap = tonumber(ARGV[10])
    local max_bytes = tonumber(ARGV[12] or '0') or 0
    local count = redis.call('ZCARD', order)
    -- evict oldest-updated first; the entry just written (the newest) always stays
    while count > cap or (max_bytes > 0 and bytes > max_bytes and count > 1) do
      local oldest = redis.call('ZPOPMIN', order)
      local size = redis.call('HSTRLEN', state, oldest[1])
      redis.call('HDEL', state, oldest[1])
      bytes = redis.call('HINCRBY', meta, 'state_bytes', -size)
      count = count - 1
      evicted = evicted + 1
    end
  end
end

-- Refresh the conversation's TTL. Four EXPIREs per event are a large share of the script's
-- cost, so they are skipped while the TTL is within `slack` seconds of full (at most 60 s,
-- 1% of the TTL): a conversation may expire up to that much earlier than exactly
-- history-ttl after its last publish. Keys just created (a new epoch, a log started after a
-- read created the epoch, a state hash that had emptied) have no TTL yet and always get one.
local ttl = tonumber(history_ttl)
local slack = math.min(60, math.floor(ttl / 100))
if fresh or redis.call('TTL', meta) < ttl - slack or redis.call('TTL', log) == -1 then
  redis.call('EXPIRE', meta, history_ttl)
  redis.call('EXPIRE', log, history_ttl)
  redis.call('EXPIRE', state, history_ttl)
  redis.call('EXPIRE', order, history_ttl)
elseif key ~= '' and redis.call('TTL', state) == -1 then
  redis.call('EXPIRE', state, history_ttl)
  redis.call('EXPIRE', order, history_ttl)
end

if ARGV[11] == '1' then
  redis.call('SPUBLISH', live, payload)
else
  redis.call('PUBLISH', live, payload)
end
return {seq, epoch, 0, evicted}
