-- Check ids found in one index (or one team queue) against their job hashes, and repair what disagrees: an id
-- whose hash names another state leaves this key and joins the index its hash names (a queued job its team
-- queue too). Nothing is decided from the index alone: the hash is the record.
--   KEYS: index keys (one per state, in STATES order)..., queues set, the key checked
--   ARGV: 1 state names csv, 2 the state the checked key holds, 3 '1' when the checked key is a team queue,
--         4 now, then per id: id, job key
-- Returns one verdict per id: 'ok' | 'moved' | 'missing' (no hash: the Store quarantines the id) |
-- 'corrupt:<why>' (a hash that cannot be placed: quarantined). Each id is checked before anything is written
-- for it, and the farm's keys before anything at all (Redis does not roll a script back).
local function key_type(key) return redis.call('TYPE', key)['ok'] end
local function holds(key, want) local t = key_type(key); return t == 'none' or t == want end
local queues, checked = KEYS[#KEYS - 1], KEYS[#KEYS]
local index_of = {}
local n = 0
for name in string.gmatch(ARGV[1], '[^,]+') do n = n + 1; index_of[name] = KEYS[n] end
for i = 1, n do
  if not holds(KEYS[i], 'zset') then return redis.error_reply(KEYS[i] .. ' holds a ' .. key_type(KEYS[i]) .. ', not a sorted set') end
end
if not holds(queues, 'set') then return redis.error_reply(queues .. ' is not a set') end
if not holds(checked, 'zset') then return redis.error_reply(checked .. ' is not a sorted set') end
local in_state, team_queue, now = ARGV[2], ARGV[3] == '1', ARGV[4]

local function leave_queue(queue, id)
  local removed = redis.call('ZREM', queue, id)
  if redis.call('ZCARD', queue) == 0 then redis.call('SREM', queues, queue) end
  return removed
end

local function verdict(id, jkey)
  local jtype = key_type(jkey)
  if jtype == 'none' then return 'missing' end
  if jtype ~= 'hash' then return 'corrupt:its key holds a ' .. jtype .. ', not a hash' end
  local f = redis.call('HMGET', jkey, 'state', 'score', 'created_at', 'queue', 'finished_at', 'updated_at')
  local state, score, created_at, queue = f[1], f[2], f[3], f[4]
  local home = index_of[state]
  if not home then return 'corrupt:its state ' .. cjson.encode(state or cjson.null) .. ' is not a job state' end
  -- Checks: what the writes below need.
  if queue and not holds(queue, 'zset') then return 'corrupt:its queue ' .. queue .. ' is not a sorted set' end
  if state == 'queued' then
    if not tonumber(score) then return 'corrupt:its queue score ' .. cjson.encode(score or cjson.null) .. ' is not a number' end
    if queue and not tonumber(created_at) then return 'corrupt:its created_at is not a number' end
  else
    -- Leased or running: a deadline of now, so the lease is reaped unless its holder renews it. Finished: when.
    score = now
    if state == 'done' or state == 'failed' or state == 'cancelled' then
      score = tonumber(f[5]) and f[5] or tonumber(f[6]) and f[6] or now
    end
  end
  -- Writes.
  local changed = 0
  if team_queue then
    if state ~= 'queued' or queue ~= checked then changed = changed + leave_queue(checked, id) end
  elseif state ~= in_state then
    changed = changed + redis.call('ZREM', checked, id)
    if in_state == 'queued' and queue then changed = changed + leave_queue(queue, id) end
  end
  changed = changed + redis.call('ZADD', home, 'NX', score, id)
  if state == 'queued' and queue then
    changed = changed + redis.call('ZADD', queue, 'NX', created_at, id)
    redis.call('SADD', queues, queue)
  end
  if changed > 0 then return 'moved' end
  return 'ok'
end

local out = {}
for i = 5, #ARGV, 2 do out[#out + 1] = verdict(ARGV[i], ARGV[i + 1]) end
return out
