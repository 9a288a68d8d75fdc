-- Insert jobs that do not exist yet; skip (and report) those that do. Atomic: all new jobs of the batch
-- become visible together or not at all.
-- Each job also joins its (team, priority) queue, named in its hash's `queue` field (built by Keys).
-- A batch may carry a webhook (renderfarm/webhooks): its hash (url, team, created) is written with the batch's
-- first new jobs, and every new job of a batch with a webhook joins the batch's open set (the jobs not yet
-- seen finished: scripts/webhook_batch.lua).
-- A job may wait for others (its hash's `parents`, a JSON list: renderfarm/chains.py): each must be a job of this
-- batch or one that exists; one that failed or was cancelled, or that does not exist, refuses the whole batch.
-- The job keeps as `parents` those not done yet; with any, it starts `waiting` (in the waiting index, not in
-- the queue) and joins each one's children set, which settles it when they finish (chain.lua).
--   KEYS: pending, events, batch, queues set, batch webhook, batch open set, waiting, job keys...
--   ARGV: maxlen, now, batch webhook fields-json ('' = none), job key prefix, children key prefix, then per job:
--         id, score, hash-json
-- Returns 1 per job created, 0 per job that existed; or {'corrupt', why} or {'parent', job, parent, its state or
-- 'missing'} with nothing written: every job and key is checked before the first write (Redis does not roll a
-- script back, and a batch is all or nothing).
local function key_type(key) return redis.call('TYPE', key)['ok'] end
local function holds(key, want) local t = key_type(key); return t == 'none' or t == want end
for i, want in ipairs({'zset', 'stream', 'set', 'set', 'hash', 'set', 'zset'}) do
  if not holds(KEYS[i], want) then return {'corrupt', KEYS[i] .. ' holds a ' .. key_type(KEYS[i]) .. ', not a ' .. want} end
end
local hook
if ARGV[3] ~= '' then
  local ok, value = pcall(cjson.decode, ARGV[3])
  if not ok or type(value) ~= 'table' or type(value['url']) ~= 'string' then
    return {'corrupt', 'the batch webhook is not a JSON object with a url'}
  end
  hook = value
end
local hooked = hook ~= nil or redis.call('EXISTS', KEYS[5]) == 1
local n = #KEYS - 7
local job_prefix, children_prefix = ARGV[4], ARGV[5]
local new_here = {}  -- the ids this call creates: a job may wait for one of them
for i = 1, n do
  if redis.call('EXISTS', KEYS[7 + i]) == 0 then new_here[ARGV[3*i + 3]] = true end
end
local decoded, waits = {}, {}
for i = 1, n do
  local id, score, fields = ARGV[3*i + 3], ARGV[3*i + 4], ARGV[3*i + 5]
  local ok, value = pcall(cjson.decode, fields)
  if not ok or type(value) ~= 'table' then return {'corrupt', 'job ' .. id .. ': its fields are not a JSON object'} end
  if not tonumber(score) then return {'corrupt', 'job ' .. id .. ': score ' .. score .. ' is not a number'} end
  if value['queue'] then
    if type(value['queue']) ~= 'string' or not holds(value['queue'], 'zset') then
      return {'corrupt', 'job ' .. id .. ': its queue is not a sorted set'}
    end
    if not tonumber(value['created_at']) then return {'corrupt', 'job ' .. id .. ': created_at is not a number'} end
  end
  decoded[i] = value
  waits[i] = {}
  if value['parents'] and new_here[id] then
    local ok, parents = pcall(cjson.decode, value['parents'])
    if not ok or type(parents) ~= 'table' then return {'corrupt', 'job ' .. id .. ': its parents are not a JSON list'} end
    for _, parent in ipairs(parents) do
      local pkey, state = job_prefix .. parent, nil
      local ptype = key_type(pkey)
      if ptype == 'hash' then
        state = redis.call('HGET', pkey, 'state')
        if state == 'failed' or state == 'cancelled' then return {'parent', id, parent, state} end
      elseif ptype ~= 'none' or not new_here[parent] then
        return {'parent', id, parent, 'missing'}
      end
      if state ~= 'done' then
        if not holds(children_prefix .. parent, 'set') then return {'corrupt', children_prefix .. parent .. ' is not a set'} end
        waits[i][#waits[i] + 1] = parent
      end
    end
  end
end
local created = {}
for i = 1, n do
  local jkey = KEYS[7 + i]
  local id, score = ARGV[3*i + 3], ARGV[3*i + 4]
  if new_here[id] and redis.call('EXISTS', jkey) == 0 then
    local waiting = #waits[i] > 0
    decoded[i]['parents'] = waiting and cjson.encode(waits[i]) or nil
    if waiting then decoded[i]['state'] = 'waiting' end
    local flat = {}
    for k, v in pairs(decoded[i]) do flat[#flat + 1] = k; flat[#flat + 1] = v end
    redis.call('HSET', jkey, unpack(flat))
    if waiting then
      redis.call('ZADD', KEYS[7], score, id)
      for _, parent in ipairs(waits[i]) do redis.call('SADD', children_prefix .. parent, id) end
    else
      redis.call('ZADD', KEYS[1], score, id)
      if decoded[i]['queue'] then
        redis.call('ZADD', decoded[i]['queue'], decoded[i]['created_at'], id)
        redis.call('SADD', KEYS[4], decoded[i]['queue'])
      end
    end
    redis.call('SADD', KEYS[3], id)
    if hooked then redis.call('SADD', KEYS[6], id) end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'job', id, 'state', decoded[i]['state'] or 'queued', 'ts', ARGV[2])
    created[#created + 1] = 1
  else
    created[#created + 1] = 0
  end
end
if hook and redis.call('EXISTS', KEYS[5]) == 0 and redis.call('SCARD', KEYS[6]) > 0 then
  local flat = {}
  for k, v in pairs(hook) do flat[#flat + 1] = k; flat[#flat + 1] = tostring(v) end
  redis.call('HSET', KEYS[5], unpack(flat))
end
return created
