-- Settle waiting jobs (chain.lua, prepended): each whose parents are all done is queued, each with a parent
-- failed or cancelled fails or is cancelled with it, the rest keep waiting. What the scheduler's reconciling
-- runs over the waiting index, so that a job whose parent finished while nothing settled it (a retry racing
-- its parent, a restored backup) does not wait forever; transition.lua settles a finishing job's children itself.
--   KEYS: index keys (one per state, in STATES order)..., queues set, events, finished
--   ARGV: 1 state names csv, 2 job key prefix, 3 children key prefix, 4 events maxlen, 5 now, then ids...
-- Returns how many jobs moved. The farm's keys are checked before anything is written.
local n = 0
for _ in string.gmatch(ARGV[1], '[^,]+') do n = n + 1 end
for i = 1, n do
  local t = chain_type(KEYS[i])
  if t ~= 'none' and t ~= 'zset' then return redis.error_reply(KEYS[i] .. ' holds a ' .. t .. ', not a sorted set') end
end
local queues, events, finished = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
for _, pair in ipairs({{queues, 'set'}, {events, 'stream'}, {finished, 'stream'}}) do
  local t = chain_type(pair[1])
  if t ~= 'none' and t ~= pair[2] then return redis.error_reply(pair[1] .. ' holds a ' .. t .. ', not a ' .. pair[2]) end
end
local ids = {}
for i = 6, #ARGV do ids[#ids + 1] = ARGV[i] end
local C = {job_prefix = ARGV[2], children_prefix = ARGV[3], index = chain_indexes(ARGV[1], 1), queues = queues,
           events = events, finished = finished, maxlen = ARGV[4], now = ARGV[5]}
return chain_settle(C, ids)
