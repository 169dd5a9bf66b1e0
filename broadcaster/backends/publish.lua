-- broadcaster publish script (envelope version 1). One call publishes one event, or a
-- batch of events of one conversation, atomically: each is numbered, appended to the
-- history stream, its id remembered, the keyed state upserted, and it is fanned out on
-- the conversation's live channel.
--
-- Two ways to run it. As the publish function of the key prefix's function library
-- (FCALL <library>_publish: what the SDK, the gateways and the README's raw call use; the
-- gateways build and load it, scripts.build_library) it applies the conversation's
-- namespace policy and IGNORES the policy arguments below (history size and ttl, max
-- state entries and bytes), caps the id and batch key TTLs at the namespace's history
-- ttl and refuses data over its max_data_bytes (error "TOOLARGE ..."). As a script
-- (EVAL / EVALSHA: deprecated, for producers written before namespaces) it applies the
-- arguments as given. See POLICY below and docs/namespaces.md.
--
-- KEYS, both forms (P = key prefix, C = conversation id; the braces are the Redis
-- Cluster hash tag, so every key of a call lives in one slot)
--   [1] P:{C}:meta          hash: seq (last assigned), epoch, state_bytes
--   [2] P:{C}:log           stream: entry id <seq>-0, field p = payload
--   [3] P:{C}:live          pub/sub channel (a KEY, so SPUBLISH works on a cluster)
--   [4] P:{C}:state         hash: state key -> payload of its latest event
--   [5] P:{C}:state_order   zset: state key scored by the seq that last wrote it
--
-- ONE EVENT (the form the README shows to producers in other languages)
--   KEYS [6] P:{C}:id:<event id>   string "<seq>:<epoch>": the seq first assigned to this id
--   ARGV [1] conversation id     [2] event id          [3] event type
--        [4] data, msgpack-encoded bytes (0xc0 = nil: with a state key, deletes the entry)
--        [5] state key ("" = none)
--        [6] history size (events kept, approximately: XTRIM MAXLEN ~)
--        [7] history ttl, seconds [8] idempotency ttl, seconds
--        [9] ignored (was: an epoch to use if the conversation has none; see EPOCHS)
--        [10] max state entries   [11] "1" to SPUBLISH (Redis Cluster), else PUBLISH
--        [12] max state bytes (optional; absent or 0 = no byte cap): the encoded size of
--             all state entries, tracked in meta field state_bytes; past it the
--             oldest-updated go
--        [13] "append" (optional; needs a state key and data that is a msgpack map of
--             string keys): append to the state entry instead of replacing it (APPEND below)
--   Returns {seq, epoch, duplicate (0/1), state entries evicted}
--
-- A BATCH (what the SDK and the gateways send; cheaper per event)
--   KEYS [6] P:{C}:batch:<batch id>  string "<epoch>:<seq> <seq>...": the seqs the batch's
--        events got (all of them, or those applied before a failure), so a retried batch
--        is answered from it: those events as duplicates, the rest published now
--        [7...] P:{C}:id:<event id> of each event flagged "i", in event order
--   ARGV [1] "" (an empty conversation id marks this form)
--        [2] history size  [3] history ttl (also the TTL of id keys)  [4] batch key ttl
--        [5] ignored (see EPOCHS)  [6] max state entries
--        [7] "1" to SPUBLISH, else PUBLISH  [8] max state bytes (0 = no byte cap)
--        [9] "1" when this batch may have been sent before (a retry: look for its batch
--            key first), "0" on its first attempt (a fresh batch id cannot have one)
--        [10] one code character per event, in order: its byte value minus 64 is the sum of
--             1 = remember the event id (its id key is the next of KEYS[7...]),
--             2 = the event has a state key (the next of the state keys below),
--             4 = delete that state entry instead of writing it,
--             8 = append to that state entry (with 2; see APPEND)
--             ("@" = none of these, "A" = 1, "B" = 2, "C" = 1 + 2, "F" = 2 + 4, "G" = 1 + 2 + 4,
--             "J" = 2 + 8, "K" = 1 + 2 + 8)
--        [11...] the fields of each event, in order: the payload's "v", "conv", "type",
--             "id", "data" (and "key" with a state key, then "op" = "append" with code 8)
--             as msgpack keys and values one after another, without a map header
--        then the state key of each event with code 2, in order
--   Returns {epoch, then per event: seq, duplicate (0/1), state entries evicted}
--
-- EPOCHS. A conversation without a meta hash gets, at its first publish, the epoch every
-- read already announced for it: unborn_epoch below (the same function as in read.lua),
-- derived from the server's identity and the time period, never stored by a read. The
-- meta hash then lives at least EPOCH_PERIOD (its TTL is max(history ttl, EPOCH_PERIOD)),
-- which is what makes a conversation created again after it expired get another epoch.
-- An id key ("<seq>:<epoch>") or batch key of another epoch is stale (its epoch was
-- lost) and ignored: the event is published, not reported as a duplicate of a seq that
-- no longer exists.
--
-- FAILURES. An event is applied once its XADD succeeded: only then does it take its seq.
-- An error before that (a key of the wrong type, say) consumes no seq, so it leaves no
-- hole in the numbering; an error after it (the state write) leaves the event numbered
-- and in history but not fanned out (live subscribers see a gap and read it from
-- history). The events before a failure stay applied (Lua cannot undo writes), the seq
-- counter covers exactly them, the batch form records them in its batch key, and the
-- error is raised: a retry of the batch answers them as duplicates and goes on with
-- the rest.
--
-- APPEND. An append event (op "append") carries a chunk: a msgpack map of string keys. Its
-- payload in history and on the live channel is the chunk with "op": "append"; the state
-- entry becomes the entry merged with it (the payload of an event with this event's
-- type, id, seq and ts, no "op", and the merged data): each string value of the chunk is
-- concatenated to the entry's string at the same key (a missing entry, key, or a value
-- that is not a string starts empty), any other value replaces the key's; keys keep their
-- order, new keys go last. An entry whose data is not a map starts as an empty map.
-- The merge decodes only the two maps' top level (read_map below): values are copied as
-- raw msgpack bytes, strings concatenated. Data that is not such a map is refused
-- (error "BADAPPEND ...") before any write, so it takes no seq.
--
-- The payload is the msgpack map {"v":1,"conv","type","id","data"(,"key"(,"op")),"seq","ts","epoch"}.
-- The data bytes are copied as they came, never decoded (a Lua table cannot tell [] from {}
-- and loses big integers), and the few scalars are encoded below rather than with
-- cmsgpack, so the script also runs where cmsgpack is missing (fakeredis, some
-- Redis-compatible servers).

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

-- >>> unborn epoch: keep identical in read.lua and publish.lua (a test compares them)
-- The epoch of a conversation that has no meta hash, derived rather than stored so that
-- reads need not write: hash(server, period, meta key), 12 hex digits.
--   server: what changes when Redis may have lost data without the conversation noticing:
--     its run_id (a restart), evicted_keys (an eviction), the FLUSHALL / FLUSHDB / SWAPDB
--     call counts (a flush). A server refusing INFO in scripts (fakeredis, some managed
--     offerings) uses LASTSAVE instead: its start time, and each save (a save then only
--     makes a waiting subscriber's first event come after a ws.reset at seq 0).
--   period: which EPOCH_PERIOD-long window (per conversation phase) the call runs in.
--     publish.lua keeps a meta hash at least EPOCH_PERIOD past its creation, so a
--     conversation that expired and is created again always lands in a later period and
--     gets another epoch: no client that held the old epoch can mistake the new seqs for
--     ones it has seen. The price: a subscriber that waits across its conversation's
--     period boundary before the first publish gets one ws.reset at seq 0 (a wait of
--     w seconds crosses one with probability w / EPOCH_PERIOD).
local EPOCH_PERIOD = 86400

local function hex48(s) -- where redis.sha1hex is missing (fakeredis): two 24-bit polynomial hashes
  local a, b = 5381, 52711
  for i = 1, #s do
    local c = string.byte(s, i)
    a = (a * 33 + c) % 16777213
    b = (b * 131 + c) % 16777199
  end
  return string.format('%06x%06x', a, b)
end
local digest = redis.sha1hex or hex48

local function unborn_epoch(meta_key)
  local info = redis.pcall('INFO', 'server', 'stats', 'commandstats')
  if type(info) ~= 'string' then
    info = redis.pcall('INFO') -- a server taking one section at most: server and stats, no commandstats
  end
  local server
  if type(info) == 'string' then
    server = (string.match(info, 'run_id:(%x+)') or '') .. ':' .. (string.match(info, 'evicted_keys:(%d+)') or '')
      .. ':' .. (string.match(info, 'cmdstat_flushall:calls=(%d+)') or '0')
      .. ':' .. (string.match(info, 'cmdstat_flushdb:calls=(%d+)') or '0')
      .. ':' .. (string.match(info, 'cmdstat_swapdb:calls=(%d+)') or '0')
  else
    server = 'lastsave:' .. tostring(redis.call('LASTSAVE'))
  end
  local phase = tonumber(string.sub(digest(meta_key), 1, 6), 16) % EPOCH_PERIOD
  local period = math.floor((tonumber(redis.call('TIME')[1]) + phase) / EPOCH_PERIOD)
  return string.sub(digest(server .. '|' .. period .. '|' .. meta_key), 1, 12)
end
-- <<< unborn epoch

local meta, log, live, state, order = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local batch = ARGV[1] == ''
local history_size, history_ttl, max_entries, sharded, max_bytes
if batch then
  history_size, history_ttl = ARGV[2], ARGV[3]
  max_entries, sharded, max_bytes = tonumber(ARGV[6]), ARGV[7] == '1', tonumber(ARGV[8]) or 0
else
  history_size, history_ttl = ARGV[6], ARGV[7]
  max_entries, sharded, max_bytes = tonumber(ARGV[10]), ARGV[11] == '1', tonumber(ARGV[12] or '0') or 0
end
-- POLICY. Run as this script (EVAL / EVALSHA), the policy is the caller's arguments above
-- (deprecated: it bypasses namespaces). Run as the publish function of the library the
-- gateways load (scripts.build_library: FCALL), POLICY is the conversation's namespace
-- policy {history size, history ttl, max state entries, max state bytes, max data bytes},
-- and the arguments above are ignored: producers never carry policy.
local POLICY = false -- @policy: this line is replaced in the function library
local max_data, id_ttl, batch_ttl = 0, ARGV[8], ARGV[4]
if POLICY then
  history_size, history_ttl = POLICY[1], POLICY[2]
  max_entries, max_bytes, max_data = POLICY[3], POLICY[4], POLICY[5]
  -- ids and batch keys live at most as long as the namespace's history
  id_ttl = math.min(tonumber(ARGV[8]) or history_ttl, history_ttl)
  batch_ttl = math.min(tonumber(ARGV[4]) or history_ttl, history_ttl)
end

local current = redis.call('HMGET', meta, 'epoch', 'seq')
local epoch = current[1]
local fresh = not epoch
local applied = {} -- batch form: seqs its earlier attempts got, from its batch key
if batch and epoch and ARGV[9] == '1' then
  local done = redis.call('GET', KEYS[6])
  if done then
    local tagged, seqs = string.match(done, '^(.*):([%d ]*)$')
    if not tagged then
      tagged, seqs = epoch, done -- written by an older version of this script: seqs only
    end
    if tagged == epoch then
      for s in string.gmatch(seqs, '%d+') do
        applied[#applied + 1] = tonumber(s)
      end
    end
  end
  if #applied >= #ARGV[10] then -- every event was applied: answer from the key alone
    local reply = {epoch}
    for j = 1, #ARGV[10] do
      reply[#reply + 1] = applied[j]
      reply[#reply + 1] = 1
      reply[#reply + 1] = 0
    end
    return reply
  end
end
if fresh then
  -- A new numbering starts: whatever outlived the old one is stale (id and batch keys
  -- included: they refer to seqs of the lost epoch; those of other calls are told apart
  -- by the epoch they hold).
  redis.call('DEL', log, state, order, unpack(KEYS, 6))
  epoch = unborn_epoch(meta)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
end

local last = fresh and 0 or tonumber(current[2]) or 0
local seq = last
local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local tail = '\162ts' .. mp_uint(ts) .. '\165epoch' .. mp_str(epoch)
local fan_out = sharded and 'SPUBLISH' or 'PUBLISH'

-- Write (or delete) state entry `key`; returns how many old entries the caps evicted.
local function write_state(key, delete, payload)
  local previous = redis.call('HSTRLEN', state, key)
  if delete then
    if redis.call('HDEL', state, key) == 1 then
      redis.call('HINCRBY', meta, 'state_bytes', -previous)
    end
    redis.call('ZREM', order, key)
    return 0
  end
  redis.call('HSET', state, key, payload)
  redis.call('ZADD', order, seq, key)
  local bytes = redis.call('HINCRBY', meta, 'state_bytes', #payload - previous)
  local count = redis.call('ZCARD', order)
  local evicted = 0
  -- evict oldest-updated first; the entry just written (the newest) always stays
  while count > max_entries or (max_bytes > 0 and bytes > max_bytes and count > 1) do
    local oldest = redis.call('ZPOPMIN', order)
    local size = redis.call('HSTRLEN', state, oldest[1])
    redis.call('HDEL', state, oldest[1])
    bytes = redis.call('HINCRBY', meta, 'state_bytes', -size)
    count = count - 1
    evicted = evicted + 1
  end
  return evicted
end

-- The msgpack str at `pos` of `s`: the position just after it (nil if none is there).
local function str_end(s, pos)
  local b = string.byte(s, pos)
  if not b then
    return nil
  elseif b >= 0xa0 and b <= 0xbf then
    return pos + 1 + b - 0xa0
  elseif b == 0xd9 then
    return pos + 2 + string.byte(s, pos + 1)
  elseif b == 0xda then
    return pos + 3 + string.byte(s, pos + 1) * 256 + string.byte(s, pos + 2)
  end
  return nil -- longer than any conversation id, type or event id may be
end

-- >>> msgpack reading for APPEND
-- Big-endian unsigned integer of `n` bytes of `s` at `pos`.
local function be(s, pos, n)
  local v = 0
  for i = pos, pos + n - 1 do
    v = v * 256 + string.byte(s, i)
  end
  return v
end

-- Bytes after the tag of each fixed-size msgpack type (nil, bool, numbers, fixext).
local FIXED = {[0xc0] = 0, [0xc2] = 0, [0xc3] = 0, [0xca] = 4, [0xcb] = 8, [0xcc] = 1, [0xcd] = 2,
  [0xce] = 4, [0xcf] = 8, [0xd0] = 1, [0xd1] = 2, [0xd2] = 4, [0xd3] = 8, [0xd4] = 2, [0xd5] = 3,
  [0xd6] = 5, [0xd7] = 9, [0xd8] = 17}
-- Length-prefixed types: bytes of the length, extra bytes after it (ext's type byte).
local SIZED = {[0xc4] = {1, 0}, [0xc5] = {2, 0}, [0xc6] = {4, 0}, [0xc7] = {1, 1}, [0xc8] = {2, 1},
  [0xc9] = {4, 1}, [0xd9] = {1, 0}, [0xda] = {2, 0}, [0xdb] = {4, 0}}

-- The position just after the msgpack value at `pos` of `s` (iterative: no recursion on depth).
local function skip(s, pos)
  local todo = 1
  while todo > 0 do
    local b = string.byte(s, pos)
    if not b then
      error({bad_append = 'BADAPPEND truncated msgpack'})
    end
    todo = todo - 1
    if b < 0x80 or b >= 0xe0 then
      pos = pos + 1
    elseif b < 0x90 then
      todo, pos = todo + 2 * (b - 0x80), pos + 1
    elseif b < 0xa0 then
      todo, pos = todo + b - 0x90, pos + 1
    elseif b < 0xc0 then
      pos = pos + 1 + b - 0xa0
    elseif FIXED[b] then
      pos = pos + 1 + FIXED[b]
    elseif SIZED[b] then
      local w = SIZED[b]
      pos = pos + 1 + w[1] + w[2] + be(s, pos + 1, w[1])
    elseif b == 0xdc or b == 0xdd then
      local w = b == 0xdc and 2 or 4
      todo, pos = todo + be(s, pos + 1, w), pos + 1 + w
    elseif b == 0xde or b == 0xdf then
      local w = b == 0xde and 2 or 4
      todo, pos = todo + 2 * be(s, pos + 1, w), pos + 1 + w
    else
      error({bad_append = 'BADAPPEND unknown msgpack type ' .. b})
    end
  end
  return pos
end

-- The content of the msgpack str at `pos` of `s` and the position after it; nil if it is no str.
local function read_str(s, pos)
  local b = string.byte(s, pos)
  local start
  if not b then
    return nil
  elseif b >= 0xa0 and b <= 0xbf then
    start = pos + 1
  elseif b == 0xd9 or b == 0xda or b == 0xdb then
    start = pos + 2 + SIZED[b][1] - 1
  else
    return nil
  end
  local stop = b <= 0xbf and start + b - 0xa0 or start + be(s, pos + 1, SIZED[b][1])
  return string.sub(s, start, stop - 1), stop
end

-- The top level of the msgpack map at `pos` of `s`, ending before `stop`: {names = {...},
-- values = {name -> raw msgpack bytes}}; nil if that is not a map of str keys filling it.
local function read_map(s, pos, stop)
  local b = string.byte(s, pos)
  local n
  if not b then
    return nil
  elseif b >= 0x80 and b <= 0x8f then
    n, pos = b - 0x80, pos + 1
  elseif b == 0xde or b == 0xdf then
    local w = b == 0xde and 2 or 4
    n, pos = be(s, pos + 1, w), pos + 1 + w
  else
    return nil
  end
  local map = {names = {}, values = {}}
  for _ = 1, n do
    local name, after = read_str(s, pos)
    if not name or after > stop then
      return nil
    end
    local value_end = skip(s, after)
    if value_end > stop then
      return nil
    end
    if not map.values[name] then
      map.names[#map.names + 1] = name
    end
    map.values[name] = string.sub(s, after, value_end - 1)
    pos = value_end
  end
  if pos ~= stop then
    return nil
  end
  return map
end

-- The msgpack bytes of `entry` (a read_map, or nil) merged with the chunk `chunk` (see APPEND).
local function merge_append(entry, chunk)
  entry = entry or {names = {}, values = {}}
  local names, values = {}, {}
  for i = 1, #entry.names do
    names[i] = entry.names[i]
    values[entry.names[i]] = entry.values[entry.names[i]]
  end
  for _, name in ipairs(chunk.names) do
    local new = chunk.values[name]
    local old = values[name]
    if not old then
      names[#names + 1] = name
    else
      local old_text, old_end = read_str(old, 1)
      local new_text, new_end = read_str(new, 1)
      if old_text and new_text and old_end == #old + 1 and new_end == #new + 1 then
        new = mp_str(old_text .. new_text)
      end
    end
    values[name] = new
  end
  local n = #names
  local out = {n < 16 and string.char(0x80 + n) or n < 65536 and string.char(0xde, math.floor(n / 256), n % 256)
    or string.char(0xdf) .. be32(n)}
  for _, name in ipairs(names) do
    out[#out + 1] = mp_str(name)
    out[#out + 1] = values[name]
  end
  return table.concat(out)
end

-- Where the data of an event's fields starts (after "\164data"; `base` = the position of
-- the fields' first byte): after v, conv, type, id. Nil if the fields are not laid out so.
local function data_start(s, base)
  local pos = str_end(s, base + 8) -- after "\161v\001\164conv": the conversation id
  pos = pos and str_end(s, pos + 5) -- after "\164type"
  pos = pos and str_end(s, pos + 3) -- after "\162id"
  return pos and pos + 5
end
-- <<< msgpack reading for APPEND

-- Bytes of the msgpack data in a batch event's fields (v, conv, type, id, data[, key]).
local function data_size(fields, key)
  local pos = str_end(fields, 9) -- after "\161v\001\164conv": the conversation id
  pos = pos and str_end(fields, pos + 5) -- after "\164type"
  pos = pos and str_end(fields, pos + 3) -- after "\162id"
  if not pos then
    return #fields
  end
  local tail = key ~= '' and 4 + #mp_str(key) or 0
  return #fields - tail - (pos + 5) + 1 -- "\164data" then the data
end

-- Publish one event; `id_key` (or false) remembers its id for `id_ttl` seconds.
-- Returns its seq, 1 if it was a duplicate of an earlier event (else 0), and evictions.
-- Data over the namespace's max data bytes (`data`: the one-event form's; else measured
-- in `fields`) is refused before any write: a refused event takes no seq.
local OP_APPEND = '\162op\166append'

-- The state payload of the append event with `fields` (ending in key and op) taking seq
-- `next_seq`: the entry `key` merged with the event's chunk (see APPEND).
local function appended_entry(fields, key, next_seq)
  local start = data_start(fields, 1)
  local stop = #fields - 4 - #mp_str(key) - #OP_APPEND + 1 -- the chunk ends before "\163key"
  local chunk = start and read_map(fields, start, stop)
  if not chunk then
    error({bad_append = 'BADAPPEND an append needs data that is a map of string keys'})
  end
  local entry
  local old = redis.call('HGET', state, key)
  if old then
    local old_start = data_start(old, 2)
    if old_start then
      local ok, old_stop = pcall(skip, old, old_start)
      entry = ok and read_map(old, old_start, old_stop) or nil -- data that is no map starts empty
    end
  end
  return '\137' .. string.sub(fields, 1, start - 1) .. merge_append(entry, chunk) .. '\163key' .. mp_str(key)
    .. '\163seq' .. mp_uint(next_seq) .. tail
end

local function publish(fields, key, delete, id_key, id_ttl, data, append)
  if max_data > 0 and #fields > max_data then -- the data is part of the fields: most events stop here
    local size = data and #data or data_size(fields, key) - (append and #OP_APPEND or 0)
    if size > max_data then
      error({too_large = 'TOOLARGE event data is ' .. size .. ' bytes (msgpack), over max_data_bytes '
        .. max_data .. ' of its namespace'})
    end
  end
  if id_key then
    local first = redis.call('GET', id_key)
    if first then
      local known, known_epoch = string.match(first, '^(%d+):(.*)$')
      if not known then
        known, known_epoch = first, epoch -- written by an older version of this script: a seq only
      end
      if known_epoch == epoch then
        return tonumber(known), 1, 0
      end
    end
  end
  local next_seq = seq + 1
  local entry = append and appended_entry(fields, key, next_seq) -- before any write: a bad chunk takes no seq
  local payload = string.char(append and 0x8a or key ~= '' and 0x89 or 0x88) .. fields .. '\163seq'
    .. mp_uint(next_seq) .. tail
  redis.call('XADD', log, next_seq .. '-0', 'p', payload)
  seq = next_seq -- the event is in history: from here on it has its seq, whatever fails next
  if id_key then
    redis.call('SET', id_key, seq .. ':' .. epoch, 'EX', id_ttl)
  end
  local evicted = 0
  if key ~= '' then
    evicted = write_state(key, delete, entry or payload)
  end
  redis.call(fan_out, live, payload)
  return seq, 0, evicted
end

local reply
local seqs = {} -- batch form: the seq of each event handled so far, in order
local wrote_state = false
local ok, failure = pcall(function()
  if batch then
    reply = {epoch}
    local next_id_key = 7
    local codes = ARGV[10]
    local next_state_key = 11 + #codes
    for j = 1, #codes do
      local code = string.byte(codes, j) - 64
      local id_key, key = false, ''
      if code % 2 == 1 then
        id_key = KEYS[next_id_key]
        next_id_key = next_id_key + 1
      end
      if code % 4 >= 2 then
        key = ARGV[next_state_key]
        next_state_key = next_state_key + 1
      end
      local s, duplicate, evicted
      if j <= #applied then
        s, duplicate, evicted = applied[j], 1, 0
      else
        wrote_state = wrote_state or key ~= ''
        s, duplicate, evicted = publish(ARGV[10 + j], key, code % 8 >= 4, id_key, history_ttl, false, code >= 8)
      end
      seqs[j] = s
      reply[#reply + 1] = s
      reply[#reply + 1] = duplicate
      reply[#reply + 1] = evicted
    end
  else
    local conv, event_id, etype, data, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
    local fields = '\161v\001\164conv' .. mp_str(conv) .. '\164type' .. mp_str(etype) .. '\162id'
      .. mp_str(event_id) .. '\164data' .. data
    local append = ARGV[13] == 'append'
    if ARGV[13] and ARGV[13] ~= '' and not append then
      error({bad_append = 'BADAPPEND unknown op ' .. ARGV[13] .. ' (the one op is append)'})
    elseif append and key == '' then
      error({bad_append = 'BADAPPEND an append needs a state key'})
    end
    if key ~= '' then
      fields = fields .. '\163key' .. mp_str(key)
    end
    if append then
      fields = fields .. OP_APPEND
    end
    wrote_state = key ~= ''
    local s, duplicate, evicted = publish(fields, key, data == '\192' and not append, KEYS[6], id_ttl, data, append)
    reply = {s, epoch, duplicate, evicted}
  end
end)
if batch and #seqs > 0 then
  -- all the events, or those applied before a failure: a retry answers them from here
  redis.call('SET', KEYS[6], epoch .. ':' .. table.concat(seqs, ' '), 'EX', batch_ttl)
end
if seq ~= last then
  redis.call('HSET', meta, 'seq', seq)
  -- one trim per call, not per XADD: a third cheaper per event; the stream may hold up to a
  -- call's worth of events more than history size in between (it is approximate anyway)
  redis.call('XTRIM', log, 'MAXLEN', '~', history_size)
end
-- Refresh the conversation's TTL: history ttl for the log and state, at least
-- EPOCH_PERIOD for the meta hash (see EPOCHS). Four EXPIREs per call are a large share of
-- the script's cost, so they are skipped while the TTL is within `slack` seconds of full
-- (at most 60 s, 1% of the TTL): a conversation may expire up to that much earlier than
-- exactly history-ttl after its last publish. Keys just created (a new epoch, a log
-- started while seq was 0, a log or state hash that had expired or emptied while the
-- meta hash lived on) have no TTL yet and always get one.
local ttl = tonumber(history_ttl)
local meta_ttl = math.max(ttl, EPOCH_PERIOD)
local slack = math.min(60, math.floor(ttl / 100))
if fresh or last == 0 or redis.call('TTL', meta) < meta_ttl - slack then
  redis.call('EXPIRE', meta, meta_ttl)
  redis.call('EXPIRE', log, history_ttl)
  redis.call('EXPIRE', state, history_ttl)
  redis.call('EXPIRE', order, history_ttl)
elseif wrote_state and redis.call('TTL', state) == -1 then
  redis.call('EXPIRE', state, history_ttl)
  redis.call('EXPIRE', order, history_ttl)
end
if not ok then
  if type(failure) == 'table' and (failure.too_large or failure.bad_append) then
    return redis.error_reply(failure.too_large or failure.bad_append)
  end
  error(failure)
end
return reply
