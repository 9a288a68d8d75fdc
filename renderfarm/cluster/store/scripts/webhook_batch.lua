-- A job of a batch has finished: is the batch's webhook due? Atomic, so that of several dispatchers handling
-- the batch's last jobs at once exactly one sees the batch finish first, and none sees it early.
--   KEYS: batch webhook hash, batch open set, batch set      ARGV: 1 job id, 2 job key prefix ("rf:job:"),
--                                                                3 ttl of the fired webhook's hash (seconds)
-- Returns {'none'} (the batch has no webhook), {'waiting'} (jobs of the batch are not finished), or
-- {'fire', url, team}: the batch has finished (the jobs whose state is not terminal go back to the open set
-- first: retried by an operator since), and stays fired, so an event handled twice answers 'fire' again and
-- the caller's delivery, created once by its id (webhook_enqueue.lua), is not created twice.
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return {'none'} end
if redis.call('HGET', KEYS[1], 'fired') ~= '1' then
  local open_type = redis.call('TYPE', KEYS[2])['ok']
  if open_type ~= 'set' and open_type ~= 'none' then return {'none'} end
  redis.call('SREM', KEYS[2], ARGV[1])
  if redis.call('SCARD', KEYS[2]) > 0 then return {'waiting'} end
  if redis.call('TYPE', KEYS[3])['ok'] == 'set' then
    for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
      local state = redis.pcall('HGET', ARGV[2] .. id, 'state')  -- a record that is not a hash counts as finished
      if type(state) == 'string' and state ~= 'done' and state ~= 'failed' and state ~= 'cancelled' then
        redis.call('SADD', KEYS[2], id)
      end
    end
  end
  if redis.call('SCARD', KEYS[2]) > 0 then return {'waiting'} end
  redis.call('HSET', KEYS[1], 'fired', '1')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  redis.call('DEL', KEYS[2])
end
return {'fire', redis.call('HGET', KEYS[1], 'url') or '', redis.call('HGET', KEYS[1], 'team') or ''}
