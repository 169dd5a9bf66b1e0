-- broadcaster read script: a conversation's head, history or state, read atomically
-- with the epoch and seq they are consistent at. READ-ONLY: it never writes a key, so
-- reading conversations that do not exist (any name a client sends) costs no memory.
--
-- A conversation without a meta hash (never published, or lost: expired, restarted
-- empty, flushed, evicted) answers seq 0, nothing kept, and the epoch its first publish
-- will adopt: see unborn_epoch below, the same function as in publish.lua. Keys that
-- outlived a lost meta hash are not read: they belong to a lost epoch.
--
-- KEYS [1] P:{C}:meta  [2] P:{C}:log  [3] P:{C}:state  [4] P:{C}:state_order
-- ARGV [1] "head" | "history" | "state"
--      [2] ignored (was: an epoch to create)  [3] ignored (was: the TTL of that epoch)
--      [4] history: since (events with seq > since)    [5] history: limit (0 = none)
-- Returns
--   head:    {epoch, seq}
--   history: {epoch, seq, seq of the first returned entry (0: none), payload...}
--   state:   {epoch, seq, key, payload, key, payload...}

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

local meta = KEYS[1]
local current = redis.call('HMGET', meta, 'epoch', 'seq')
local epoch = current[1]
local op = ARGV[1]
if not epoch then
  epoch = unborn_epoch(meta)
  if op == 'head' or op == 'state' then
    return {epoch, 0}
  elseif op == 'history' then
    return {epoch, 0, 0}
  end
  return redis.error_reply('unknown read op ' .. tostring(op))
end
local seq = tonumber(current[2]) or 0

if op == 'head' then
  return {epoch, seq}
elseif op == 'history' then
  local start = string.format('%d-0', tonumber(ARGV[4]) + 1)
  local limit = tonumber(ARGV[5])
  local entries
  if limit > 0 then
    entries = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], start, '+')
  end
  local out = {epoch, seq, 0}
  if #entries > 0 then
    out[3] = tonumber(string.match(entries[1][1], '^(%d+)'))
  end
  for i, entry in ipairs(entries) do
    out[i + 3] = entry[2][2]
  end
  return out
elseif op == 'state' then
  local out = {epoch, seq}
  local all = redis.call('HGETALL', KEYS[3])
  for i = 1, #all do
    out[i + 2] = all[i]
  end
  return out
end
return redis.error_reply('unknown read op ' .. tostring(op))
