-- Take a job whose record does not parse (or an index entry without a record) out of circulation: off every
-- index and queue, its hash renamed aside, the reason kept in the quarantine hash.
--   KEYS: job, quarantined job, quarantine hash, counters, index keys..., queues set    ARGV: id, reason-json
for i = 5, #KEYS - 1 do redis.call('ZREM', KEYS[i], ARGV[1]) end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local queue = redis.call('HGET', KEYS[1], 'queue')
  if queue then
    redis.call('ZREM', queue, ARGV[1])
    if redis.call('ZCARD', queue) == 0 then redis.call('SREM', KEYS[#KEYS], queue) end
  end
  redis.call('RENAME', KEYS[1], KEYS[2])
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[4], 'quarantined', 1)
return 1
