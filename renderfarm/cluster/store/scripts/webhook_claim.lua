-- Claim the deliveries whose next attempt is due: each claimed id's score moves to the end of its claim, so no
-- other dispatcher takes it meanwhile, and one whose dispatcher dies is due again when the claim lapses.
--   KEYS: due zset      ARGV: 1 now, 2 claim until, 3 limit
-- Returns the claimed ids.
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then return {} end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
