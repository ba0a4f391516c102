-- One rate-limit decision: the sliding-window counter with a per-key anchor (ADR 0006).
-- The same arithmetic as window.rs, which the local limiter runs; keep the two in step.
--
-- KEYS[1]  hash {s = current window start, p = previous window count, c = current count}
-- ARGV[1]  now, microseconds since the Unix epoch (the caller's clock)
-- ARGV[2]  window, microseconds (>= 1000)
-- ARGV[3]  limit (>= 1)
-- Returns {allowed 0|1, remaining, reset us, retry_after us or -1}.
-- Lua numbers are doubles: exact while limit x window stays below 2^53.
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])

local state = redis.call('HMGET', KEYS[1], 's', 'p', 'c')
local start = tonumber(state[1])
local prev = tonumber(state[2]) or 0
local cur = tonumber(state[3]) or 0
if start == nil then
  start, prev, cur = now, 0, 0
end
if now < start then
  -- A replica whose clock runs ahead opened this window: count at its first instant.
  now = start
end
local passed = math.floor((now - start) / window)
if passed == 1 then
  start, prev, cur = start + window, cur, 0
elseif passed >= 2 then
  -- Two quiet windows leave nothing to count: start afresh, anchored now (as after PEXPIRE).
  start, prev, cur = now, 0, 0
end
local elapsed = now - start
local left = window - elapsed

-- prev x left / window + cur + 1 <= limit, multiplied through by window.
local allowed = prev * left + (cur + 1) * window <= limit * window
if allowed then cur = cur + 1 end
local room = limit * window - prev * left
if room < 0 then room = 0 end
local remaining = math.floor(room / window) - cur
if remaining < 0 then remaining = 0 end

if allowed then
  -- %d keeps every digit; tostring would round microsecond timestamps.
  redis.call('HSET', KEYS[1], 's', string.format('%d', start), 'p', string.format('%d', prev),
    'c', string.format('%d', cur))
  redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil(2 * window / 1000)))
  return {1, remaining, left, -1}
end

-- Refused: the earliest instant one more request fits. First within this window, as the
-- previous window's weight decays; otherwise in the next, where cur becomes the previous.
local retry = -1
if cur < limit and prev > 0 then
  local at = window - math.min(math.floor((limit - cur - 1) * window / prev), window)
  if at < window then retry = at - elapsed end
end
if retry < 0 then
  local at = 0
  if cur > 0 then
    at = window - math.min(math.floor((limit - 1) * window / cur), window)
  end
  retry = window - elapsed + at
end
local reset = left
if retry > reset then reset = retry end
return {0, remaining, reset, retry}
