-- Move one job from its current state to ARGV[3], checking legality and ownership; a job leaving or
-- re-entering the queue leaves or re-enters its (team, priority) queue too.
--   KEYS: job, events, index keys (one per state, in STATES order), queues set, leader epoch, finished (a
--         stream of the moves to a terminal state only)
--   ARGV: 1 id, 2 allowed-from (",a,b,"), 3 target, 4 score ('' = stored queue score, '+N' = N seconds
--         after the server's clock: lease deadlines use Redis's TIME, so nodes' clocks may disagree),
--         5 expected node ('' = any), 6 now, 7 fields-json, 8 attempts increment, 9 events maxlen,
--         10 state names csv, 11 expired-only ('1': move only if the job's deadline in its current index
--         has passed by the server's clock), 12 operation token ('' = none), 13 fence ('' = none: else the
--         scheduler's leadership epoch, and the move is refused as `fenced` unless it is still the farm's
--         current one), 14 timed-fields-json (field -> seconds after the server's clock: the field is set to
--         that moment, e.g. a running job's run deadline), 15 job key prefix, 16 children key prefix: a job
--         that finishes settles the jobs waiting for it (chain.lua, prepended by the Store)
-- Returns {status, current-state}: status is ok | missing | state | node | live | fenced, or {status, why}: corrupt (the
-- job's record cannot be moved as it stands: the Store quarantines it) | badkey (a farm key holds the wrong
-- type: nobody's job is at fault). Redis does not roll a script back, so every check comes before the first
-- write: a move that fails half-way (an id taken out of one index and never put in the next) loses a job.
-- Idempotent by operation token: the job's hash keeps the token of the last move applied to it and the
-- state it left (`op`, `op_from`). redis-py re-sends a script whose reply was lost on the way back; the
-- re-run then finds its own token and answers what the first run did, instead of "illegal: already leased".
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function key_type(key) return redis.call('TYPE', key)['ok'] end
local function holds(key, want) local t = key_type(key); return t == 'none' or t == want end
local function integer(text) return not text or string.match(text, '^%-?%d+$') ~= nil end  -- HGET's nil is false
local jkey = KEYS[1]
local jtype = key_type(jkey)
if jtype == 'none' then return {'missing', ''} end
if jtype ~= 'hash' then return {'corrupt', 'its key holds a ' .. jtype .. ', not a hash'} end
local state = redis.call('HGET', jkey, 'state')
local names = {}
for name in string.gmatch(ARGV[10], '[^,]+') do names[#names + 1] = name end
local queues_key, epoch_key, finished_key = KEYS[3 + #names], KEYS[4 + #names], KEYS[5 + #names]
local from_key, to_key
for i, name in ipairs(names) do
  if name == state then from_key = KEYS[2 + i] end
  if name == ARGV[3] then to_key = KEYS[2 + i] end
end
if not from_key then return {'corrupt', 'its state ' .. cjson.encode(state or cjson.null) .. ' is not a job state'} end
if ARGV[12] ~= '' then
  local done = redis.call('HMGET', jkey, 'op', 'op_from')
  if done[1] == ARGV[12] then return {'ok', done[2] or state} end
end
if not string.find(ARGV[2], ',' .. state .. ',', 1, true) then return {'state', state} end
if ARGV[5] ~= '' then
  local node = redis.call('HGET', jkey, 'node')
  if node ~= ARGV[5] then return {'node', state} end
end
-- Everything the writes below rely on, checked while nothing is written yet.
for _, key in ipairs({from_key, to_key}) do
  if not holds(key, 'zset') then return {'badkey', key .. ' holds a ' .. key_type(key) .. ', not a sorted set'} end
end
for _, key in ipairs({KEYS[2], finished_key}) do
  if not holds(key, 'stream') then return {'badkey', key .. ' holds a ' .. key_type(key) .. ', not a stream'} end
end
if not holds(queues_key, 'set') then return {'badkey', queues_key .. ' is not a set'} end
if ARGV[13] ~= '' and redis.call('GET', epoch_key) ~= ARGV[13] then return {'fenced', state} end
if ARGV[11] == '1' then
  local deadline = tonumber(redis.call('ZSCORE', from_key, ARGV[1]))
  if deadline and deadline > server_now() then return {'live', state} end
end
local score = ARGV[4]
if score == '' then
  score = redis.call('HGET', jkey, 'score') or '0'
  if not tonumber(score) then return {'corrupt', 'its queue score ' .. cjson.encode(score) .. ' is not a number'} end
elseif string.sub(score, 1, 1) == '+' then
  score = string.format('%.6f', server_now() + tonumber(string.sub(score, 2)))
end
local fields = cjson.decode(ARGV[7])
local timed = cjson.decode(ARGV[14])
for k, v in pairs(timed) do
  if type(v) ~= 'number' then return {'corrupt', 'timed field ' .. k .. ' is not a number of seconds'} end
end
if ARGV[8] ~= '0' and not integer(redis.call('HGET', jkey, 'attempts')) then
  return {'corrupt', 'its attempts ' .. cjson.encode(redis.call('HGET', jkey, 'attempts')) .. ' is not an integer'}
end
local queue = redis.call('HGET', jkey, 'queue')
local queue_at
if queue then
  if not holds(queue, 'zset') then return {'badkey', queue .. ' holds a ' .. key_type(queue) .. ', not a sorted set'} end
  if ARGV[3] == 'queued' then
    queue_at = redis.call('HGET', jkey, 'created_at') or ARGV[6]
    if not tonumber(queue_at) then return {'corrupt', 'its created_at ' .. cjson.encode(queue_at) .. ' is not a number'} end
  end
end
-- The writes.
redis.call('ZREM', from_key, ARGV[1])
redis.call('ZADD', to_key, score, ARGV[1])
if queue then
  if state == 'queued' then
    redis.call('ZREM', queue, ARGV[1])
    if redis.call('ZCARD', queue) == 0 then redis.call('SREM', queues_key, queue) end
  end
  if ARGV[3] == 'queued' then
    redis.call('ZADD', queue, queue_at, ARGV[1])
    redis.call('SADD', queues_key, queue)
  end
end
local flat = {'state', ARGV[3], 'updated_at', ARGV[6], 'op', ARGV[12], 'op_from', state}
for k, v in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = v end
if next(timed) then
  local now = server_now()
  for k, v in pairs(timed) do flat[#flat + 1] = k; flat[#flat + 1] = string.format('%.6f', now + v) end
end
redis.call('HSET', jkey, unpack(flat))
if ARGV[8] ~= '0' then redis.call('HINCRBY', jkey, 'attempts', ARGV[8]) end
local node = redis.call('HGET', jkey, 'node') or ''
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 'job', ARGV[1], 'state', ARGV[3], 'node', node, 'ts', ARGV[6])
if ARGV[3] == 'done' or ARGV[3] == 'failed' or ARGV[3] == 'cancelled' then
  redis.call('XADD', finished_key, 'MAXLEN', '~', ARGV[9], '*', 'job', ARGV[1], 'state', ARGV[3], 'node', node, 'ts', ARGV[6])
  local kids = chain_children({children_prefix = ARGV[16]}, ARGV[1])
  if #kids > 0 then
    local C = {job_prefix = ARGV[15], children_prefix = ARGV[16], index = chain_indexes(ARGV[10], 3),
               queues = queues_key, events = KEYS[2], finished = finished_key, maxlen = ARGV[9], now = ARGV[6]}
    if chain_keys_ok(C) then chain_settle(C, kids) end  -- else the reconciling's settle says what is wrong
  end
end
return {'ok', state}
