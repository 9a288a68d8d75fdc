-- Renew the leases `node` holds: each job still leased or running on `node` gets its deadline moved to
-- server time + lease seconds; a running job's deadline never passes its run deadline (set at its first
-- renewal: server time + timeout), so a hung node loses its job even while its heartbeat thread renews.
--   KEYS: leased index, running index, job keys...    ARGV: 1 node, 2 lease seconds, 3 timeout seconds ('' none)
-- Returns 1 per job still held, 0 per job no longer held (cancelled, requeued, finished, given to another).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {}
for i = 3, #KEYS do
  local f = redis.call('HMGET', KEYS[i], 'state', 'node', 'id', 'run_deadline')
  local held = 0
  if f[2] == ARGV[1] and (f[1] == 'leased' or f[1] == 'running') then
    local deadline = now + tonumber(ARGV[2])
    local index = KEYS[1]
    if f[1] == 'running' then
      index = KEYS[2]
      local cap = tonumber(f[4])
      if not cap and ARGV[3] ~= '' then
        cap = now + tonumber(ARGV[3])
        redis.call('HSET', KEYS[i], 'run_deadline', string.format('%.6f', cap))
      end
      if cap and cap < deadline then deadline = cap end
    end
    redis.call('ZADD', index, 'XX', string.format('%.6f', deadline), f[3])
    held = 1
  end
  out[#out + 1] = held
end
return out
