-- broadcaster presence users report: one gateway's users of one conversation, and the joins and leaves.
--
-- KEYS [1] P:{C}:presence_users      hash: "<gateway id>|<user>" -> "<count>|<expires at, ms>|<info JSON or empty>"
-- KEYS [2] P:{C}:presence_announced  hash: user -> "0" (its join was announced; present) or "<absent since, ms>"
-- ARGV [1] ttl in milliseconds, [2] gateway id, [3] leave delay in ms (-1: store only, no joins or leaves),
--      [4] most fields KEYS[1] holds, [5] most transitions returned,
--      then triples: user, count, info (JSON text, '' for none)
--
-- A count of 0 removes the gateway's field for that user. A new field is not stored
-- while the hash holds the most fields already (existing ones are still refreshed).
-- Expiry uses the Redis clock, so gateway clocks never matter.
--
-- With a delay >= 0 the report then sweeps, atomically: every gateway's expired (or
-- malformed) fields are deleted; a user with a field left is present. A present user
-- not in KEYS[2] is a join (announced: "0"); an announced user present again is
-- "0" again; an announced user absent is remembered absent since now, and once absent
-- for the delay it is a leave (removed). A leave or join past the most transitions is
-- left for the next report.
--
-- Returns {wait, kind, user, info, kind, user, info, ...}: kind 'j' (info: the JSON text
-- of one of its connections' info, '' none) or 'l' (info ''); wait: milliseconds until
-- the earliest leave still debounced is due, 0 when transitions were left for the next
-- report, -1 when nothing is pending.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local users, announced = KEYS[1], KEYS[2]
local ttl = tonumber(ARGV[1])
local gateway = ARGV[2]
local delay = tonumber(ARGV[3])
local max_fields = tonumber(ARGV[4])
local max_out = tonumber(ARGV[5])
local expires = now + ttl

local size = nil
for i = 6, #ARGV - 2, 3 do
  local field = gateway .. '|' .. ARGV[i]
  local count = tonumber(ARGV[i + 1])
  if count ~= nil and count > 0 then
    if size == nil then
      size = redis.call('HLEN', users)
    end
    if size < max_fields or redis.call('HEXISTS', users, field) == 1 then
      local value = string.format('%d|%d|', count, expires) .. ARGV[i + 2]
      size = size + redis.call('HSET', users, field, value)
    end
  else
    redis.call('HDEL', users, field)
  end
end
if redis.call('PTTL', users) < ttl then
  redis.call('PEXPIRE', users, ttl)
end
if delay < 0 then
  return {-1}
end

local present, order = {}, {}
local all = redis.call('HGETALL', users)
for i = 1, #all, 2 do
  local user = string.match(all[i], '^[^|]*|(.+)$')
  local count, until_ms, info = string.match(all[i + 1], '^(%d+)|(%d+)|(.*)$')
  if user == nil or count == nil or tonumber(until_ms) <= now then
    redis.call('HDEL', users, all[i])
  elseif present[user] == nil then
    present[user] = info
    order[#order + 1] = user
  elseif present[user] == '' then
    present[user] = info
  end
end

local out = {-1}
local done = 0
local function due(ms)
  if out[1] < 0 or ms < out[1] then
    out[1] = ms
  end
end

local known = {}
local ann = redis.call('HGETALL', announced)
for i = 1, #ann, 2 do
  local user, since = ann[i], tonumber(ann[i + 1])
  known[user] = true
  if since == nil then
    redis.call('HDEL', announced, user)
  elseif present[user] ~= nil then
    if since ~= 0 then
      redis.call('HSET', announced, user, '0')
    end
  else
    if since == 0 then
      since = now
      redis.call('HSET', announced, user, now)
    end
    if now - since < delay then
      due(since + delay - now)
    elseif done < max_out then
      redis.call('HDEL', announced, user)
      out[#out + 1] = 'l'
      out[#out + 1] = user
      out[#out + 1] = ''
      done = done + 1
    else
      due(0)
    end
  end
end
for _, user in ipairs(order) do
  if not known[user] then
    if done < max_out then
      redis.call('HSET', announced, user, '0')
      out[#out + 1] = 'j'
      out[#out + 1] = user
      out[#out + 1] = present[user]
      done = done + 1
    else
      due(0)
    end
  end
end
local keep = 2 * ttl + delay
if redis.call('EXISTS', announced) == 1 and redis.call('PTTL', announced) < keep then
  redis.call('PEXPIRE', announced, keep)
end
return out
