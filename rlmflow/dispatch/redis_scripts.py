"""The Lua scripts that keep shared lanes and budgets atomic in Redis.

Each script runs as one atomic step on the server, so N processes see one lane: a check and the
admission it allows cannot interleave with another process's. Time is the server's (``TIME``),
so hosts with drifting clocks agree on every window. Times are milliseconds; floats are returned
as strings because Redis truncates Lua numbers to integers.

Keys of a lane (``{...}`` is a Redis Cluster hash tag, so a lane's keys live on one node):

- ``<ns>:{lane:<key>}:win``: sorted set, admission id -> admission time (the RPM/TPM window);
- ``<ns>:{lane:<key>}:amt``: hash, admission id -> tokens counted for it (corrected after the call);
- ``<ns>:{lane:<key>}:state``: hash, ``used`` (tokens in the window), ``limit`` (the adaptive
  concurrency limit all processes agree on), ``lastdec``, ``decreases``, ``paused`` (until when);
- ``<ns>:{lane:<key>}:slots``: sorted set, admission id -> lease expiry (calls in flight);
- ``<ns>:{lane:<key>}:replicas``: sorted set, process id -> last seen (N, for the 1/N fallback).

Keys of a shared budget: ``<ns>:{budget:<name>}:state`` (spent and reserved per quantity),
``:leases`` (reservation id -> lease expiry) and ``:amt`` (reservation id:quantity -> amount).
"""

from __future__ import annotations

__all__ = [
    "BUDGET_RELEASE",
    "BUDGET_RENEW",
    "BUDGET_RESERVE",
    "HEARTBEAT",
    "LANE_ACQUIRE",
    "LANE_RELEASE",
    "LANE_RENEW",
    "LANE_REPLAY",
]

# Shared prologue: the server's clock in ms, and a chunked unpack (Lua's stack holds ~8000 values).
_NOW = """
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + tonumber(_t[2]) / 1000
local function chunks(list, size)
  local out = {}
  for i = 1, #list, size do
    local part = {}
    for j = i, math.min(i + size - 1, #list) do part[#part + 1] = list[j] end
    out[#out + 1] = part
  end
  return out
end
"""

_EXPIRE_WINDOW = """
local function expire_window(win, amt, state, window)
  local used = tonumber(redis.call('HGET', state, 'used') or '0')
  local old = redis.call('ZRANGEBYSCORE', win, '-inf', now - window)
  for _, part in ipairs(chunks(old, 1000)) do
    local amounts = redis.call('HMGET', amt, unpack(part))
    for i = 1, #part do used = used - tonumber(amounts[i] or '0') end
    redis.call('HDEL', amt, unpack(part))
  end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', win, '-inf', now - window) end
  local count = redis.call('ZCARD', win)
  if count == 0 then used = 0 end  -- forget float drift
  redis.call('HSET', state, 'used', tostring(used))
  return count, used
end
"""

#: KEYS: win, amt, state, slots, replicas. ARGV: rpm (0: none), tpm (0: none), window_ms,
#: max_concurrency, initial_limit, lease_ms, replica id, then (id, tokens) pairs in line order.
#: Admits the longest prefix of the pairs that fits (one round trip admits a burst). Returns
#: {admitted, status, wait_ms, in_flight, limit, now_ms, replicas}: for the first pair not admitted,
#: status 0 means wait ``wait_ms`` (window or pause) and -1 every slot is taken (wait for a
#: release, at most ``wait_ms`` until the earliest lease ends).
LANE_ACQUIRE = _NOW + _EXPIRE_WINDOW + """
local win, amt, state, slots = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local rpm, tpm, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local maxc, initial, lease = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local count, used = expire_window(win, amt, state, window)
redis.call('ZADD', KEYS[5], now, ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - lease)
local replicas = redis.call('ZCARD', KEYS[5])
redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)  -- leases of crashed processes end here
local in_flight = redis.call('ZCARD', slots)
local limit = math.floor(math.min(maxc, tonumber(redis.call('HGET', state, 'limit') or initial)))
local paused = tonumber(redis.call('HGET', state, 'paused') or '0')
local admitted, status, wait = 0, 1, 0
for p = 8, #ARGV, 2 do
  local id, tokens = ARGV[p], tonumber(ARGV[p + 1])
  if in_flight >= limit then
    local first = redis.call('ZRANGE', slots, 0, 0, 'WITHSCORES')
    status, wait = -1, tonumber(first[2]) - now
    -- someone waits for a slot: releases announce themselves for a while (see LANE_RELEASE)
    redis.call('HSET', state, 'waiting', tostring(now + 1000))
    break
  end
  if paused > now then wait = paused - now end
  if rpm > 0 and count + 1 > rpm then
    local e = redis.call('ZRANGE', win, count - rpm, count - rpm, 'WITHSCORES')
    wait = math.max(wait, tonumber(e[2]) + window - now)
  end
  if tpm > 0 then
    if tokens > tpm then tokens = tpm end  -- an amount above the limit waits for an empty window
    local excess = used + tokens - tpm
    if excess > 1e-6 then
      local entries = redis.call('ZRANGE', win, 0, -1, 'WITHSCORES')
      local freed = 0
      for i = 1, #entries, 2 do
        freed = freed + tonumber(redis.call('HGET', amt, entries[i]) or '0')
        if freed >= excess - 1e-6 then
          wait = math.max(wait, tonumber(entries[i + 1]) + window - now)
          break
        end
      end
    end
  end
  if wait > 0 then
    status = 0
    break
  end
  redis.call('ZADD', win, now, id)
  redis.call('HSET', amt, id, tostring(tokens))
  redis.call('ZADD', slots, now + lease, id)
  used = used + tokens
  count = count + 1
  in_flight = in_flight + 1
  admitted = admitted + 1
end
if admitted > 0 then
  redis.call('HSET', state, 'used', tostring(used))
  local ttl = math.ceil(window + lease) + 60000  -- an idle lane's keys go away on their own
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
end
return {admitted, status, tostring(wait), in_flight, limit, tostring(now), replicas}
"""

#: KEYS: win, amt, state, slots. ARGV: id, outcome, tokens_used (<0: keep the estimate), pause_ms,
#: max_concurrency, initial_limit, backoff_ratio, round_trip_ms, channel. Returns {limit, in_flight}.
#: The limit every process agrees on: slow start (one more per success while the lane is busy,
#: so it doubles each round trip) until a load-related refusal (``throttled``: each process judges
#: its own refusals); then a multiplicative cut, at most once per round trip however many
#: processes were refused, and one more per round trip (1/limit per success); four round trips
#: without a cut resume slow start. ``refused`` (a random refusal) and ``error`` change nothing;
#: ``pause`` only pauses.
LANE_RELEASE = _NOW + """
local win, amt, state, slots = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, outcome, tokens_used, pause = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local maxc, initial, ratio, rtt = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
redis.call('ZREM', slots, id)
local in_flight = redis.call('ZCARD', slots)
if tokens_used >= 0 then
  local old = redis.call('HGET', amt, id)
  if old then  -- still inside the window: replace the estimate by the real usage
    redis.call('HSET', amt, id, tostring(tokens_used))
    redis.call('HINCRBYFLOAT', state, 'used', tostring(tokens_used - tonumber(old)))
  end
end
local limit = math.min(maxc, tonumber(redis.call('HGET', state, 'limit') or initial))
local last = tonumber(redis.call('HGET', state, 'lastdec') or '-1e18')
local slow = redis.call('HGET', state, 'slow') ~= '0' or now - last > 4 * rtt
if outcome == 'success' then
  if (in_flight + 1) * 2 >= limit and limit < maxc then
    if slow then limit = limit + 1 else limit = limit + 1 / limit end
    redis.call('HSET', state, 'limit', tostring(math.min(maxc, limit)), 'slow', slow and '1' or '0')
  end
elseif outcome == 'throttled' then
  if now - last >= rtt then
    limit = math.max(1, math.floor(limit * ratio))
    redis.call('HSET', state, 'limit', tostring(limit), 'lastdec', tostring(now), 'slow', '0')
    redis.call('HINCRBY', state, 'decreases', 1)
  end
end
if pause > 0 then
  local paused = tonumber(redis.call('HGET', state, 'paused') or '0')
  redis.call('HSET', state, 'paused', tostring(math.max(paused, now + pause)))
end
if now < tonumber(redis.call('HGET', state, 'waiting') or '0') then
  redis.call('PUBLISH', ARGV[9], id)  -- wake the processes waiting for a slot
end
return {math.floor(limit), in_flight}
"""

#: KEYS: slots, replicas. ARGV: lease_ms, replica id, ids... Marks the process present on the lane
#: and extends the leases of its calls in flight (a lease that already ended is not revived).
#: Returns {replicas on the lane, leases renewed}.
LANE_RENEW = _NOW + """
local lease = tonumber(ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - lease)
local held = 0
for i = 3, #ARGV do
  held = held + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease, ARGV[i])
end
return {redis.call('ZCARD', KEYS[2]), held}
"""

#: KEYS: win, amt, state. ARGV: window_ms, then (id, at_ms, tokens) triples. After Redis came back
#: (empty or stale), each process writes back what it admitted in the last window, so the shared
#: window counts calls made while it was away.
LANE_REPLAY = _NOW + _EXPIRE_WINDOW + """
local window = tonumber(ARGV[1])
local count, used = expire_window(KEYS[1], KEYS[2], KEYS[3], window)
local added = 0
for i = 2, #ARGV, 3 do
  local at, tokens = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if at > now - window and not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], at, ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i], tostring(tokens))
    used = used + tokens
    added = added + 1
  end
end
redis.call('HSET', KEYS[3], 'used', tostring(used))
return added
"""

#: KEYS: replicas. ARGV: replica id, ttl_ms. Marks this process alive; returns
#: {live replicas, now_ms}.
HEARTBEAT = _NOW + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return {redis.call('ZCARD', KEYS[1]), tostring(now)}
"""

_BUDGET_COMMON = """
local Q = {'calls', 'input_tokens', 'output_tokens', 'cost_usd'}
local state, leases, amt = KEYS[1], KEYS[2], KEYS[3]
local function get(field) return tonumber(redis.call('HGET', state, field) or '0') end
local function add(field, delta) redis.call('HSET', state, field, tostring(get(field) + delta)) end
local function held(id)
  local a = redis.call('HMGET', amt, id .. ':1', id .. ':2', id .. ':3', id .. ':4')
  if not a[1] then return nil end
  return {tonumber(a[1]), tonumber(a[2]), tonumber(a[3]), tonumber(a[4])}
end
local function forget(id)
  redis.call('HDEL', amt, id .. ':1', id .. ':2', id .. ':3', id .. ':4')
  redis.call('ZREM', leases, id)
end
-- A reservation whose lease ended belonged to a process that died: its call may have been sent
-- and billed, so it is charged at its worst case (never given back: the cap cannot be overspent).
local stale = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
for _, id in ipairs(stale) do
  local a = held(id)
  if a then
    for q = 1, 4 do add('reserved_' .. Q[q], -a[q]); add('spent_' .. Q[q], a[q]) end
    redis.call('HINCRBY', state, 'expired', 1)
  end
  forget(id)
end
"""

#: KEYS: state, leases, amt. ARGV: lease_ms, four caps (<0: none), then (id, calls, input,
#: output, cost) groups. All or nothing: returns {1} when every reservation is held, else
#: {0, index of the cap crossed (1-4), spent..., reserved...} and holds nothing.
BUDGET_RESERVE = _NOW + _BUDGET_COMMON + """
local lease = tonumber(ARGV[1])
local total = {0, 0, 0, 0}
for i = 6, #ARGV, 5 do
  for q = 1, 4 do total[q] = total[q] + tonumber(ARGV[i + q]) end
end
for q = 1, 4 do
  local cap = tonumber(ARGV[1 + q])
  if cap >= 0 and get('spent_' .. Q[q]) + get('reserved_' .. Q[q]) + total[q] > cap + 1e-9 then
    local out = {0, q}
    for r = 1, 4 do out[#out + 1] = tostring(get('spent_' .. Q[r])) end
    for r = 1, 4 do out[#out + 1] = tostring(get('reserved_' .. Q[r])) end
    return out
  end
end
for i = 6, #ARGV, 5 do
  local id = ARGV[i]
  redis.call('ZADD', leases, now + lease, id)
  for q = 1, 4 do redis.call('HSET', amt, id .. ':' .. q, ARGV[i + q]) end
end
for q = 1, 4 do add('reserved_' .. Q[q], total[q]) end
return {1}
"""

#: KEYS: state, leases, amt. ARGV: (id, calls, input, output, cost) groups of what each call
#: really spent (zeros for a release). Returns {spent...} after settling. A reservation already
#: charged by its lease's end is not charged twice.
BUDGET_RELEASE = _NOW + _BUDGET_COMMON + """
for i = 1, #ARGV, 5 do
  local a = held(ARGV[i])
  if a then
    for q = 1, 4 do
      add('reserved_' .. Q[q], -a[q])
      add('spent_' .. Q[q], tonumber(ARGV[i + q]))
    end
    forget(ARGV[i])
  end
end
local out = {}
for q = 1, 4 do out[q] = tostring(get('spent_' .. Q[q])) end
return out
"""

#: KEYS: leases. ARGV: lease_ms, ids... Extends the leases of reservations still held.
BUDGET_RENEW = _NOW + """
local held = 0
for i = 2, #ARGV do
  held = held + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[i])
end
return held
"""
