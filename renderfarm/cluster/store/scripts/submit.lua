-- Insert jobs that do not exist yet; skip (and report) those that do. Atomic: all new jobs of the batch
-- become visible together or not at all.
-- Each job also joins its (team, priority) queue, named in its hash's `queue` field (built by Keys).
--   KEYS: pending, events, batch, queues set, job keys...    ARGV: maxlen, now, then per job: id, score, hash-json
-- Returns 1 per job created, 0 per job that existed; or {'corrupt', why} with nothing written: every job and
-- key is checked before the first write (Redis does not roll a script back, and a batch is all or nothing).
local function key_type(key) return redis.call('TYPE', key)['ok'] end
local function holds(key, want) local t = key_type(key); return t == 'none' or t == want end
for i, want in ipairs({'zset', 'stream', 'set', 'set'}) do
  if not holds(KEYS[i], want) then return {'corrupt', KEYS[i] .. ' holds a ' .. key_type(KEYS[i]) .. ', not a ' .. want} end
end
local n = #KEYS - 4
local decoded = {}
for i = 1, n do
  local id, score, fields = ARGV[3*i], ARGV[3*i + 1], ARGV[3*i + 2]
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
end
local created = {}
for i = 1, n do
  local jkey = KEYS[4 + i]
  local id, score = ARGV[3*i], ARGV[3*i + 1]
  if redis.call('EXISTS', jkey) == 0 then
    local flat = {}
    for k, v in pairs(decoded[i]) do flat[#flat + 1] = k; flat[#flat + 1] = v end
    redis.call('HSET', jkey, unpack(flat))
    redis.call('ZADD', KEYS[1], score, id)
    if decoded[i]['queue'] then
      redis.call('ZADD', decoded[i]['queue'], decoded[i]['created_at'], id)
      redis.call('SADD', KEYS[4], decoded[i]['queue'])
    end
    redis.call('SADD', KEYS[3], id)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'job', id, 'state', 'queued', 'ts', ARGV[2])
    created[#created + 1] = 1
  else
    created[#created + 1] = 0
  end
end
return created
