-- broadcaster presence users report: one gateway's users of one conversation, and the joins and leaves.
--
-- KEYS [1] P:{C}:presence_users      hash: "<gateway id>|<user>" -> "<count>|<expires at, ms>|<info JSON or empty>"
-- KEYS [2] P:{C}:presence_announced  hash: user -> "0" (its join was announced; present) or "<absent since, ms>"
-- KEYS [3] P:{C}:presence_leaving    sorted set: announced users absent, scored by when their leave is due (ms)
-- KEYS [4] P:{C}:presence_gateways   hash: gateway id -> "<expires at, ms>" of its last user report
-- KEYS [5] P:{C}:presence_sweep      string: the HSCAN cursor of the sweep of KEYS[1]
-- ARGV [1] ttl in milliseconds, [2] gateway id, [3] leave delay in ms (-1: store only, no joins or leaves),
--      [4] most fields KEYS[1] holds, [5] most transitions returned, [6] fields swept by this call (0: none),
--      then triples: user, count, info (JSON text, '' for none)
--
-- A count of 0 removes the gateway's field for that user. A new field is not stored
-- while the hash holds the most fields already (existing ones are still refreshed).
-- Expiry uses the Redis clock, so gateway clocks never matter.
--
-- With a delay >= 0 (join_leave): a reported user (count > 0) never announced is a join;
-- one announced absent is present again (its leave is called off). A user reported 0,
-- or whose field the sweep finds expired (a gateway that died), and present on no other
-- live gateway, is absent since now: its leave is due after the delay. Due leaves of
-- users still absent are returned and forgotten. The cost of a call is bounded: the
-- triples, ARGV[6] fields of the sweep (HSCAN, one pass over the hash every few calls),
-- and for each departure one HGET per live gateway.
--
-- Returns {wait, kind, user, info, ...}: kind 'j' (info: that connection's info JSON, ''
-- none) or 'l' (info ''); wait: milliseconds until the next leave is due, 0 when
-- transitions past ARGV[5] were left for the next call, -1 when none is pending.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local users, announced, leaving, gateways, sweep = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ttl = tonumber(ARGV[1])
local gateway = ARGV[2]
local delay = tonumber(ARGV[3])
local max_fields = tonumber(ARGV[4])
local max_out = tonumber(ARGV[5])
local chunk = tonumber(ARGV[6])
local expires = now + ttl
local announce = delay >= 0

local out = {-1}
local done = 0
local cut = false
local function emit(kind, user, info)
  out[#out + 1] = kind
  out[#out + 1] = user
  out[#out + 1] = info
  done = done + 1
end

-- the live gateways (their last report has not expired), this one included
local live = {}
if announce then
  redis.call('HSET', gateways, gateway, expires)
  local all = redis.call('HGETALL', gateways)
  for i = 1, #all, 2 do
    if (tonumber(all[i + 1]) or 0) > now then
      live[#live + 1] = all[i]
    else
      redis.call('HDEL', gateways, all[i])
    end
  end
end

local function present(user)
  for _, gw in ipairs(live) do
    local value = redis.call('HGET', users, gw .. '|' .. user)
    if value then
      local until_ms = string.match(value, '^%d+|(%d+)|')
      if until_ms and tonumber(until_ms) > now then
        return true
      end
    end
  end
  return false
end

local function depart(user)
  if redis.call('HGET', announced, user) == '0' and not present(user) then
    redis.call('HSET', announced, user, now)
    redis.call('ZADD', leaving, now + delay, user)
  end
end

-- the users hash expired whole (no gateway reported for a TTL): every announced user may be gone
if announce and redis.call('EXISTS', users) == 0 then
  local all = redis.call('HGETALL', announced)
  for i = 1, #all, 2 do
    if all[i + 1] == '0' then
      redis.call('HSET', announced, all[i], now)
      redis.call('ZADD', leaving, now + delay, all[i])
    end
  end
end

local size = nil
for i = 7, #ARGV - 2, 3 do
  local user = ARGV[i]
  local field = gateway .. '|' .. user
  local count = tonumber(ARGV[i + 1])
  if count ~= nil and count > 0 then
    if size == nil then
      size = redis.call('HLEN', users)
    end
    if size < max_fields or redis.call('HEXISTS', users, field) == 1 then
      size = size + redis.call('HSET', users, field, string.format('%d|%d|', count, expires) .. ARGV[i + 2])
      if announce then
        local state = redis.call('HGET', announced, user)
        if not state then
          if done < max_out then
            redis.call('HSET', announced, user, '0')
            emit('j', user, ARGV[i + 2])
          else
            cut = true
          end
        elseif state ~= '0' then
          redis.call('HSET', announced, user, '0')
          redis.call('ZREM', leaving, user)
        end
      end
    end
  elseif redis.call('HDEL', users, field) == 1 and announce then
    depart(user)
  end
end

-- one step of the sweep: expired fields (of gateways that stopped reporting) go
if chunk > 0 then
  local cursor = redis.call('GET', sweep) or '0'
  local scan = redis.call('HSCAN', users, cursor, 'COUNT', chunk)
  for i = 1, #scan[2], 2 do
    local field, value = scan[2][i], scan[2][i + 1]
    local until_ms = string.match(value, '^%d+|(%d+)|')
    if until_ms == nil or tonumber(until_ms) <= now then
      redis.call('HDEL', users, field)
      local user = string.match(field, '^[^|]*|(.+)$')
      if announce and user then
        depart(user)
      end
    end
  end
  redis.call('SET', sweep, scan[1], 'PX', 2 * ttl)
end

if redis.call('PTTL', users) < ttl then
  redis.call('PEXPIRE', users, ttl)
end
if not announce then
  return out
end

-- leaves due: those still absent leave
local due = redis.call('ZRANGEBYSCORE', leaving, '-inf', now, 'LIMIT', 0, max_out + 1)
for _, user in ipairs(due) do
  if present(user) then
    redis.call('ZREM', leaving, user)
    redis.call('HSET', announced, user, '0')
  elseif done < max_out then
    redis.call('ZREM', leaving, user)
    redis.call('HDEL', announced, user)
    emit('l', user, '')
  else
    cut = true
  end
end
if cut then
  out[1] = 0
else
  local next_due = redis.call('ZRANGE', leaving, 0, 0, 'WITHSCORES')
  if next_due[2] then
    out[1] = math.max(0, tonumber(next_due[2]) - now)
  end
end
local keep = 2 * ttl + delay
for _, key in ipairs({announced, leaving, gateways}) do
  if redis.call('PTTL', key) > -2 and redis.call('PTTL', key) < keep then
    redis.call('PEXPIRE', key, keep)
  end
end
return out
