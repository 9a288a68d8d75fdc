-- Count jobs a node has just completed in the job-duration histograms (renderfarm/metrics.py), once per job.
--   KEYS: 1 wait histogram, 2 render histogram (hashes: Keys.histogram), then one job hash per job
--   ARGV: 1 node, 2 bucket upper bounds (ascending, comma-separated, written as the field names; a duration
--         above the last goes to ARGV[5]), 3 sum field, 4 count field, 5 +Inf field, 6 the job field that
--         marks a job counted
-- A job counts when its record says done, on this node, and not yet counted: wait = started_at - created_at,
-- render = finished_at - started_at (seconds, at least 0; a duration whose times are missing or not numbers is
-- left out). It runs in the round that completes the jobs, after their moves: a job whose result was discarded
-- (cancelled, taken back) is not done on this node and does not count. The mark makes it idempotent: a round
-- sent again (NOSCRIPT, store/round.py) counts nothing twice.
-- Returns {'ok', jobs counted} or {'badkey', why}: a histogram that is not a hash of numbers (nothing written).
local function key_type(key) return redis.call('TYPE', key)['ok'] end
-- Checked before the first write (Redis does not roll a script back): both histograms are hashes, or absent,
-- whose counts are integers and whose sum is a number (HINCRBY on anything else fails half-way).
for i = 1, 2 do
  local t = key_type(KEYS[i])
  if t ~= 'none' and t ~= 'hash' then return {'badkey', KEYS[i] .. ' holds a ' .. t .. ', not a hash'} end
  local fields = redis.call('HGETALL', KEYS[i])
  for j = 1, #fields, 2 do
    local ok = fields[j] == ARGV[3] and tonumber(fields[j + 1]) or string.match(fields[j + 1], '^%d+$')
    if not ok then return {'badkey', KEYS[i] .. ' field ' .. fields[j] .. ' is not a number'} end
  end
end
local bounds = {}
for text in string.gmatch(ARGV[2], '[^,]+') do bounds[#bounds + 1] = {tonumber(text), text} end
local function observe(key, seconds)
  if seconds < 0 then seconds = 0 end
  local field = ARGV[5]
  for _, bound in ipairs(bounds) do
    if seconds <= bound[1] then field = bound[2]; break end
  end
  redis.call('HINCRBY', key, field, 1)
  redis.call('HINCRBY', key, ARGV[4], 1)
  redis.call('HINCRBYFLOAT', key, ARGV[3], string.format('%.6f', seconds))
end
local counted = 0
for i = 3, #KEYS do
  if key_type(KEYS[i]) == 'hash' then
    local f = redis.call('HMGET', KEYS[i], 'state', 'node', ARGV[6], 'created_at', 'started_at', 'finished_at')
    if f[1] == 'done' and f[2] == ARGV[1] and not f[3] then
      local created, started, finished = tonumber(f[4]), tonumber(f[5]), tonumber(f[6])
      if created and started then observe(KEYS[1], started - created) end
      if started and finished then observe(KEYS[2], finished - started) end
      redis.call('HSET', KEYS[i], ARGV[6], '1')
      counted = counted + 1
    end
  end
end
return {'ok', counted}
