-- Claim or keep the leadership of a farm's scheduling: one scheduler dispatches at a time.
--   KEYS: leader, leader epoch    ARGV: 1 owner id, 2 ttl ms, 3 '1' to release instead
-- Returns the leader's epoch (a new one when this owner just took over) or false when another owner leads.
local current = redis.call('GET', KEYS[1])
if ARGV[3] == '1' then
  if current == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return false
end
if current and current ~= ARGV[1] then return false end
if not current then redis.call('INCR', KEYS[2]) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return tonumber(redis.call('GET', KEYS[2]))
