-- Create one webhook delivery, unless a delivery of that id exists (ids are derived from the event, so an
-- event handled twice, e.g. claimed again after a dispatcher died, creates its delivery once).
--   KEYS: record, due zset, index zset      ARGV: 1 id, 2 record-json, 3 due at, 4 ttl seconds, 5 index cap,
--                                                 6 created at
-- Returns 1 when created, 0 when it existed; or {'corrupt', why} with nothing written.
local function key_type(key) return redis.call('TYPE', key)['ok'] end
local function holds(key, want) local t = key_type(key); return t == 'none' or t == want end
for i, want in ipairs({'string', 'zset', 'zset'}) do
  if not holds(KEYS[i], want) then return {'corrupt', KEYS[i] .. ' holds a ' .. key_type(KEYS[i]) .. ', not a ' .. want} end
end
if not tonumber(ARGV[3]) or not tonumber(ARGV[4]) or not tonumber(ARGV[5]) or not tonumber(ARGV[6]) then
  return {'corrupt', 'a number argument is not a number'}
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
local extra = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[5])
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, extra - 1) end
return 1
