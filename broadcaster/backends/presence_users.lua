-- broadcaster presence users read: the users watching one conversation over every gateway.
--
-- KEYS [1] P:{C}:presence_users   hash: "<gateway id>|<user>" -> "<count>|<expires at, ms>|<info JSON or empty>"
-- ARGV [1] most users returned
-- Sums the unexpired fields per user (Redis clock); a user's info is the first non-empty
-- one found. Read only: expired fields are left to the sweep of presence_users_report.lua,
-- which announces the leaves of their users. Returns {total users, user,
-- count, info, user, count, info, ...}: the users with the most connections first
-- (ties by user), at most ARGV[1] of them.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local all = redis.call('HGETALL', key)
local sums, infos, order = {}, {}, {}
for i = 1, #all, 2 do
  local user = string.match(all[i], '^[^|]*|(.+)$')
  local count, until_ms, info = string.match(all[i + 1], '^(%d+)|(%d+)|(.*)$')
  if user ~= nil and count ~= nil and tonumber(until_ms) > now then
    if sums[user] == nil then
      sums[user] = 0
      infos[user] = info
      order[#order + 1] = user
    elseif infos[user] == '' then
      infos[user] = info
    end
    sums[user] = sums[user] + tonumber(count)
  end
end
table.sort(order, function(a, b)
  if sums[a] ~= sums[b] then
    return sums[a] > sums[b]
  end
  return a < b
end)
local out = {#order}
for i = 1, math.min(limit, #order) do
  local user = order[i]
  out[#out + 1] = user
  out[#out + 1] = sums[user]
  out[#out + 1] = infos[user]
end
return out
