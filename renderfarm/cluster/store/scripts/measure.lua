-- Record a node's measurement. Peaks keep the maximum; speeds and load times a moving average (weight ALPHA).
--   KEYS: peaks, speeds, version
--   ARGV: 1 peak field, 2 peak GiB ('' none), 3 speed field, 4 s/step ('' none), 5 load s ('' none), 6 now,
--         7 node, 8 profile, 9 alpha
-- Returns {'ok', version, records replaced}: a stored record that does not parse is replaced by this
-- measurement and counted; or {'corrupt', why} with nothing written (every check before the first write).
local function key_type(key) return redis.call('TYPE', key)['ok'] end
local function decode(raw)
  if not raw then return nil end
  local ok, value = pcall(cjson.decode, raw)
  if ok and type(value) == 'table' then return value end
  return nil
end
for i, want in ipairs({'hash', 'hash', 'string'}) do
  local t = key_type(KEYS[i])
  if t ~= 'none' and t ~= want then return {'corrupt', KEYS[i] .. ' holds a ' .. t .. ', not a ' .. want} end
end
local version = redis.call('GET', KEYS[3])
if version and not string.match(version, '^%d+$') then return {'corrupt', KEYS[3] .. ' is not an integer'} end
local now, peak, per_step, load, alpha = tonumber(ARGV[6]), tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[9])
if not now or not alpha or (ARGV[2] ~= '' and not peak) or (ARGV[4] ~= '' and not per_step)
    or (ARGV[5] ~= '' and not load) then
  return {'corrupt', 'a measurement that is not a number'}
end
local replaced = 0
local function stored(key, field)
  local raw = redis.call('HGET', key, field)
  local rec = decode(raw)
  if raw and not rec then replaced = replaced + 1 end
  return rec or {samples = 0}
end
local peak_rec, speed_rec
if peak then
  peak_rec = stored(KEYS[1], ARGV[1])
  if type(peak_rec.peak_gib) ~= 'number' or peak > peak_rec.peak_gib then peak_rec.peak_gib = peak; peak_rec.node = ARGV[7] end
  peak_rec.samples = (tonumber(peak_rec.samples) or 0) + 1
  peak_rec.updated = now
end
if per_step then
  speed_rec = stored(KEYS[2], ARGV[3])
  local function blend(old, new)
    if type(old) ~= 'number' then return new end
    return old + alpha * (new - old)
  end
  speed_rec.s_per_step = blend(speed_rec.s_per_step, per_step)
  if load then speed_rec.load_s = blend(speed_rec.load_s, load) end
  speed_rec.profile = ARGV[8]
  speed_rec.samples = (tonumber(speed_rec.samples) or 0) + 1
  speed_rec.updated = now
end
-- The writes.
if peak_rec then redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(peak_rec)) end
if speed_rec then redis.call('HSET', KEYS[2], ARGV[3], cjson.encode(speed_rec)) end
return {'ok', redis.call('INCR', KEYS[3]), replaced}
