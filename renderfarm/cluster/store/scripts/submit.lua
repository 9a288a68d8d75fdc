-- Insert jobs that do not exist yet; skip (and report) those that do. Atomic: all new jobs of the batch
-- become visible together or not at all.
-- Each job also joins its (team, priority) queue, named in its hash's `queue` field (built by Keys).
--   KEYS: pending, events, batch, queues set, job keys...    ARGV: maxlen, now, then per job: id, score, hash-json
local created = {}
local n = #KEYS - 4
for i = 1, n do
  local jkey = KEYS[4 + i]
  local id, score, fields = ARGV[3*i], ARGV[3*i + 1], ARGV[3*i + 2]
  if redis.call('EXISTS', jkey) == 0 then
    local flat = {}
    local decoded = cjson.decode(fields)
    for k, v in pairs(decoded) do flat[#flat + 1] = k; flat[#flat + 1] = v end
    redis.call('HSET', jkey, unpack(flat))
    redis.call('ZADD', KEYS[1], score, id)
    if decoded['queue'] then
      redis.call('ZADD', decoded['queue'], decoded['created_at'], id)
      redis.call('SADD', KEYS[4], decoded['queue'])
    end
    redis.call('SADD', KEYS[3], id)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'job', id, 'state', 'queued', 'ts', ARGV[2])
    created[#created + 1] = 1
  else
    created[#created + 1] = 0
  end
end
return created
