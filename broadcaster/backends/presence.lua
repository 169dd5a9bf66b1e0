-- broadcaster presence read: live connections of one conversation over every gateway.
--
-- KEYS [1] P:{C}:presence   hash: "<gateway id>|<profile>" -> "<count>|<expires at, ms>"
-- Sums the unexpired fields per profile (Redis clock) and deletes expired or
-- malformed ones. Returns {profile, count, profile, count, ...}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local all = redis.call('HGETALL', key)
local sums, profiles = {}, {}
for i = 1, #all, 2 do
  local profile = string.match(all[i], '^[^|]*|(.+)$')
  local count, expires = string.match(all[i + 1], '^(%d+)|(%d+)$')
  if profile == nil or count == nil or tonumber(expires) <= now then
    redis.call('HDEL', key, all[i])
  else
    if sums[profile] == nil then
      sums[profile] = 0
      profiles[#profiles + 1] = profile
    end
    sums[profile] = sums[profile] + tonumber(count)
  end
end
local out = {}
for _, profile in ipairs(profiles) do
  out[#out + 1] = profile
  out[#out + 1] = sums[profile]
end
return out
