-- broadcaster read script: a conversation's head, history or state, read atomically
-- with the epoch and seq they are consistent at. A conversation without an epoch gets
-- one (seq 0), and whatever outlived its previous numbering is dropped first, so
-- the next publish can start the stream at 1-0.
--
-- KEYS [1] P:{C}:meta  [2] P:{C}:log  [3] P:{C}:state  [4] P:{C}:state_order
-- ARGV [1] "head" | "history" | "state"
--      [2] epoch to use if the conversation has none  [3] history ttl, seconds
--      [4] history: since (events with seq > since)    [5] history: limit (0 = none)
-- Returns
--   head:    {epoch, seq}
--   history: {epoch, seq, seq of the first returned entry (0: none), payload...}
--   state:   {epoch, seq, key, payload, key, payload...}

local meta = KEYS[1]
local epoch = redis.call('HGET', meta, 'epoch')
local seq = 0
if epoch then
  seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
else
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  epoch = ARGV[2]
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  redis.call('EXPIRE', meta, ARGV[3])
end

local op = ARGV[1]
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
