-- Renew the leases `node` holds: each job still leased or running on `node` gets its deadline moved to
-- server time + lease seconds; a running job's deadline never passes its run deadline (set when the node
-- started it, or else at its first renewal: server time + timeout), so a hung node loses its job even while
-- its heartbeat thread renews.
--   KEYS: leased index, running index, job keys...    ARGV: 1 node, 2 lease seconds, 3 timeout seconds ('' none),
--         4.. job ids (one per job key)
-- Returns 1 per job still held, 0 per job no longer held (cancelled, requeued, finished, given to another),
-- -1 per job whose record is corrupt (not a hash, another id, a run deadline that is not a number): the Store
-- quarantines those. Every record is read and checked before the first write (Redis does not roll back).
local function key_type(key) return redis.call('TYPE', key)['ok'] end
for i = 1, 2 do
  local t = key_type(KEYS[i])
  if t ~= 'none' and t ~= 'zset' then return redis.error_reply(KEYS[i] .. ' holds a ' .. t .. ', not a sorted set') end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(ARGV[2])
local timeout = tonumber(ARGV[3])
local out, writes = {}, {}
for i = 3, #KEYS do
  local id = ARGV[i + 1]
  local held = 0
  local jtype = key_type(KEYS[i])
  if jtype ~= 'none' and jtype ~= 'hash' then
    held = -1
  elseif jtype == 'hash' then
    local f = redis.call('HMGET', KEYS[i], 'state', 'node', 'id', 'run_deadline')
    if f[2] == ARGV[1] and (f[1] == 'leased' or f[1] == 'running') then
      if f[3] ~= id or (f[4] and f[4] ~= '' and not tonumber(f[4])) then
        held = -1
      else
        local deadline = now + lease
        local index = KEYS[1]
        local new_cap = nil
        if f[1] == 'running' then
          index = KEYS[2]
          local cap = tonumber(f[4])
          if not cap and timeout then
            cap = now + timeout
            new_cap = string.format('%.6f', cap)
          end
          if cap and cap < deadline then deadline = cap end
        end
        writes[#writes + 1] = {KEYS[i], new_cap, index, string.format('%.6f', deadline), id}
        held = 1
      end
    end
  end
  out[#out + 1] = held
end
for _, w in ipairs(writes) do
  if w[2] then redis.call('HSET', w[1], 'run_deadline', w[2]) end
  redis.call('ZADD', w[3], 'XX', w[4], w[5])
end
return out
