-- broadcaster presence report: one gateway's connection counts for one conversation.
--
-- KEYS [1] P:{C}:presence   hash: "<gateway id>|<profile>" -> "<count>|<expires at, ms>"
-- ARGV [1] ttl in milliseconds, then pairs: field ("<gateway id>|<profile>"), count
-- A count of 0 removes the field. Expiry uses the Redis clock, so gateway clocks
-- never matter. The hash itself lives as long as its longest-lived field.
-- Returns the number of fields written or removed.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local expires = now + ttl
local key = KEYS[1]
local changed = 0
for i = 2, #ARGV - 1, 2 do
  local count = tonumber(ARGV[i + 1])
  if count > 0 then
    redis.call('HSET', key, ARGV[i], string.format('%d|%d', count, expires))
  else
    redis.call('HDEL', key, ARGV[i])
  end
  changed = changed + 1
end
if redis.call('PTTL', key) < ttl then
  redis.call('PEXPIRE', key, ttl)
end
return changed
