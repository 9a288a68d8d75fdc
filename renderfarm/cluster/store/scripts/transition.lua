-- Move one job from its current state to ARGV[3], checking legality and ownership; a job leaving or
-- re-entering the queue leaves or re-enters its (team, priority) queue too.
--   KEYS: job, events, result, index keys (one per state, in STATES order), queues set
--   ARGV: 1 id, 2 allowed-from (",a,b,"), 3 target, 4 score ('' = stored queue score, '+N' = N seconds
--         after the server's clock: lease deadlines use Redis's TIME, so nodes' clocks may disagree),
--         5 expected node ('' = any), 6 now, 7 fields-json, 8 attempts increment, 9 events maxlen,
--         10 state names csv, 11 result ttl, 12 expired-only ('1': move only if the job's deadline in its
--         current index has passed by the server's clock), 13 operation token ('' = none),
--         14.. result blobs
-- Returns {status, current-state}: status is ok | missing | state | node | live.
-- Idempotent by operation token: the job's hash keeps the token of the last move applied to it and the
-- state it left (`op`, `op_from`). redis-py re-sends a script whose reply was lost on the way back; the
-- re-run then finds its own token and answers what the first run did, instead of "illegal: already leased".
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local jkey = KEYS[1]
local state = redis.call('HGET', jkey, 'state')
if not state then return {'missing', ''} end
if ARGV[13] ~= '' then
  local done = redis.call('HMGET', jkey, 'op', 'op_from')
  if done[1] == ARGV[13] then return {'ok', done[2] or state} end
end
if not string.find(ARGV[2], ',' .. state .. ',', 1, true) then return {'state', state} end
if ARGV[5] ~= '' then
  local node = redis.call('HGET', jkey, 'node')
  if node ~= ARGV[5] then return {'node', state} end
end
local names = {}
for name in string.gmatch(ARGV[10], '[^,]+') do names[#names + 1] = name end
local from_key, to_key
for i, name in ipairs(names) do
  if name == state then from_key = KEYS[3 + i] end
  if name == ARGV[3] then to_key = KEYS[3 + i] end
end
if ARGV[12] == '1' then
  local deadline = tonumber(redis.call('ZSCORE', from_key, ARGV[1]))
  if deadline and deadline > server_now() then return {'live', state} end
end
local score = ARGV[4]
if score == '' then
  score = redis.call('HGET', jkey, 'score') or '0'
elseif string.sub(score, 1, 1) == '+' then
  score = string.format('%.6f', server_now() + tonumber(string.sub(score, 2)))
end
redis.call('ZREM', from_key, ARGV[1])
redis.call('ZADD', to_key, score, ARGV[1])
local queue = redis.call('HGET', jkey, 'queue')
if queue then
  if state == 'queued' then
    redis.call('ZREM', queue, ARGV[1])
    if redis.call('ZCARD', queue) == 0 then redis.call('SREM', KEYS[#KEYS], queue) end
  end
  if ARGV[3] == 'queued' then
    redis.call('ZADD', queue, redis.call('HGET', jkey, 'created_at') or ARGV[6], ARGV[1])
    redis.call('SADD', KEYS[#KEYS], queue)
  end
end
local flat = {'state', ARGV[3], 'updated_at', ARGV[6], 'op', ARGV[13], 'op_from', state}
for k, v in pairs(cjson.decode(ARGV[7])) do flat[#flat + 1] = k; flat[#flat + 1] = v end
redis.call('HSET', jkey, unpack(flat))
if ARGV[8] ~= '0' then redis.call('HINCRBY', jkey, 'attempts', ARGV[8]) end
if #ARGV >= 14 then
  redis.call('DEL', KEYS[3])
  for i = 14, #ARGV do redis.call('HSET', KEYS[3], tostring(i - 14), ARGV[i]) end
  redis.call('EXPIRE', KEYS[3], ARGV[11])
  redis.call('HSET', jkey, 'images', tostring(#ARGV - 13))
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 'job', ARGV[1], 'state', ARGV[3],
           'node', redis.call('HGET', jkey, 'node') or '', 'ts', ARGV[6])
return {'ok', state}
