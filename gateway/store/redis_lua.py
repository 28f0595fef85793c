"""The Lua scripts of the Redis store: each atomic Store operation is exactly one of these.

Key names (P is the configured prefix, S a scope name such as `key:k1` or `team:t1`):

    P teams            hash  team id -> team JSON
    P keys             hash  key id -> key JSON
    P kh               hash  key hash -> key id (the lookup index)
    P rl:S:r:W         int   requests counted in the 60 s window W (TTL 130 s)
    P rl:S:t:W         int   tokens counted in window W
    P lh:S             hash  lease id -> "amount|W|daily pid|weekly pid|monthly pid"
    P lx:S             zset  lease id -> expiry
    P rsv:S            int   sum of the amounts in lh:S
    P sp:S:PID         int   nano-USD spent in period PID (d…, w…, m…, t0)
    P settled:LEASE    str   marker: this lease was settled (TTL 2 days)
    P lim:N:r:W        int   requests counted by the named limiter N in window W (TTL 130 s)
    P lim:N:t:W        int   tokens counted by limiter N in window W
    P br:N             str   UNIX time breaker N is open until (PX: until then, plus 1 s)
    P ledger           stream of spend records
    P agg:YYYY-MM-DD   hash  "team\\x1fkey\\x1fmodel\\x1f{n,p,c,$}" -> sum

Every argument that Redis must read back exactly (times, amounts) is passed on as the original
ARGV string, never re-formatted from a Lua number (which would print 1e+15). The arithmetic of
decisions mirrors gateway/store/embedded.py operation for operation.
"""

from __future__ import annotations

_PRELUDE = r"""
local P = ARGV[1]
local function I(n) return string.format('%d', n) end
local function num(v) if type(v) == 'number' then return v end return nil end
local function drop_expired(name, now_s)
  local lx = P .. 'lx:' .. name
  local ids = redis.call('ZRANGEBYSCORE', lx, '-inf', now_s)
  if #ids == 0 then return end
  local lh = P .. 'lh:' .. name
  local total = 0
  for i = 1, #ids do
    local v = redis.call('HGET', lh, ids[i])
    if v then
      total = total + tonumber(string.match(v, '^(%-?%d+)'))
      redis.call('HDEL', lh, ids[i])
    end
  end
  redis.call('ZREMRANGEBYSCORE', lx, '-inf', now_s)
  if total ~= 0 then redis.call('DECRBY', P .. 'rsv:' .. name, I(total)) end
end
"""

ADMIT = _PRELUDE + r"""
-- ARGV: 2 key hash, 3 now, 4 model, 5 est tokens, 6 reserve nano, 7 lease id, 8 lease expiry,
-- 9 check rate, 10 check budget, 11-13 daily/weekly/monthly pid, 14 lease keys TTL (s),
-- 15 charge ('1': the cost is known, spend the reserve now instead of holding a lease)
-- Returns {status, key json, team json, scope, limit kind, slots, refused slot}; status
-- 0 ok, 1 unknown key, 2 revoked, 3 expired, 4 model not allowed, 5 rate limited, 6 over budget.
-- slots: 12 integers, (limit or -1, previous window, current window) for key requests,
-- key tokens, team requests, team tokens; empty when rates are not checked.
local now_s = ARGV[3]
local now = tonumber(now_s)
local kid = redis.call('HGET', P .. 'kh', ARGV[2])
if not kid then return {1} end
local kjson = redis.call('HGET', P .. 'keys', kid)
if not kjson then return {1} end
local k = cjson.decode(kjson)
local tjson = redis.call('HGET', P .. 'teams', k.team_id)
if not tjson then return {1} end
local t = cjson.decode(tjson)
if num(k.revoked_at) then return {2, kjson, tjson} end
local exp = num(k.expires_at)
if exp and exp <= now then return {3, kjson, tjson} end
local model = ARGV[4]
local function allowed(list)
  if type(list) ~= 'table' then return true end
  for i = 1, #list do if list[i] == model then return true end end
  return false
end
if not allowed(k.allowed_models) then return {4, kjson, tjson, 'key'} end
if not allowed(t.allowed_models) then return {4, kjson, tjson, 'team'} end

local kname = 'key:' .. kid
local tname = 'team:' .. t.id
local w = math.floor(now / 60)
local ws = I(w)
local pws = I(w - 1)
local slots = {}
local counted = {}
if ARGV[9] == '1' then
  local frac = 1 - (now - w * 60) / 60
  local est = tonumber(ARGV[5])
  local recs = {k, k, t, t}
  local names = {kname, kname, tname, tname}
  local refused = nil
  for i = 1, 4 do
    local rec = recs[i]
    local lim, need, need_s, ch
    if i % 2 == 1 then
      lim, need, need_s, ch = num(rec.rpm), 1, '1', 'r'
    else
      lim, need, need_s, ch = num(rec.tpm), est, ARGV[5], 't'
    end
    local prev, cur = 0, 0
    if lim then
      local base = P .. 'rl:' .. names[i] .. ':' .. ch .. ':'
      prev = tonumber(redis.call('GET', base .. pws)) or 0
      cur = tonumber(redis.call('GET', base .. ws)) or 0
      counted[#counted + 1] = {base .. ws, need_s, 3 * i}
      if not refused and prev * frac + cur + need > lim then refused = i end
    end
    slots[3 * i - 2] = lim or -1
    slots[3 * i - 1] = prev
    slots[3 * i] = cur
  end
  if refused then
    local sk = 'key'
    if refused > 2 then sk = 'team' end
    local kind = 'requests'
    if refused % 2 == 0 then kind = 'tokens' end
    return {5, kjson, tjson, sk, kind, slots, refused - 1}
  end
end

drop_expired(kname, now_s)
drop_expired(tname, now_s)
local pids = {daily = ARGV[11], weekly = ARGV[12], monthly = ARGV[13], total = 't0'}
if ARGV[10] == '1' then
  local reserve = tonumber(ARGV[6])
  local scopes = {{'key', kname, k.budget}, {'team', tname, t.budget}}
  for i = 1, 2 do
    local b = scopes[i][3]
    if type(b) == 'table' then
      local name = scopes[i][2]
      local spent = tonumber(redis.call('GET', P .. 'sp:' .. name .. ':' .. pids[b.period])) or 0
      local reserved = tonumber(redis.call('GET', P .. 'rsv:' .. name)) or 0
      if spent + reserved + reserve > b.limit_nano then
        return {6, kjson, tjson, scopes[i][1], false, slots}
      end
    end
  end
end

for i = 1, #counted do
  local c = counted[i]
  slots[c[3]] = redis.call('INCRBY', c[1], c[2])
  redis.call('EXPIRE', c[1], 130)
end
if ARGV[15] == '1' then
  -- a known cost (a cache hit): spend it now, no lease
  if ARGV[6] ~= '0' then
    local ttls = {3 * 86400, 15 * 86400, 70 * 86400}
    local pl = {ARGV[11], ARGV[12], ARGV[13]}
    for _, name in ipairs({kname, tname}) do
      local sp = P .. 'sp:' .. name .. ':'
      for j = 1, 3 do
        redis.call('INCRBY', sp .. pl[j], ARGV[6])
        redis.call('EXPIRE', sp .. pl[j], ttls[j])
      end
      redis.call('INCRBY', sp .. 't0', ARGV[6])
    end
  end
  return {0, kjson, tjson, false, false, slots}
end
local lease = ARGV[6] .. '|' .. ws .. '|' .. ARGV[11] .. '|' .. ARGV[12] .. '|' .. ARGV[13]
for _, name in ipairs({kname, tname}) do
  local lh, lx, rsv = P .. 'lh:' .. name, P .. 'lx:' .. name, P .. 'rsv:' .. name
  if redis.call('HSETNX', lh, ARGV[7], lease) == 1 then
    redis.call('ZADD', lx, ARGV[8], ARGV[7])
    redis.call('INCRBY', rsv, ARGV[6])
  end
  redis.call('EXPIRE', lh, ARGV[14])
  redis.call('EXPIRE', lx, ARGV[14])
  redis.call('EXPIRE', rsv, ARGV[14])
end
return {0, kjson, tjson, false, false, slots}
"""

SETTLE = _PRELUDE + r"""
-- ARGV: 2 lease id, 3 key id, 4 team id, 5 now, 6 actual nano, 7 token delta,
-- 8-10 daily/weekly/monthly pid at now, 11 settled-marker TTL (s). Returns 1, or 0 if settled.
if not redis.call('SET', P .. 'settled:' .. ARGV[2], '1', 'NX', 'EX', ARGV[11]) then return 0 end
local now = tonumber(ARGV[5])
local wnow = I(math.floor(now / 60))
local actual = ARGV[6]
local delta = tonumber(ARGV[7])
local ttls = {3 * 86400, 15 * 86400, 70 * 86400}
for _, name in ipairs({'key:' .. ARGV[3], 'team:' .. ARGV[4]}) do
  local lh = P .. 'lh:' .. name
  local v = redis.call('HGET', lh, ARGV[2])
  local win, pd, pw, pm = wnow, ARGV[8], ARGV[9], ARGV[10]
  if v then
    local amount
    amount, win, pd, pw, pm = string.match(v, '^(%-?%d+)|(%-?%d+)|([^|]+)|([^|]+)|([^|]+)$')
    redis.call('HDEL', lh, ARGV[2])
    redis.call('ZREM', P .. 'lx:' .. name, ARGV[2])
    redis.call('DECRBY', P .. 'rsv:' .. name, amount)
  end
  if actual ~= '0' then
    local sp = P .. 'sp:' .. name .. ':'
    local pl = {pd, pw, pm}
    for j = 1, 3 do
      redis.call('INCRBY', sp .. pl[j], actual)
      redis.call('EXPIRE', sp .. pl[j], ttls[j])
    end
    redis.call('INCRBY', sp .. 't0', actual)
  end
  if delta ~= 0 then
    local rk = P .. 'rl:' .. name .. ':t:' .. win
    if redis.call('EXISTS', rk) == 1 then
      if redis.call('INCRBY', rk, ARGV[7]) < 0 then redis.call('SET', rk, '0', 'KEEPTTL') end
    end
  end
end
return 1
"""

BUDGET = _PRELUDE + r"""
-- ARGV: 2 scope name, 3 now, 4 period id. Returns {spent, reserved} after dropping expired leases.
drop_expired(ARGV[2], ARGV[3])
return {
  redis.call('GET', P .. 'sp:' .. ARGV[2] .. ':' .. ARGV[4]) or '0',
  redis.call('GET', P .. 'rsv:' .. ARGV[2]) or '0',
}
"""

PUT_KEY = _PRELUDE + r"""
-- ARGV: 2 key id, 3 key hash, 4 key JSON. The hash index follows a rotation.
local old = redis.call('HGET', P .. 'keys', ARGV[2])
if old then
  local o = cjson.decode(old)
  if o.key_hash ~= ARGV[3] and redis.call('HGET', P .. 'kh', o.key_hash) == ARGV[2] then
    redis.call('HDEL', P .. 'kh', o.key_hash)
  end
end
redis.call('HSET', P .. 'keys', ARGV[2], ARGV[4])
redis.call('HSET', P .. 'kh', ARGV[3], ARGV[2])
return 1
"""

KEY_BY_HASH = _PRELUDE + r"""
-- ARGV: 2 key hash. Returns the key JSON or nil.
local kid = redis.call('HGET', P .. 'kh', ARGV[2])
if not kid then return false end
return redis.call('HGET', P .. 'keys', kid)
"""

LEDGER = r"""
-- ARGV: 1 prefix, 2 stream maxlen (0: untrimmed), 3 aggregate TTL (s), 4 batch id, 5.. one JSON record each:
-- {"day","team","key","model","p","c","cost", ...}; the JSON goes into the stream as is.
-- A batch id already seen (a retry after a lost reply) writes nothing: exactly once.
local P = ARGV[1]
local maxlen = ARGV[2]
local ttl = ARGV[3]
if not redis.call('SET', P .. 'lb:' .. ARGV[4], '1', 'NX', 'EX', 172800) then return 0 end
local seen = {}
for i = 5, #ARGV do
  local r = cjson.decode(ARGV[i])
  if maxlen == '0' then
    redis.call('XADD', P .. 'ledger', '*', 'r', ARGV[i])
  else
    redis.call('XADD', P .. 'ledger', 'MAXLEN', '~', maxlen, '*', 'r', ARGV[i])
  end
  local agg = P .. 'agg:' .. r.day
  local base = r.team .. '\31' .. r.key .. '\31' .. r.model .. '\31'
  redis.call('HINCRBY', agg, base .. 'n', 1)
  redis.call('HINCRBY', agg, base .. 'p', string.format('%d', r.p))
  redis.call('HINCRBY', agg, base .. 'c', string.format('%d', r.c))
  redis.call('HINCRBY', agg, base .. '$', string.format('%d', r.cost))
  seen[agg] = true
end
for agg, _ in pairs(seen) do redis.call('EXPIRE', agg, ttl) end
return #ARGV - 4
"""

RATE_HIT = _PRELUDE + r"""
-- ARGV: 2 limiter name, 3 now, 4 rpm, 5 tpm, 6 tokens (limits 0: none, nothing counted).
-- Returns {counted, requests refused, prev, cur, tokens refused, prev, cur}; counted is 1 when
-- both fit (and were counted), else 0 and nothing was counted. Same decision as ADMIT.
local now = tonumber(ARGV[3])
local w = math.floor(now / 60)
local ws = I(w)
local pws = I(w - 1)
local frac = 1 - (now - w * 60) / 60
local base = P .. 'lim:' .. ARGV[2] .. ':'
local lims = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local needs = {1, tonumber(ARGV[6])}
local needs_s = {'1', ARGV[6]}
local chs = {'r:', 't:'}
local out = {1, 0, 0, 0, 0, 0, 0}
for i = 1, 2 do
  if lims[i] > 0 then
    local prev = tonumber(redis.call('GET', base .. chs[i] .. pws)) or 0
    local cur = tonumber(redis.call('GET', base .. chs[i] .. ws)) or 0
    out[3 * i] = prev
    out[3 * i + 1] = cur
    if prev * frac + cur + needs[i] > lims[i] then
      out[3 * i - 1] = 1
      out[1] = 0
    end
  end
end
if out[1] == 0 then return out end
for i = 1, 2 do
  if lims[i] > 0 then
    local k = base .. chs[i] .. ws
    redis.call('INCRBY', k, needs_s[i])
    redis.call('EXPIRE', k, 130)
  end
end
return out
"""

RATE_ADJUST = _PRELUDE + r"""
-- ARGV: 2 limiter name, 3 window of the hit, 4 token delta, 5 request delta. A window already
-- gone stays gone; a count never goes below 0. Returns how many counts were corrected.
local n = 0
for _, kd in ipairs({{'t:', ARGV[4]}, {'r:', ARGV[5] or '0'}}) do
  local k = P .. 'lim:' .. ARGV[2] .. ':' .. kd[1] .. ARGV[3]
  if kd[2] ~= '0' and redis.call('EXISTS', k) == 1 then
    if redis.call('INCRBY', k, kd[2]) < 0 then redis.call('SET', k, '0', 'KEEPTTL') end
    n = n + 1
  end
end
return n
"""

BREAKER_PUBLISH = _PRELUDE + r"""
-- ARGV: 2 breaker name, 3 open-until (UNIX s), 4 expiry (ms). The later open-until wins.
local k = P .. 'br:' .. ARGV[2]
local old = tonumber(redis.call('GET', k))
if old and old >= tonumber(ARGV[3]) then return 0 end
redis.call('SET', k, ARGV[3], 'PX', ARGV[4])
return 1
"""
