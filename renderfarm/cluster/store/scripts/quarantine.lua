-- Take a job whose record does not parse (or an index entry without a record) out of circulation: off every
-- index and queue, its key renamed aside (whatever it holds), the reason kept in the quarantine hash.
--   KEYS: job, quarantined job, quarantine hash, counters, index keys..., queues set
--   ARGV: 1 id, 2 reason-json, 3 only-if-missing ('1': do nothing if the job's key exists by now)
-- Returns 1 when quarantined, 0 when not (only-if-missing and the key exists), or an error naming a farm key
-- of the wrong type; every check comes before the first write (Redis does not roll a script back).
local function key_type(key) return redis.call('TYPE', key)['ok'] end
local function holds(key, want) local t = key_type(key); return t == 'none' or t == want end
local jtype = key_type(KEYS[1])
if ARGV[3] == '1' and jtype ~= 'none' then return 0 end
if not holds(KEYS[3], 'hash') then return redis.error_reply(KEYS[3] .. ' is not a hash') end
if not holds(KEYS[4], 'hash') then return redis.error_reply(KEYS[4] .. ' is not a hash') end
local queue = false
if jtype == 'hash' then queue = redis.call('HGET', KEYS[1], 'queue') end
-- Index and queue keys of the wrong type hold no job of ours: they are left alone, not a reason to fail.
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[4], 'quarantined', 1)
for i = 5, #KEYS - 1 do
  if key_type(KEYS[i]) == 'zset' then redis.call('ZREM', KEYS[i], ARGV[1]) end
end
if queue and key_type(queue) == 'zset' then
  redis.call('ZREM', queue, ARGV[1])
  if redis.call('ZCARD', queue) == 0 and key_type(KEYS[#KEYS]) == 'set' then redis.call('SREM', KEYS[#KEYS], queue) end
end
if jtype ~= 'none' then redis.call('RENAME', KEYS[1], KEYS[2]) end
return 1
