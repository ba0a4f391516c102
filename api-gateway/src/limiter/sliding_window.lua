-- Rate-limit decisions: the sliding-window counter with a per-key anchor (ADR 0006).
-- The same arithmetic as window.rs, which the local limiter runs; keep the two in step.
--
-- One call decides a batch, in order; a key may appear more than once (each decision sees
-- the ones before it). For the i-th decision:
-- KEYS[i]        hash {s = current window start, p = previous window count, c = current count}
-- ARGV[3i - 2]   now, microseconds since the Unix epoch (the caller's clock)
-- ARGV[3i - 1]   window, microseconds (>= 1000)
-- ARGV[3i]       limit (>= 1)
-- Returns, for each decision in turn, in one flat list: an allowed one as two integers,
-- remaining and reset us; a refused one as three, -(remaining + 1), reset us and retry_after
-- us (the sign of the first tells them apart). Most decisions are allowed, and each integer
-- in the reply costs the gateway's RESP parser about a thousand instructions.
-- Lua numbers are doubles: exact while limit x window stays below 2^53.

local floor, min, ceil = math.floor, math.min, math.ceil

local function decide(key, now, window, limit)
  local state = redis.call('HMGET', key, 's', 'p', 'c')
  local anchor = tonumber(state[1])
  local start = anchor
  local prev = tonumber(state[2]) or 0
  local cur = tonumber(state[3]) or 0
  if start == nil then
    start, prev, cur = now, 0, 0
  end
  if now < start then
    -- A replica whose clock runs ahead opened this window: count at its first instant.
    now = start
  end
  local passed = floor((now - start) / window)
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
  local remaining = floor(room / window) - cur
  if remaining < 0 then remaining = 0 end

  if allowed then
    -- Numbers go to Redis as exact integers (below 2^53). The expiry only moves when the
    -- window does: the state matters until two windows after its start, and an expiry set
    -- when the window opened already lasts that long.
    if start == anchor then
      redis.call('HSET', key, 'c', cur)
    else
      redis.call('HSET', key, 's', start, 'p', prev, 'c', cur)
      redis.call('PEXPIRE', key, ceil(2 * window / 1000))
    end
    return 1, remaining, left, -1
  end

  -- Refused: the earliest instant one more request fits. First within this window, as the
  -- previous window's weight decays; otherwise in the next, where cur becomes the previous.
  local retry = -1
  if cur < limit and prev > 0 then
    local at = window - min(floor((limit - cur - 1) * window / prev), window)
    if at < window then retry = at - elapsed end
  end
  if retry < 0 then
    local at = 0
    if cur > 0 then
      at = window - min(floor((limit - 1) * window / cur), window)
    end
    retry = window - elapsed + at
  end
  local reset = left
  if retry > reset then reset = retry end
  return 0, remaining, reset, retry
end

local out, n = {}, 0
for i = 1, #KEYS do
  local allowed, remaining, reset, retry = decide(KEYS[i], tonumber(ARGV[3 * i - 2]),
    tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]))
  if allowed == 1 then
    out[n + 1], out[n + 2] = remaining, reset
    n = n + 2
  else
    out[n + 1], out[n + 2], out[n + 3] = -(remaining + 1), reset, retry
    n = n + 3
  end
end
return out
