-- Chains (renderfarm/chains.py), shared by transition.lua and settle.lua (the Store prepends this file to both):
-- settling the jobs that wait for others. A waiting job's `parents` field lists, as JSON, the jobs it still
-- waited for when it was submitted; the set `<children prefix><parent>` lists the jobs that wait for a parent.
-- A waiting job whose parents are all done is queued (its place in its queue kept: its score and created_at);
-- one with a parent failed or cancelled (or whose record is gone) is failed or cancelled with that reason, its
-- `blocked_by` naming the parent, and its own waiting children are settled in turn. Each job is read in full
-- before anything of it is written (Redis does not roll a script back): a job is never half-moved.
--   C: job_prefix, children_prefix, index (state name -> index key), queues, events, finished, maxlen, now
local function chain_type(key) return redis.call('TYPE', key)['ok'] end

local function chain_children(C, id)
  local key = C.children_prefix .. id
  if chain_type(key) ~= 'set' then return {} end
  return redis.call('SMEMBERS', key)
end

-- What a waiting job's parents say: 'wait', 'release', or 'failed'/'cancelled' with the parent and why.
local function chain_verdict(C, parents)
  local waiting = false
  for _, parent in ipairs(parents) do
    local pkey = C.job_prefix .. parent
    if chain_type(pkey) ~= 'hash' then return 'failed', parent, 'job ' .. parent .. ' it waits for has no record' end
    local got = redis.call('HMGET', pkey, 'state', 'error')
    if got[1] == 'failed' then
      local why = got[2] or ''
      if #why > 300 then why = string.sub(why, 1, 300) .. '...' end
      return 'failed', parent, 'job ' .. parent .. ' it waits for failed' .. (why ~= '' and (': ' .. why) or '')
    elseif got[1] == 'cancelled' then
      return 'cancelled', parent, 'job ' .. parent .. ' it waits for was cancelled'
    elseif got[1] ~= 'done' then
      waiting = true
    end
  end
  if waiting then return 'wait' end
  return 'release'
end

-- Settle the waiting jobs among `ids` (and, through failures, their descendants); returns how many moved.
local function chain_settle(C, ids)
  local stack, seen, moved = {}, {}, 0
  for i = #ids, 1, -1 do stack[#stack + 1] = ids[i] end
  while #stack > 0 do
    local id = table.remove(stack)
    local jkey = C.job_prefix .. id
    if not seen[id] and chain_type(jkey) == 'hash' and redis.call('HGET', jkey, 'state') == 'waiting' then
      seen[id] = true
      local ok, parents = pcall(cjson.decode, redis.call('HGET', jkey, 'parents') or '[]')
      if ok and type(parents) == 'table' then
        local verdict, parent, why = chain_verdict(C, parents)
        if verdict == 'release' then
          local got = redis.call('HMGET', jkey, 'score', 'queue', 'created_at')
          local queue_ok = not got[2] or (chain_type(got[2]) == 'zset' or chain_type(got[2]) == 'none')
          if tonumber(got[1]) and queue_ok and (not got[2] or tonumber(got[3])) then
            redis.call('ZREM', C.index['waiting'], id)
            redis.call('ZADD', C.index['queued'], got[1], id)
            if got[2] then
              redis.call('ZADD', got[2], got[3], id)
              redis.call('SADD', C.queues, got[2])
            end
            redis.call('HSET', jkey, 'state', 'queued', 'updated_at', C.now)
            redis.call('XADD', C.events, 'MAXLEN', '~', C.maxlen, '*', 'job', id, 'state', 'queued', 'node', '', 'ts', C.now)
            moved = moved + 1
          end
        elseif verdict ~= 'wait' then
          redis.call('ZREM', C.index['waiting'], id)
          redis.call('ZADD', C.index[verdict], C.now, id)
          redis.call('HSET', jkey, 'state', verdict, 'updated_at', C.now, 'finished_at', C.now, 'error', why,
                     'blocked_by', parent)
          for _, stream in ipairs({C.events, C.finished}) do
            redis.call('XADD', stream, 'MAXLEN', '~', C.maxlen, '*', 'job', id, 'state', verdict, 'node', '', 'ts', C.now)
          end
          moved = moved + 1
          local kids = chain_children(C, id)
          for i = #kids, 1, -1 do stack[#stack + 1] = kids[i] end
        end
      end
    end
  end
  return moved
end

-- Whether the keys a settle writes hold what they should (nothing is written when one does not).
local function chain_keys_ok(C)
  for _, state in ipairs({'waiting', 'queued', 'failed', 'cancelled'}) do
    local t = chain_type(C.index[state])
    if t ~= 'none' and t ~= 'zset' then return false end
  end
  local t = chain_type(C.queues)
  return t == 'none' or t == 'set'
end

-- The index keys by state name, from the state names csv and the keys that follow one another in that order.
local function chain_indexes(names_csv, first)
  local index, i = {}, first
  for name in string.gmatch(names_csv, '[^,]+') do index[name] = KEYS[i]; i = i + 1 end
  return index
end
