"""The Lua scripts of the Redis engine: each queue operation is one of them, so it is atomic.

Every script gets the queue's five keys (``QueueKeys.all``) as KEYS and derives the keys of its
cursors from the same prefix, so all of them share the queue's hash tag (one Cluster slot).
Times are the broker clock's seconds, passed in by the caller as ``repr(float)`` text and
written back with ``%.17g``, so they round-trip exactly: timers follow a ManualClock, never
Redis's own clock or PEL idle times.

A cursor ``C`` keeps:

- ``c:C`` hash: ``pos``, its settings (``manual``, ``timeout``, ``maxd``, ``b0``..``b2``
  backoff, ``filt``, ``settings`` as stored JSON), counters, ``learned`` and the ready-line
  sequence numbers ``rseq``/``rmin``;
- ``c:C:held`` zset: every pending offset (score: the offset), what retention must keep;
- ``c:C:att`` hash: delivery attempts of each pending offset, except those delivered once
  (a take writes no count for a first delivery; :func:`attempts` reads a missing one as 1);
- ``c:C:own`` hash: the consumer holding each OUT offset and since when, as ``'<consumer> <time>'``
  (``c:C:sin`` held the time of entries written before that, which :func:`since` still reads);
- ``c:C:tmo`` zset: ack deadlines of OUT offsets; ``c:C:due`` zset: WAITING offsets by due
  time; ``c:C:rdy`` zset: READY offsets in line order;
- ``c:C:names`` hash: event name -> ``1``/``0``, whether the cursor's filter matches it.

Filters are matched in Python, the only implementation of the patterns: a filtered cursor's
``names`` must cover every name in the queue's ``events`` hash (``learned`` = its size), else a
script that needs them replies ``{'relearn', C}`` before changing anything.
"""

from __future__ import annotations

import re

__all__ = ["SCRIPTS"]

_PRELUDE = r"""
local meta, log, cursors, events, sig = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix = string.sub(meta, 1, #meta - 4)
local function sid(o) return '0-' .. (o + 1) end
local function off(id) return tonumber(string.sub(id, 3)) - 1 end
local function fmt(x) return string.format('%.17g', x) end
local function ck(c, part) return prefix .. 'c:' .. c .. part end
local function num(x, d) if x == false or x == nil or x == '' then return d end return tonumber(x) end
local function signal() redis.call('XADD', sig, 'MAXLEN', '~', '64', '*', 's', '1') end
-- A transaction's hold on a queue, meta's ``tx`` field: '<age> <id> <heartbeat key of its broker>'.
-- While it is set, only that transaction's commit publishes to the queue; it lapses with the
-- holder's broker (its heartbeat key expires).
local function holder_alive(h)
  local live = string.match(h, '^%S+ %S+ (.*)$')
  return live ~= nil and redis.call('EXISTS', live) == 1
end

local function cfg()
  local r = redis.call('HMGET', meta, 'retention', 'max_messages', 'overflow', 'max_age')
  return {retention = r[1], max = num(r[2], nil), overflow = r[3], age = num(r[4], nil)}
end
local function bounds()
  local r = redis.call('HMGET', meta, 'start', 'end')
  return num(r[1], 0), num(r[2], 0)
end
-- cfg() and bounds() in one read, for the scripts that need both on their common path.
local function cfg_bounds()
  local r = redis.call('HMGET', meta, 'retention', 'max_messages', 'overflow', 'max_age', 'start', 'end')
  return {retention = r[1], max = num(r[2], nil), overflow = r[3], age = num(r[4], nil)}, num(r[5], 0), num(r[6], 0)
end
-- redis.call(cmd, key, items...) in slices: unpack() is bounded by Lua's C stack (8000 slots).
-- Slices hold an even number of items, so (score, member) and (field, value) pairs stay whole.
local function bulk(cmd, key, items)
  for i = 1, #items, 4000 do redis.call(cmd, key, unpack(items, i, math.min(i + 3999, #items))) end
end
-- The same for a read (ZMSCORE, HMGET): the replies of every slice, in order.
local function bulk_read(cmd, key, items)
  local out = {}
  for i = 1, #items, 4000 do
    local r = redis.call(cmd, key, unpack(items, i, math.min(i + 3999, #items)))
    for j = 1, #r do out[#out + 1] = r[j] end
  end
  return out
end
local function fields(item)
  local f = item[2]
  local m = {}
  for i = 1, #f, 2 do m[f[i]] = f[i + 1] end
  return m
end
local function entry(o)
  local r = redis.call('XRANGE', log, sid(o), sid(o))
  if #r == 0 then return nil end
  local m = fields(r[1])
  return {o, m.e, m.p, m.t, m.k or false, m.h or false}
end
local function loadcur(c)
  local r = redis.call('HMGET', ck(c, ''), 'pos', 'manual', 'timeout', 'maxd', 'b0', 'b1', 'b2', 'filt', 'learned')
  if not r[1] then return nil end
  return {pos = tonumber(r[1]), manual = r[2] == '1', timeout = num(r[3], nil), maxd = num(r[4], nil),
          b0 = tonumber(r[5]), b1 = tonumber(r[6]), b2 = tonumber(r[7]), filt = r[8] == '1',
          learned = num(r[9], 0)}
end
local function known(cur)
  return (not cur.filt) or cur.learned == redis.call('HLEN', events)
end
local function matcher(c, cur)
  if not cur.filt then return nil end
  local names = ck(c, ':names')
  local cache = {}
  return function(ev)
    local v = cache[ev]
    if v == nil then
      v = redis.call('HGET', names, ev) == '1'
      cache[ev] = v
    end
    return v
  end
end
local function count(match, from, to)
  if to <= from then return 0 end
  if match == nil then return to - from end
  local n = 0
  local at = from
  while at < to do
    local r = redis.call('XRANGE', log, sid(at), sid(to - 1), 'COUNT', 1000)
    if #r == 0 then break end
    for _, item in ipairs(r) do
      if match(fields(item).e) then n = n + 1 end
    end
    at = off(r[#r][1]) + 1
  end
  return n
end
local function limit_floor(start, stop, c, now)
  if c.max and c.overflow == 'drop_oldest' and stop - c.max > start then start = stop - c.max end
  if c.age then
    local cutoff = now - c.age
    while start < stop do
      local r = redis.call('XRANGE', log, sid(start), sid(stop - 1), 'COUNT', 100)
      if #r == 0 then return stop end
      for _, item in ipairs(r) do
        if tonumber(fields(item).t) >= cutoff then return start end
        start = off(item[1]) + 1
      end
    end
  end
  return start
end
-- Apply retention: the limits floor, skipping cursors below it (counting what they missed),
-- the interest floor, and the physical trim below everything still pinned.
local function housekeep(now)
  local c = cfg()
  local start, stop = bounds()
  local s = limit_floor(start, stop, c, now)
  local phys = s
  local slowest = stop
  for _, cid in ipairs(redis.call('SMEMBERS', cursors)) do
    local cur = loadcur(cid)
    local pos = cur.pos
    if pos < s and known(cur) then
      redis.call('HINCRBY', ck(cid, ''), 'missed', count(matcher(cid, cur), pos, s))
      redis.call('HSET', ck(cid, ''), 'pos', s)
      pos = s
    end
    if pos < slowest then slowest = pos end
    if pos < phys then phys = pos end
    local held = redis.call('ZRANGE', ck(cid, ':held'), 0, 0)
    if #held > 0 and tonumber(held[1]) < phys then phys = tonumber(held[1]) end
  end
  if c.retention == 'interest' and slowest > s then s = slowest end
  if s ~= start then redis.call('HSET', meta, 'start', s) end
  if s < phys then phys = s end
  if phys > num(redis.call('HGET', meta, 'trimmed'), 0) then
    redis.call('XTRIM', log, 'MINID', sid(phys))
    redis.call('HSET', meta, 'trimmed', phys)
  end
  return s, stop
end
-- How many times pending offset o was delivered. A take writes no count for a first delivery,
-- so a pending offset without one was delivered once (measured: writing the counts of a
-- poll(100)'s first deliveries was a tenth of its server time). give_back writes 0 explicitly.
-- An OUT offset's ':own' entry is '<consumer> <time delivered>': one field per delivery rather
-- than one in each of two hashes (measured: the second hash's HSET of a poll(100) and HDEL of
-- its ack cost ~200 us of server time). Consumer ids never hold a space. An entry without a
-- time was written before, with its time in ':sin'.
local function owner(v)
  if not v then return v end
  return string.match(v, '^[^ ]*')
end
local function since(c, o, v)
  local t = v and string.match(v, ' (.*)$')
  if t then return t end
  return redis.call('HGET', ck(c, ':sin'), o)
end
local function attempts(c, o)
  return num(redis.call('HGET', ck(c, ':att'), o), 1)
end
-- Drop every trace of the offsets in ``list`` from the cursor: a variadic call per structure,
-- whatever its length, skipping the empty ones (dead letters, deadlines, waiting and ready
-- lines are usually empty; an O(1) EXISTS costs far less than a call carrying every offset).
local forget_parts = {{':dit', 'HDEL'}, {':sin', 'HDEL'}, {':held', 'ZREM'}, {':att', 'HDEL'}, {':own', 'HDEL'},
  {':tmo', 'ZREM'}, {':due', 'ZREM'}, {':rdy', 'ZREM'}}
local function forget_all(c, list)
  if #list == 0 then return end
  for _, part in ipairs(forget_parts) do
    local key = ck(c, part[1])
    if #list == 1 or redis.call('EXISTS', key) == 1 then bulk(part[2], key, list) end
  end
end
local function forget(c, o) forget_all(c, {o}) end
local function ready_append(c, o)
  redis.call('ZADD', ck(c, ':rdy'), redis.call('HINCRBY', ck(c, ''), 'rseq', 1), o)
end
-- A delivery failed: dead-letter it if it used up its deliveries, else retry it (now or later).
-- A dead letter stays held, marked in ':dit' with who must publish it, until that broker
-- reports it published (dead_sent); if the broker dies first, the reaper makes it ready again:
-- a letter may be published twice, never lost.
local function fail(c, cur, o, reason, delay, err, now, dead, who)
  local att = attempts(c, o)
  redis.call('HDEL', ck(c, ':own'), o)
  redis.call('ZREM', ck(c, ':tmo'), o)
  if cur.maxd and att >= cur.maxd then
    redis.call('ZREM', ck(c, ':due'), o)
    redis.call('ZREM', ck(c, ':rdy'), o)
    redis.call('HSET', ck(c, ':dit'), o, who)
    redis.call('HINCRBY', ck(c, ''), 'dead', 1)
    local e = entry(o)
    if e then dead[#dead + 1] = {o, att, reason, err or false, e[2], e[3], e[4], e[5], e[6]} end
  elseif delay > 0 then
    redis.call('ZADD', ck(c, ':due'), fmt(now + delay), o)
  else
    ready_append(c, o)
  end
end
-- How many messages are pending on a cursor: held, less the dead letters on their way out.
local function pending(c)
  return redis.call('ZCARD', ck(c, ':held')) - redis.call('HLEN', ck(c, ':dit'))
end
-- Undo the delivery of offsets a consumer took but never handed to user code: back to the
-- front of the line, in order, without counting an attempt.
local function give_back(c, cur, list, pulled)
  if #list == 0 then return end
  local K = ck(c, '')
  local rmin = num(redis.call('HGET', K, 'rmin'), 0)
  for i, o in ipairs(list) do
    if redis.call('ZSCORE', ck(c, ':held'), o) then
      local att = attempts(c, o) - 1
      redis.call('HSET', ck(c, ':att'), o, att)
      if att > 0 then redis.call('HINCRBY', K, 'redelivered', -1) end
      redis.call('HDEL', ck(c, ':own'), o)
      redis.call('ZREM', ck(c, ':tmo'), o)
      redis.call('ZREM', ck(c, ':due'), o)
    else
      redis.call('ZADD', ck(c, ':held'), o, o)
      redis.call('HSET', ck(c, ':att'), o, 0)
    end
    redis.call('ZADD', ck(c, ':rdy'), rmin - #list + i - 1, o)
  end
  redis.call('HSET', K, 'rmin', rmin - #list)
  redis.call('HINCRBY', K, 'delivered', -#list)
  if pulled and not cur.manual then redis.call('HINCRBY', K, 'acked', -#list) end
  signal()
end
local function first_score(key)
  local r = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #r == 0 then return nil end
  return tonumber(r[2])
end
local function next_due(c)
  local a, b = first_score(ck(c, ':tmo')), first_score(ck(c, ':due'))
  if a and b then return math.min(a, b) end
  return a or b
end
local function resolve(kind, v, now)
  if kind == 'latest' then local _, stop = bounds() return stop end
  local s, stop = housekeep(now)
  if kind == 'earliest' then return s end
  if kind == 'time' then
    local stamp = tonumber(v)
    local lo, hi = s, stop
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local e = entry(mid)
      if e and tonumber(e[4]) < stamp then lo = mid + 1 else hi = mid end
    end
    return lo
  end
  local o = tonumber(v)
  if o < 0 or o > stop then return redis.error_reply('BADOFFSET ' .. stop) end
  if o < s then return s end
  return o
end
local function settings_args(c, base)
  -- ARGV[base ..]: manual, timeout, maxd, b0, b1, b2, filt, settings json, filter spec json.
  -- A new filter makes the cursor learn every event name again.
  local K = ck(c, '')
  if redis.call('HGET', K, 'spec') ~= ARGV[base + 8] then
    redis.call('DEL', ck(c, ':names'))
    redis.call('HSET', K, 'learned', 0)
  end
  redis.call('HSET', K, 'manual', ARGV[base], 'timeout', ARGV[base + 1], 'maxd', ARGV[base + 2],
    'b0', ARGV[base + 3], 'b1', ARGV[base + 4], 'b2', ARGV[base + 5], 'filt', ARGV[base + 6],
    'settings', ARGV[base + 7], 'spec', ARGV[base + 8])
end
-- Liveness: a consumer id is '<broker id>/<subscription id>'; a broker is alive while its
-- heartbeat key '<live prefix><broker id>' exists.
local alive_cache = {}
local function broker_alive(live, bid)
  local v = alive_cache[bid]
  if v == nil then
    v = redis.call('EXISTS', live .. bid) == 1
    alive_cache[bid] = v
  end
  return v
end
local function consumer_alive(live, who)
  local bid = string.match(who, '^([^/]*)/')
  return bid == nil or broker_alive(live, bid)
end
-- Why offset o of cursor c cannot be acked (or, with ``nack``, nacked) now: 'NOTPENDING' (not
-- held, or a dead letter in transit), 'WAITING' (a nack of one not out to a consumer), or nil.
local function unsettleable(c, o, nack)
  if not redis.call('ZSCORE', ck(c, ':held'), o) or redis.call('HEXISTS', ck(c, ':dit'), o) == 1 then
    return 'NOTPENDING'
  end
  if nack and redis.call('HEXISTS', ck(c, ':own'), o) == 0 then return 'WAITING' end
  return nil
end
-- The duplicate window is two structures under the queue's prefix: ``dd`` hash (id -> "offset
-- time" of its first publish) and ``ddz`` zset (the ids in the order of their first publish, by a
-- sequence number from meta's ``ddseq``: by time alone, ids published at one instant would be
-- evicted in the order of their names), pruned past the window and the bound.
-- dedup_find: the entry first published with ``id`` within the window (a stub if it is trimmed), or nil.
local function dedup_find(id, window, now)
  local v = redis.call('HGET', prefix .. 'dd', id)
  if not v then return nil end
  local sep = string.find(v, ' ', 1, true)
  local o, at = tonumber(string.sub(v, 1, sep - 1)), string.sub(v, sep + 1)
  if tonumber(at) + window <= now then return nil end
  return entry(o) or {o, false, false, at, false, false}
end
-- Record ``ids`` (index from 0 among messages published from offset ``stop`` at ``ts`` -> id), in
-- order, and prune the window: up to 16 expired ids (the oldest first: a queue's times never run
-- back, so the expired ones lead the order), and the oldest beyond ``maxids``.
local function dedup_remember(ids, stop, ts, now, window, maxids)
  local dd, ddz = prefix .. 'dd', prefix .. 'ddz'
  local order = {}
  for k in pairs(ids) do order[#order + 1] = k end
  table.sort(order)
  if #order > 0 then
    local seq = redis.call('HINCRBY', meta, 'ddseq', #order) - #order
    for i, k in ipairs(order) do
      redis.call('HSET', dd, ids[k], (stop + k) .. ' ' .. ts)
      redis.call('ZADD', ddz, seq + i, ids[k])
    end
  end
  local old = {}
  local first = redis.call('ZRANGE', ddz, 0, 15)
  if #first > 0 then
    local at = redis.call('HMGET', dd, unpack(first))
    for i, id in ipairs(first) do
      local v = at[i]
      if v and tonumber(string.sub(v, string.find(v, ' ', 1, true) + 1)) + window > now then break end
      old[#old + 1] = id
    end
  end
  local size = redis.call('ZCARD', ddz) - #old
  if size > maxids then
    for _, id in ipairs(redis.call('ZRANGE', ddz, #old, #old + size - maxids - 1)) do old[#old + 1] = id end
  end
  if #old > 0 then
    redis.call('HDEL', dd, unpack(old))
    redis.call('ZREM', ddz, unpack(old))
  end
end
local function drop_cursor(c)
  redis.call('DEL', ck(c, ''), ck(c, ':held'), ck(c, ':att'), ck(c, ':own'), ck(c, ':tmo'), ck(c, ':due'),
    ck(c, ':rdy'), ck(c, ':names'), ck(c, ':mem'), ck(c, ':dit'), ck(c, ':sin'))
  redis.call('SREM', cursors, c)
end
"""

_OPEN = r"""
-- ARGV: retention, max_messages, overflow, max_age, dedup_window, dedup_max_ids, queues-registry key, queue name
if redis.call('EXISTS', meta) == 0 then
  redis.call('HSET', meta, 'retention', ARGV[1], 'max_messages', ARGV[2], 'overflow', ARGV[3],
    'max_age', ARGV[4], 'dedup_window', ARGV[5], 'dedup_max_ids', ARGV[6], 'start', 0, 'end', 0, 'trimmed', 0)
  redis.call('HSET', ARGV[7], ARGV[8], '1')
end
local r = redis.call('HMGET', meta, 'retention', 'max_messages', 'overflow', 'max_age', 'dedup_window', 'dedup_max_ids')
return r
"""

_CONFIGURE = r"""
-- ARGV: now, retention, max_messages, overflow, max_age, dedup_window, dedup_max_ids
redis.call('HSET', meta, 'retention', ARGV[2], 'max_messages', ARGV[3], 'overflow', ARGV[4], 'max_age', ARGV[5],
  'dedup_window', ARGV[6], 'dedup_max_ids', ARGV[7])
housekeep(tonumber(ARGV[1]))
return 1
"""

_PUBLISH = r"""
-- ARGV: now, count, then per message: event, payload, key ('' or '=' .. bytes), headers (same).
-- Retention in full (every cursor) only where it must be exact now: before a publish that
-- may be refused, and every 64th offset; otherwise the O(1) part (limits, no cursors left).
-- The common path is one read of meta, the XADDs, one HSETNX per distinct event name and one
-- write of meta (SLOWLOG median of a one-message publish: 60 us when it read meta three times
-- and the script defined every helper, 51 us now; a bare XADD takes 4-5 us).
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local r = redis.call('HMGET', meta, 'retention', 'max_messages', 'overflow', 'max_age', 'start', 'end', 'last_t', 'tx')
if r[8] then
  if holder_alive(r[8]) then return redis.error_reply('TXBUSY ' .. r[8]) end
  redis.call('HDEL', meta, 'tx')  -- the holder's broker is gone: so is its hold
end
local c = {retention = r[1], max = num(r[2], nil), overflow = r[3], age = num(r[4], nil)}
local start, stop = num(r[5], 0), num(r[6], 0)
if c.overflow == 'reject' and c.max then
  start, stop = housekeep(now)
  if stop + n - start > c.max then return redis.error_reply('QUEUEFULL ' .. (stop - start)) end
end
local ts = ARGV[1]
local last = r[7]
if last and tonumber(last) > now then ts = last end
local named = {}
for i = 0, n - 1 do
  local b = 3 + i * 4
  local event, key, heads = ARGV[b], ARGV[b + 2], ARGV[b + 3]
  if key == '' and heads == '' then
    redis.call('XADD', log, sid(stop + i), 'e', event, 'p', ARGV[b + 1], 't', ts)
  else
    local args = {'XADD', log, sid(stop + i), 'e', event, 'p', ARGV[b + 1], 't', ts}
    if key ~= '' then args[#args + 1] = 'k'; args[#args + 1] = string.sub(key, 2) end
    if heads ~= '' then args[#args + 1] = 'h'; args[#args + 1] = string.sub(heads, 2) end
    redis.call(unpack(args))
  end
  if not named[event] then
    named[event] = true
    redis.call('HSETNX', events, event, '1')
  end
end
redis.call('HSET', meta, 'end', stop + n, 'last_t', ts)
if math.floor((stop + n) / 64) ~= math.floor(stop / 64) then
  housekeep(now)
else
  local s = limit_floor(start, stop + n, c, now)
  if c.retention == 'interest' and redis.call('SCARD', cursors) == 0 then s = stop + n end
  if s ~= start then redis.call('HSET', meta, 'start', s) end
end
return {stop, ts}
"""

_BOUNDS = r"""
local s, stop = housekeep(tonumber(ARGV[1]))
return {s, stop}
"""

_ATTACH = r"""
-- ARGV: cursor, kind, value, now, consumer, mode ('push'/'pull'), live prefix, then the 9 settings
-- values. A cursor that exists keeps its place; it takes new settings only when no live
-- consumer (of any broker) is attached to it.
local c, who, mode, live = ARGV[1], ARGV[5], ARGV[6], ARGV[7]
local K = ck(c, '')
local r = redis.call('HMGET', K, 'pos', 'settings')
if r[1] then
  if r[2] ~= ARGV[15] then
    local mem = redis.call('HGETALL', ck(c, ':mem'))
    for i = 1, #mem, 2 do
      if consumer_alive(live, mem[i]) then return redis.error_reply('CONFLICT ' .. r[2]) end
      redis.call('HDEL', ck(c, ':mem'), mem[i])
    end
    settings_args(c, 8)
    signal()
  end
  redis.call('HSET', ck(c, ':mem'), who, mode)
  return {0, tonumber(r[1])}
end
local pos = resolve(ARGV[2], ARGV[3], tonumber(ARGV[4]))
if type(pos) == 'table' then return pos end
redis.call('HSET', K, 'pos', pos, 'delivered', 0, 'acked', 0, 'redelivered', 0, 'dead', 0,
  'missed', 0, 'rseq', 0, 'rmin', 0, 'learned', 0, 'seq', redis.call('HINCRBY', meta, 'cseq', 1))
settings_args(c, 8)
redis.call('SADD', cursors, c)
redis.call('HSET', ck(c, ':mem'), who, mode)
return {1, pos}
"""

_RECONFIGURE = r"""
-- ARGV: cursor, the settings json the change was computed from, then the 9 new settings values.
-- Join and leave change the filter for every broker: a compare-and-set, {0, current} if the
-- settings changed meanwhile.
local c = ARGV[1]
local current = redis.call('HGET', ck(c, ''), 'settings')
if not current then return redis.error_reply('NOCURSOR ' .. c) end
if current ~= ARGV[2] then return {0, current} end
settings_args(c, 3)
signal()
return {1, false}
"""

_LEARN = r"""
-- ARGV: cursor, settings json the names were computed for, count, then name, flag pairs
local c = ARGV[1]
local current = redis.call('HGET', ck(c, ''), 'settings')
if not current then return redis.error_reply('NOCURSOR ' .. c) end
if current ~= ARGV[2] then return {0, current} end
local names = ck(c, ':names')
for i = 4, #ARGV, 2 do redis.call('HSET', names, ARGV[i], ARGV[i + 1]) end
redis.call('HSET', ck(c, ''), 'learned', tonumber(ARGV[3]))
return {1, current}
"""

_TAKE = r"""
-- ARGV: cursor, consumer, max, settle ('1': a pull with automatic acks), now, scan limit
local c, who, n, settle, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1', tonumber(ARGV[5])
local limit = tonumber(ARGV[6])
local cur = loadcur(c)
if not cur then return redis.error_reply('NOCURSOR ' .. c) end
if not known(cur) then return {'relearn', c} end
local K = ck(c, '')
local out, dead = {}, {}
for _, o in ipairs(redis.call('ZRANGEBYSCORE', ck(c, ':tmo'), '-inf', ARGV[5])) do
  if redis.call('HEXISTS', ck(c, ':own'), o) == 1 then
    fail(c, cur, o, 'ack timeout', 0, nil, now, dead, who)
  else
    redis.call('ZREM', ck(c, ':tmo'), o)
  end
end
local due = redis.call('ZRANGEBYSCORE', ck(c, ':due'), '-inf', ARGV[5], 'WITHSCORES')
local ready = {}
for i = 1, #due, 2 do ready[#ready + 1] = {tonumber(due[i + 1]), tonumber(due[i])} end
table.sort(ready, function(a, b) if a[1] ~= b[1] then return a[1] < b[1] end return a[2] < b[2] end)
for _, item in ipairs(ready) do
  redis.call('ZREM', ck(c, ':due'), item[2])
  ready_append(c, item[2])
end
local function hold(o, att)
  if settle then
    forget(c, o)
  else
    redis.call('HSET', ck(c, ':own'), o, who .. ' ' .. ARGV[5])
    if cur.manual and cur.timeout then redis.call('ZADD', ck(c, ':tmo'), fmt(now + cur.timeout), o) end
  end
end
local redelivered = 0
while #out < n do
  local r = redis.call('ZRANGE', ck(c, ':rdy'), 0, 0)
  if #r == 0 then break end
  local o = tonumber(r[1])
  redis.call('ZREM', ck(c, ':rdy'), o)
  local att = attempts(c, o) + 1
  redis.call('HSET', ck(c, ':att'), o, att)
  if att > 1 then redelivered = redelivered + 1 end
  hold(o, att)
  local e = entry(o)
  if e then e[7] = att out[#out + 1] = e end
end
local redeliveries = #out
local pos = cur.pos
local more = 0
local stop
if #out < n then
  local qc, start
  qc, start, stop = cfg_bounds()
  local s = limit_floor(start, stop, qc, now)
  if s ~= start then redis.call('HSET', meta, 'start', s) end
  local match = matcher(c, cur)
  if pos < s then
    redis.call('HINCRBY', K, 'missed', count(match, pos, s))
    pos = s
  end
  local scanned = 0
  local fresh = {}
  while #out < n and pos < stop and scanned < limit do
    local batch = n - #out
    if match then batch = 256 end
    local r = redis.call('XRANGE', log, sid(pos), sid(stop - 1), 'COUNT', batch)
    if #r == 0 then pos = stop break end
    for _, item in ipairs(r) do
      if #out >= n then break end
      local o = off(item[1])
      local f = item[2]
      local ev, p, t, k, h
      if f[1] == 'e' and f[3] == 'p' and f[5] == 't' and #f == 6 then  -- as publish writes it, without key or headers
        ev, p, t = f[2], f[4], f[6]
      else
        local m = fields(item)
        ev, p, t, k, h = m.e, m.p, m.t, m.k or false, m.h or false
      end
      scanned = scanned + 1
      pos = o + 1
      if match == nil or match(ev) then
        fresh[#fresh + 1] = o
        -- {offset, event, payload, time}, plus key and headers only when there are some:
        -- the reply's size is a good part of the script's cost.
        if k or h then out[#out + 1] = {o, ev, p, t, k or false, h or false} else out[#out + 1] = {o, ev, p, t} end
      end
    end
  end
  -- What hold() does, for every fresh offset in a few variadic calls (the reads above never
  -- look at what these write, so writing after the scan changes nothing).
  if settle then
    for i, o in ipairs(fresh) do fresh[i] = tostring(o) end
    forget_all(c, fresh)
  elseif #fresh > 0 then
    -- Strings, not numbers: Redis formats every number argument anew, which measured costlier
    -- than the command itself.
    local held, own, holder = {}, {}, who .. ' ' .. ARGV[5]
    for i, o in ipairs(fresh) do
      o = tostring(o)
      fresh[i] = o
      held[2 * i - 1] = o; held[2 * i] = o
      own[2 * i - 1] = o; own[2 * i] = holder
    end
    bulk('ZADD', ck(c, ':held'), held)
    -- A first delivery has no attempt count (see attempts); one left from before a seek back goes.
    if redis.call('EXISTS', ck(c, ':att')) == 1 then bulk('HDEL', ck(c, ':att'), fresh) end
    bulk('HSET', ck(c, ':own'), own)
    if cur.manual and cur.timeout then
      local deadline, tmo = fmt(now + cur.timeout), {}
      for i, o in ipairs(fresh) do tmo[2 * i - 1] = deadline; tmo[2 * i] = o end
      bulk('ZADD', ck(c, ':tmo'), tmo)
    end
  end
  if pos < stop and #out < n then more = 1 end
  redis.call('HSET', K, 'pos', pos)
end
if #out > 0 then
  redis.call('HINCRBY', K, 'delivered', #out)
  if redelivered > 0 then redis.call('HINCRBY', K, 'redelivered', redelivered) end
  if settle then redis.call('HINCRBY', K, 'acked', #out) end
end
local nd = next_due(c)
if stop == nil then stop = select(2, bounds()) end
return {'ok', out, redeliveries, dead, nd and fmt(nd) or false, stop, more}
"""

_ACK = r"""
-- ARGV: cursor, offsets...
-- Every offset is checked (held, and not a dead letter in transit) before anything changes, in
-- one ZCOUNT or ZMSCORE (and one HMGET while dead letters are in transit); then forgotten, one
-- variadic call per structure, whatever their number (SLOWLOG median of an ack of 100: 1,703 us
-- when each offset took ten calls).
local c = ARGV[1]
if not redis.call('HGET', ck(c, ''), 'pos') then return redis.error_reply('NOCURSOR ' .. c) end
local list = {}
for i = 2, #ARGV do list[i - 1] = ARGV[i] end
-- A run of consecutive offsets (a whole batch, acked as it came) is checked with one ZCOUNT:
-- ':held' scores are the offsets, so the run is held iff the count over its range is its
-- length. ZMSCORE looks each member up in turn, which in a small (listpack) zset is a scan each.
local function consecutive(items)
  local first = tonumber(items[1])
  if first == nil then return nil end
  for i, o in ipairs(items) do
    if tostring(first + i - 1) ~= o then return nil end
  end
  return first
end
if #list > 0 then
  local dit = {}
  if redis.call('EXISTS', ck(c, ':dit')) == 1 then dit = bulk_read('HMGET', ck(c, ':dit'), list) end
  local first = consecutive(list)
  local all_held = first ~= nil and redis.call('ZCOUNT', ck(c, ':held'), first, first + #list - 1) == #list
  local held = {}
  if not all_held then held = bulk_read('ZMSCORE', ck(c, ':held'), list) end
  for i, o in ipairs(list) do
    if not (all_held or held[i]) or dit[i] then return redis.error_reply('NOTPENDING ' .. o) end
  end
  forget_all(c, list)
end
redis.call('HINCRBY', ck(c, ''), 'acked', #list)
return 1
"""

_NACK = r"""
-- ARGV: cursor, offset, delay, now, reason, consumer
local c, o = ARGV[1], ARGV[2]
local cur = loadcur(c)
if not cur then return redis.error_reply('NOCURSOR ' .. c) end
local why = unsettleable(c, o, true)
if why then return redis.error_reply(why .. ' ' .. o) end
local dead = {}
fail(c, cur, o, ARGV[5], tonumber(ARGV[3]), nil, tonumber(ARGV[4]), dead, ARGV[6])
signal()
return dead
"""

_PUSH_DONE = r"""
-- ARGV: cursor, consumer, now, done count, batch count, batch offsets..., failure count,
-- (offset, error) pairs..., unprocessed offsets...
local c, who, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cur = loadcur(c)
if not cur then return redis.error_reply('NOCURSOR ' .. c) end
local done, nb = tonumber(ARGV[4]), tonumber(ARGV[5])
local at = 6
local batch = {}
for i = 1, nb do batch[i] = ARGV[at]; at = at + 1 end
local nf = tonumber(ARGV[at]); at = at + 1
local failed, failures = {}, {}
for i = 1, nf do
  failed[ARGV[at]] = true
  failures[i] = {ARGV[at], ARGV[at + 1]}
  at = at + 2
end
local unprocessed = {}
while at <= #ARGV do unprocessed[#unprocessed + 1] = ARGV[at]; at = at + 1 end
if not cur.manual and done > 0 then
  local handled = {}
  for i = 1, done do handled[i] = batch[i] end
  local owners, settled = bulk_read('HMGET', ck(c, ':own'), handled), {}
  for i, o in ipairs(handled) do
    if not failed[o] and owner(owners[i]) == who then settled[#settled + 1] = o end
  end
  forget_all(c, settled)
end
if not cur.manual then redis.call('HINCRBY', ck(c, ''), 'acked', done - nf) end
local dead = {}
for _, f in ipairs(failures) do
  local o = f[1]
  if owner(redis.call('HGET', ck(c, ':own'), o)) == who then
    local att = attempts(c, o)
    local delay = cur.b0 * cur.b1 ^ math.max(att - 1, 0)
    if delay ~= delay or delay > cur.b2 then delay = cur.b2 end
    fail(c, cur, o, 'callback raised', delay, f[2], now, dead, who)
  end
end
give_back(c, cur, unprocessed, false)
if #unprocessed > 0 or nf > 0 then signal() end
return dead
"""

_GIVE_BACK = r"""
-- ARGV: cursor, offsets...
local c = ARGV[1]
local cur = loadcur(c)
if not cur then return redis.error_reply('NOCURSOR ' .. c) end
local list = {}
for i = 2, #ARGV do list[#list + 1] = ARGV[i] end
give_back(c, cur, list, true)
return 1
"""

_DETACH = r"""
-- ARGV: cursor, consumer, closing broker ('1'), ephemeral ('1'), now, unread offsets...
local c, who, closing, ephemeral, now = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4] == '1', tonumber(ARGV[5])
local cur = loadcur(c)
if not cur then return {} end
local list = {}
for i = 6, #ARGV do list[#list + 1] = ARGV[i] end
give_back(c, cur, list, true)
redis.call('HDEL', ck(c, ':mem'), who)
local dit = redis.call('HGETALL', ck(c, ':dit'))
for i = 1, #dit, 2 do
  if dit[i + 1] == who then
    redis.call('HDEL', ck(c, ':dit'), dit[i])
    redis.call('HINCRBY', ck(c, ''), 'dead', -1)
    ready_append(c, dit[i])
  end
end
local dead = {}
if ephemeral then
  drop_cursor(c)
  housekeep(now)
  return dead
end
local own = redis.call('HGETALL', ck(c, ':own'))
local mine = {}
for i = 1, #own, 2 do if owner(own[i + 1]) == who then mine[#mine + 1] = tonumber(own[i]) end end
table.sort(mine)
for _, o in ipairs(mine) do
  if closing then
    redis.call('HDEL', ck(c, ':own'), o)
    redis.call('ZREM', ck(c, ':tmo'), o)
    ready_append(c, o)
  else
    fail(c, cur, o, 'subscription closed', 0, nil, now, dead, who)
  end
end
if #mine > 0 then signal() end
return dead
"""

_DELETE = r"""
-- ARGV: cursor, now
if redis.call('SISMEMBER', cursors, ARGV[1]) == 0 then return 0 end
drop_cursor(ARGV[1])
housekeep(tonumber(ARGV[2]))
return 1
"""

_SEEK = r"""
-- ARGV: cursor, kind, value, now
local c = ARGV[1]
if not redis.call('HGET', ck(c, ''), 'pos') then return redis.error_reply('NOCURSOR ' .. c) end
local pos = resolve(ARGV[2], ARGV[3], tonumber(ARGV[4]))
if type(pos) == 'table' then return pos end
redis.call('HSET', ck(c, ''), 'pos', pos)
signal()
return pos
"""

_STATS = r"""
-- ARGV: cursor, now: position, lag, pending, missed
local c = ARGV[1]
local cur = loadcur(c)
if not cur then return redis.error_reply('NOCURSOR ' .. c) end
if not known(cur) then return {'relearn', c} end
local start, stop = bounds()
local s = limit_floor(start, stop, cfg(), tonumber(ARGV[2]))
local match = matcher(c, cur)
local pos = cur.pos
local missed = num(redis.call('HGET', ck(c, ''), 'missed'), 0) + count(match, pos, s)
if pos < s then pos = s end
return {'ok', pos, count(match, pos, stop), pending(c), missed}
"""

_SNAPSHOT = r"""
-- ARGV: now. The queue's settings and bounds, and every cursor's figures.
local s, stop = housekeep(tonumber(ARGV[1]))
-- Named cursors first, then ephemeral ones, each in the order they were made (as in memory).
local ids = {}
for _, c in ipairs(redis.call('SMEMBERS', cursors)) do
  ids[#ids + 1] = {string.sub(c, 1, 1) == 'e' and 1 or 0, num(redis.call('HGET', ck(c, ''), 'seq'), 0), c}
end
table.sort(ids, function(a, b) if a[1] ~= b[1] then return a[1] < b[1] end return a[2] < b[2] end)
for i, item in ipairs(ids) do ids[i] = item[3] end
local rows = {}
for _, c in ipairs(ids) do
  local cur = loadcur(c)
  if not known(cur) then return {'relearn', c} end
  local h = redis.call('HMGET', ck(c, ''), 'settings', 'delivered', 'acked', 'redelivered', 'dead', 'missed')
  rows[#rows + 1] = {c, h[1], cur.pos, count(matcher(c, cur), cur.pos, stop), pending(c),
    tonumber(h[2]), tonumber(h[3]), tonumber(h[4]), tonumber(h[5]), tonumber(h[6]),
    redis.call('HGETALL', ck(c, ':mem'))}
end
local r = redis.call('HMGET', meta, 'retention', 'max_messages', 'overflow', 'max_age', 'dedup_window', 'dedup_max_ids')
return {'ok', s, stop, r, rows}
"""

_UNSETTLED = r"""
-- ARGV: cursor, offset, now: whether something below offset still waits to be handled
local c, below = ARGV[1], tonumber(ARGV[2])
local cur = loadcur(c)
if not cur then return 0 end
if not known(cur) then return {'relearn', c} end
for _, key in ipairs({ck(c, ':rdy'), ck(c, ':due')}) do
  for _, o in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if tonumber(o) < below then return 1 end
  end
end
local start, stop = bounds()
local s = limit_floor(start, stop, cfg(), tonumber(ARGV[3]))
local pos = cur.pos
if pos < s then pos = s end
if count(matcher(c, cur), pos, math.min(below, stop)) > 0 then return 1 end
return 0
"""

_NEXT_DUE = r"""
-- ARGV: include max_age ('1'), cursors...: the earliest timer among them, or false
local due = nil
for i = 2, #ARGV do
  local d = next_due(ARGV[i])
  if d and (due == nil or d < due) then due = d end
end
local c = cfg()
if ARGV[1] == '1' and c.age then
  local start, stop = bounds()
  if start < stop then
    local e = entry(start)
    if e then
      local d = tonumber(e[4]) + c.age
      if due == nil or d < due then due = d end
    end
  end
end
if due == nil then return false end
return fmt(due)
"""

_REAP = r"""
-- ARGV: now, live prefix, the reaper's id. Release what dead brokers held: their consumers' OUT
-- messages fail (counted against max_deliveries: a message that kills its consumer must not
-- loop forever), the dead letters they had not published go back to the line, their ephemeral
-- cursors go, and so do their memberships. Returns {cursor, dead letters} pairs.
local now, live, reaper = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local out = {}
local changed = false
for _, c in ipairs(redis.call('SMEMBERS', cursors)) do
  local bid = string.match(c, '^e([^.]*)%.')
  if bid then
    if not broker_alive(live, bid) then
      drop_cursor(c)
      changed = true
    end
  else
    local cur = loadcur(c)
    local mem = redis.call('HGETALL', ck(c, ':mem'))
    for i = 1, #mem, 2 do
      if not consumer_alive(live, mem[i]) then redis.call('HDEL', ck(c, ':mem'), mem[i]) end
    end
    local own = redis.call('HGETALL', ck(c, ':own'))
    local gone = {}
    for i = 1, #own, 2 do
      if not consumer_alive(live, owner(own[i + 1])) then gone[#gone + 1] = tonumber(own[i]) end
    end
    table.sort(gone)
    local dead = {}
    for _, o in ipairs(gone) do fail(c, cur, o, 'consumer died', 0, nil, now, dead, reaper) end
    if #gone > 0 then changed = true end
    local dit = redis.call('HGETALL', ck(c, ':dit'))
    for i = 1, #dit, 2 do
      if not consumer_alive(live, dit[i + 1]) then
        redis.call('HDEL', ck(c, ':dit'), dit[i])
        redis.call('HINCRBY', ck(c, ''), 'dead', -1)
        ready_append(c, dit[i])
        changed = true
      end
    end
    if #dead > 0 then out[#out + 1] = {c, dead} end
  end
end
if changed then
  housekeep(now)
  signal()
end
return out
"""

_DEAD_SENT = r"""
-- ARGV: cursor, who, offsets published...: settle the dead letters ``who`` has published. One it
-- could not publish stays held (in transit) until its consumer closes or its broker dies, and
-- then comes back to the line: a letter may be published twice, never lost.
local c, who = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  if redis.call('HGET', ck(c, ':dit'), ARGV[i]) == who then forget(c, ARGV[i]) end
end
return 1
"""

_PENDING = r"""
-- ARGV: cursor. Each pending message (not the dead letters in transit), by offset:
-- {offset, attempts, owner or false, since or false, due or false, entry}
local c = ARGV[1]
if not redis.call('HGET', ck(c, ''), 'pos') then return redis.error_reply('NOCURSOR ' .. c) end
local out = {}
for _, o in ipairs(redis.call('ZRANGE', ck(c, ':held'), 0, -1)) do
  if redis.call('HEXISTS', ck(c, ':dit'), o) == 0 then
    local e = entry(tonumber(o))
    if e then
      local due = redis.call('ZSCORE', ck(c, ':due'), o)
      local held_by = redis.call('HGET', ck(c, ':own'), o)
      out[#out + 1] = {tonumber(o), attempts(c, o), owner(held_by), held_by and since(c, o, held_by), due or false, e}
    end
  end
end
return out
"""

# publish with dedup ids: the publish body above, run on the drafts whose ids are new, between a
# check of the queue's duplicate window and the recording of the new ids (``dedup_find`` and
# ``dedup_remember`` in the prelude).
_DEDUP_CHECK = r"""
-- ARGV: now, count, window, max ids, then per message: event, payload, key, headers, dedup id ('' for none).
local now0, total = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, maxids = tonumber(ARGV[3]), tonumber(ARGV[4])
local fresh = {ARGV[1], 0}
local newids = {}  -- index among the fresh drafts (from 0) -> id
local first = {}  -- id -> index among the fresh drafts, for a repeat within the call
local places = {}  -- per draft: 'n' .. index among the fresh, or the original's entry
for i = 0, total - 1 do
  local b = 5 + i * 5
  local id = ARGV[b + 4]
  local place = false
  if id ~= '' then
    if first[id] then
      place = 'n' .. first[id]
    else
      place = dedup_find(id, window, now0) or false
    end
  end
  if not place then
    local k = fresh[2]
    fresh[2] = k + 1
    for f = 0, 3 do fresh[#fresh + 1] = ARGV[b + f] end
    if id ~= '' then first[id] = k; newids[k] = id end
    place = 'n' .. k
  end
  places[i + 1] = place
end
local stop, ts = -1, ''
if fresh[2] > 0 then
  local r = publish(fresh)
  if r.err then return r end
  stop, ts = r[1], r[2]
end
dedup_remember(newids, stop, ts, now0, window, maxids)
return {stop, ts, places}
"""

# Transactions (``mqlite.engine.redis.transaction``). A transaction holds each queue it publishes
# to from its first publish there until it ends (meta's ``tx``), so the offsets it hands out are
# final; its acks and nacks are checked at each call and again, with everything else, by the
# commit, which changes nothing unless all of it can be applied.
_TX_HOLD = r"""
-- ARGV: holder, now, the default dedup window and max ids. Hold the queue for the transaction
-- ``holder``: {0, other holder} if another live transaction holds it, else {1, start, end, last
-- publish time, overflow, max_messages, dedup window, dedup max ids}.
local holder = ARGV[1]
local r = redis.call('HMGET', meta, 'tx', 'overflow', 'max_messages', 'start', 'end', 'last_t', 'dedup_window',
  'dedup_max_ids')
if r[1] and r[1] ~= holder and holder_alive(r[1]) then return {0, r[1]} end
redis.call('HSET', meta, 'tx', holder)
local s, stop = num(r[4], 0), num(r[5], 0)
if r[2] == 'reject' and num(r[3], nil) then s, stop = housekeep(tonumber(ARGV[2])) end
return {1, s, stop, r[6] or '', r[2] or '', r[3] or '', r[7] or ARGV[3], r[8] or ARGV[4]}
"""

_TX_DEDUP = r"""
-- ARGV: dedup id, window, now: the entry first published with the id within the window, or false.
return dedup_find(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])) or false
"""

_TX_CHECK = r"""
-- ARGV: cursor, 'ack' or 'nack', offsets...: refuse as the ack or nack script would, changing nothing.
local c = ARGV[1]
if not redis.call('HGET', ck(c, ''), 'pos') then return redis.error_reply('NOCURSOR ' .. c) end
for i = 3, #ARGV do
  local why = unsettleable(c, ARGV[i], ARGV[2] == 'nack')
  if why then return redis.error_reply(why .. ' ' .. ARGV[i]) end
end
return 1
"""

_TX_COMMIT = r"""
-- KEYS: the five keys of each queue of the transaction. ARGV: now, holder, then per queue:
-- held ('1'/'0'), end when held, publish time, dedup window, dedup max ids; publish count and per
-- publish (event, payload, key, headers, dedup id or ''); ack group count and per group (cursor,
-- count, offsets...); nack count and per nack (cursor, offset, delay, consumer).
-- Every check comes before the first change: a refusal changes nothing, and once the checks
-- pass nothing below can fail. Replies per queue {first offset or -1, time, {{cursor, consumer,
-- dead letters}...}}.
local now, holder = tonumber(ARGV[1]), ARGV[2]
local function use(q)  -- rebind the prelude's keys (and so every helper) to the q-th queue
  local b = (q - 1) * 5
  meta, log, cursors, events, sig = KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], KEYS[b + 4], KEYS[b + 5]
  prefix = string.sub(meta, 1, #meta - 4)
end
local parts, at = {}, 3
for q = 1, #KEYS / 5 do
  local part = {held = ARGV[at] == '1', stop = tonumber(ARGV[at + 1]), ts = ARGV[at + 2],
    window = tonumber(ARGV[at + 3]), maxids = tonumber(ARGV[at + 4]), pubs = {}, acks = {}, nacks = {}}
  at = at + 5
  for i = 1, tonumber(ARGV[at]) do
    part.pubs[i] = {ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5]}
    at = at + 5
  end
  at = at + 1
  for i = 1, tonumber(ARGV[at]) do
    local offsets = {}
    for j = 1, tonumber(ARGV[at + 2]) do offsets[j] = ARGV[at + 2 + j] end
    part.acks[i] = {ARGV[at + 1], offsets}
    at = at + 2 + #offsets
  end
  at = at + 1
  for i = 1, tonumber(ARGV[at]) do
    part.nacks[i] = {ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3]), ARGV[at + 4]}
    at = at + 4
  end
  at = at + 1
  parts[q] = part
end
for q, part in ipairs(parts) do
  use(q)
  if part.held then
    local r = redis.call('HMGET', meta, 'tx', 'end', 'overflow', 'max_messages')
    if r[1] ~= holder or num(r[2], 0) ~= part.stop then return redis.error_reply('TXLOST ' .. (q - 1)) end
    local max = num(r[4], nil)
    if #part.pubs > 0 and r[3] == 'reject' and max then
      local s, stop = housekeep(now)
      if stop + #part.pubs - s > max then return redis.error_reply('QUEUEFULL ' .. (q - 1) .. ' ' .. (stop - s)) end
    end
  end
  for _, group in ipairs(part.acks) do
    local c = group[1]
    if not redis.call('HGET', ck(c, ''), 'pos') then return redis.error_reply('NOCURSOR ' .. c) end
    for _, o in ipairs(group[2]) do
      local why = unsettleable(c, o, false)
      if why then return redis.error_reply(why .. ' ' .. (q - 1) .. ' ' .. o) end
    end
  end
  for _, n in ipairs(part.nacks) do
    if not redis.call('HGET', ck(n[1], ''), 'pos') then return redis.error_reply('NOCURSOR ' .. n[1]) end
    local why = unsettleable(n[1], n[2], true)
    if why then return redis.error_reply(why .. ' ' .. (q - 1) .. ' ' .. n[2]) end
  end
end
local out = {}
for q, part in ipairs(parts) do
  use(q)
  local first, ts = -1, ''
  if part.held then
    redis.call('HDEL', meta, 'tx')
    if #part.pubs > 0 then
      local A, ids = {part.ts, #part.pubs}, {}
      for i, p in ipairs(part.pubs) do
        for f = 1, 4 do A[#A + 1] = p[f] end
        if p[5] ~= '' then ids[i - 1] = p[5] end
      end
      local r = publish(A)
      first, ts = r[1], r[2]
      if next(ids) then dedup_remember(ids, first, ts, now, part.window, part.maxids) end
    end
  end
  for _, group in ipairs(part.acks) do
    forget_all(group[1], group[2])
    redis.call('HINCRBY', ck(group[1], ''), 'acked', #group[2])
  end
  local letters = {}
  for _, n in ipairs(part.nacks) do
    local dead = {}
    fail(n[1], loadcur(n[1]), n[2], 'nack', n[3], nil, now, dead, n[4])
    letters[#letters + 1] = {n[1], n[4], dead}
  end
  if #part.nacks > 0 then signal() end
  out[q] = {first, ts, letters}
end
return out
"""

_TX_RELEASE = r"""
-- KEYS: the five keys of each queue; ARGV: holder. End the transaction's holds that are still its own.
for q = 1, #KEYS / 5 do
  local m = KEYS[(q - 1) * 5 + 1]
  if redis.call('HGET', m, 'tx') == ARGV[1] then redis.call('HDEL', m, 'tx') end
end
return 1
"""

_BODIES = {
    "pending": _PENDING,
    "dead_sent": _DEAD_SENT,
    "reap": _REAP,
    "open": _OPEN,
    "configure": _CONFIGURE,
    "publish": _PUBLISH,
    "bounds": _BOUNDS,
    "attach": _ATTACH,
    "reconfigure": _RECONFIGURE,
    "learn": _LEARN,
    "take": _TAKE,
    "ack": _ACK,
    "nack": _NACK,
    "push_done": _PUSH_DONE,
    "give_back": _GIVE_BACK,
    "detach": _DETACH,
    "delete": _DELETE,
    "seek": _SEEK,
    "stats": _STATS,
    "snapshot": _SNAPSHOT,
    "unsettled": _UNSETTLED,
    "next_due": _NEXT_DUE,
    "tx_hold": _TX_HOLD,
    "tx_dedup": _TX_DEDUP,
    "tx_check": _TX_CHECK,
    "tx_release": _TX_RELEASE,
}

_DEFINES = re.compile(r"^local (?:function (\w+)|([\w, ]+?) =)")
_WORD = re.compile(r"[A-Za-z_]\w*")
_COMMENT = re.compile(r"--.*$", re.MULTILINE)


def _helpers(prelude: str) -> list[tuple[frozenset[str], frozenset[str], str]]:
    """The prelude's top-level definitions, in order: (names defined, words used, text).

    A definition starts at a column-0 ``local``; the comment lines just above it go with it.
    """
    pieces: list[list[str]] = []
    comments: list[str] = []
    for line in prelude.strip("\n").splitlines():
        if line.startswith("--"):
            comments.append(line)
        elif line.startswith("local ") or not pieces:
            pieces.append([*comments, line])
            comments = []
        else:
            pieces[-1] += [*comments, line]
            comments = []
    helpers = []
    for lines in pieces:
        text = "\n".join(lines) + "\n"
        head = next(line for line in lines if not line.startswith("--"))
        found = _DEFINES.match(head)
        if found is None:
            raise ValueError(f"a prelude definition must start with `local`: {head!r}")
        names = found.group(1) or found.group(2)
        defined = frozenset(name.strip() for name in names.split(","))
        used = frozenset(_WORD.findall(_COMMENT.sub("", text))) - defined
        helpers.append((defined, used, text))
    return helpers


def _with_prelude(body: str, helpers: list[tuple[frozenset[str], frozenset[str], str]]) -> str:
    """``body`` after the prelude's definitions it uses, directly or through another one.

    Each call of a script runs its prelude, making a closure per helper (measured: the whole
    prelude cost ~6 us of server time per call, more than a small script's own commands), so
    each script defines only what it needs.
    """
    wanted = set(_WORD.findall(_COMMENT.sub("", body)))
    keep = [False] * len(helpers)
    for index in reversed(range(len(helpers))):  # a helper only uses those defined before it
        defined, used, _ = helpers[index]
        if defined & wanted:
            keep[index] = True
            wanted |= used
    return "".join(text for (_, _, text), kept in zip(helpers, keep, strict=True) if kept) + body


_HELPERS = _helpers(_PRELUDE)

# The publish body as a function of its arguments (Redis 7 forbids assigning the global ARGV).
_PUBLISH_FUNCTION = "local function publish(A)\n" + _PUBLISH.replace("ARGV", "A") + "\nend\n"
_BODIES["publish_once"] = _PUBLISH_FUNCTION + _DEDUP_CHECK
_BODIES["tx_commit"] = _PUBLISH_FUNCTION + _TX_COMMIT

SCRIPTS: dict[str, str] = {name: _with_prelude(body, _HELPERS) for name, body in _BODIES.items()}
"""Each operation's full script: the shared helpers it uses, then its body."""
