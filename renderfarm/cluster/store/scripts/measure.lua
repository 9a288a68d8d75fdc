-- Record a node's measurement. Peaks keep the maximum; speeds and load times a moving average (weight ALPHA).
--   KEYS: peaks, speeds, version
--   ARGV: 1 peak field, 2 peak GiB ('' none), 3 speed field, 4 s/step ('' none), 5 load s ('' none), 6 now,
--         7 node, 8 profile, 9 alpha
local function decode(raw)
  if not raw then return nil end
  local ok, value = pcall(cjson.decode, raw)
  if ok and type(value) == 'table' then return value end
  return nil
end
local now = tonumber(ARGV[6])
if ARGV[2] ~= '' then
  local rec = decode(redis.call('HGET', KEYS[1], ARGV[1])) or {samples = 0}
  local peak = tonumber(ARGV[2])
  if type(rec.peak_gib) ~= 'number' or peak > rec.peak_gib then rec.peak_gib = peak; rec.node = ARGV[7] end
  rec.samples = (tonumber(rec.samples) or 0) + 1
  rec.updated = now
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
end
if ARGV[4] ~= '' then
  local rec = decode(redis.call('HGET', KEYS[2], ARGV[3])) or {samples = 0}
  local alpha = tonumber(ARGV[9])
  local function blend(old, new)
    if type(old) ~= 'number' then return new end
    return old + alpha * (new - old)
  end
  rec.s_per_step = blend(rec.s_per_step, tonumber(ARGV[4]))
  if ARGV[5] ~= '' then rec.load_s = blend(rec.load_s, tonumber(ARGV[5])) end
  rec.profile = ARGV[8]
  rec.samples = (tonumber(rec.samples) or 0) + 1
  rec.updated = now
  redis.call('HSET', KEYS[2], ARGV[3], cjson.encode(rec))
end
return redis.call('INCR', KEYS[3])
