-- GCRA (generic cell rate algorithm), the alternative ADR 0006 weighed and turned down:
-- benches/benches/rate_limit_algorithms.rs measures it next to the gateway's
-- sliding_window.lua, with the same arguments. The gateway does not use it.
--
-- KEYS[1]  string: the theoretical arrival time (TAT), microseconds
-- ARGV     now us, window us, limit
-- Returns {allowed 0|1, remaining, reset us, retry_after us or -1}.
-- Burst tolerance is window - interval, so `limit` requests pass at once, then one per
-- window / limit.
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if now < allow_at then
  local retry = math.ceil(allow_at - now)
  return {0, 0, math.ceil(tat - now), retry}
end
redis.call('SET', KEYS[1], string.format('%d', math.ceil(new_tat)), 'PX',
  string.format('%d', math.ceil((new_tat - now) / 1000) + 1))
local remaining = math.floor((now - (new_tat - window)) / interval)
return {1, remaining, math.ceil(new_tat - now), -1}
